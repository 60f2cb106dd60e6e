//! The HTTP client the `http` and `slack` destinations send with: hyper-util's pooled
//! client, TLS by rustls with the Mozilla roots (`webpki-roots`), HTTP/2 when the server
//! offers it by ALPN, the environment's proxy as curl reads it, redirects only as
//! configured and within the origin, and one timeout over the whole exchange.
//!
//! Why not reqwest (which the `simulate` command still uses): per request it turns the
//! URI back into a `Url` twice (its redirect layer and its response), on top of layers
//! this client does not need; measured with callgrind, about 40k instructions per event,
//! 16% of the relay's (BENCHMARKS.md, "Issue 14, third round"). What reqwest gave is kept
//! here and tested in `tests/delivery.rs` and `tests/faults_delivery.rs`:
//! - **Proxies**: `HTTPS_PROXY` / `HTTP_PROXY` / `ALL_PROXY` (and lower case), except the
//!   hosts in `NO_PROXY` (hyper-util's matcher, which reqwest uses too), read once when
//!   the destination is built. An `https` URL goes through a `CONNECT` tunnel carrying
//!   the proxy URL's credentials; an `http` one is sent to the proxy in absolute form
//!   with `Proxy-Authorization`. Only `http://` proxies: a destination the environment
//!   sends to another kind (`https://`, `socks5://`) is refused when it is built, naming
//!   the variable's value's scheme, instead of failing every attempt.
//! - **Credentials in the URL** (`https://user:pass@host/…`) are sent as
//!   `Authorization: Basic` (unless `headers` set one) and taken off the URL itself, so
//!   they are never in a request line, an HTTP/2 `:authority` or a pool key.
//! - **Timeouts**: a connection (DNS, TCP, the proxy's `CONNECT`, the TLS handshake)
//!   within the destination's `timeout`, at most 5 s; the request until its answer's
//!   status within `timeout`, redirects included; the answer's body is then read until
//!   the same deadline and no longer, and the status decides (a 2xx whose body stalls is
//!   still delivered). TCP keepalive (15 s, 3 probes) and a 30 s `TCP_USER_TIMEOUT` drop
//!   a pooled connection whose peer vanished.
//! - **Redirects**: see [`HttpClient::redirect`].

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{ACCEPT, AUTHORIZATION, LOCATION, PROXY_AUTHORIZATION, USER_AGENT};
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, Uri};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::proxy::Tunnel;
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::client::proxy::matcher::Matcher;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tower::{Service, ServiceExt};
use url::Url;

use super::web::{Redactor, basic_credentials, drain, same_origin, status_error};
use super::{DeliveryError, SetupError};
use crate::config::{DestinationConfig, Secret};

/// Redirects followed in a row, when `follow_redirects` is on.
const MAX_REDIRECTS: usize = 5;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// One destination's client: its URL, its pool of connections and its rules.
pub(super) struct HttpClient {
    pool: Client<ConnectTimeout, Full<Bytes>>,
    /// The configured URL (often a credential); redirects are resolved against it and
    /// must keep its origin.
    url: Secret<Url>,
    uri: Secret<Uri>,
    timeout: Duration,
    follow_redirects: bool,
    /// Sent with every request, merged once: `User-Agent`, `Accept`, `Authorization` from
    /// the URL's credentials, `Proxy-Authorization` for an `http` URL sent through a proxy
    /// with credentials, then the destination's own (which replace any of those).
    headers: HeaderMap,
}

impl HttpClient {
    /// A client for `url` with the destination's settings; `own` are the headers the
    /// destination sends with every request (content type, configured headers).
    pub(super) fn new(
        config: &DestinationConfig,
        url: &Url,
        follow_redirects: bool,
        own: HeaderMap,
    ) -> Result<Self, SetupError> {
        let invalid = |reason: String| SetupError::Invalid {
            destination: config.name.clone(),
            reason,
        };
        // Credentials in the URL become a header and leave the URL.
        let mut url = url.clone();
        let basic = basic_credentials(&url);
        let _ = url.set_username("");
        let _ = url.set_password(None);
        let uri: Uri = url
            .as_str()
            .parse()
            .map_err(|e| invalid(format!("invalid url: {e}")))?;
        let proxies = Arc::new(Matcher::from_env());
        let proxy = proxies.intercept(&uri);
        if let Some(scheme) = proxy.as_ref().and_then(|p| p.uri().scheme_str())
            && scheme != "http"
        {
            return Err(invalid(format!(
                "the environment's proxy for this URL (HTTPS_PROXY, HTTP_PROXY or ALL_PROXY) \
                 is a {scheme}:// proxy; only http:// proxies are supported"
            )));
        }
        let user_agent =
            HeaderValue::from_static(concat!("faceio-relay/", env!("CARGO_PKG_VERSION")));
        let mut headers = HeaderMap::new();
        headers.insert(USER_AGENT, user_agent.clone());
        headers.insert(ACCEPT, HeaderValue::from_static("*/*"));
        if let Some(basic) = basic {
            let mut value = HeaderValue::try_from(format!("Basic {basic}"))
                .map_err(|_| invalid("the URL's user and password cannot be sent".into()))?;
            value.set_sensitive(true);
            headers.insert(AUTHORIZATION, value);
        }
        if uri.scheme() == Some(&http::uri::Scheme::HTTP)
            && let Some(mut auth) = proxy.as_ref().and_then(|p| p.basic_auth().cloned())
        {
            auth.set_sensitive(true);
            headers.insert(PROXY_AUTHORIZATION, auth);
        }
        // `extend` replaces every value of a name already there.
        headers.extend(own);

        let mut direct = HttpConnector::new();
        direct.enforce_http(false);
        direct.set_nodelay(true);
        direct.set_keepalive(Some(Duration::from_secs(15)));
        direct.set_keepalive_interval(Some(Duration::from_secs(15)));
        direct.set_keepalive_retries(Some(3));
        #[cfg(any(target_os = "linux", target_os = "android", target_os = "fuchsia"))]
        direct.set_tcp_user_timeout(Some(Duration::from_secs(30)));
        let connect_limit = config.timeout.min(Duration::from_secs(5));
        // Per address tried (a host with several addresses gets them all a share), and
        // over the whole connection below.
        direct.set_connect_timeout(Some(connect_limit));
        let provider = tokio_rustls::rustls::crypto::ring::default_provider();
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_webpki_roots(provider)
            .map_err(|e| invalid(format!("TLS setup failed: {e}")))?
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(ProxyConnector {
                direct,
                proxies,
                user_agent,
            });
        let connector = ConnectTimeout {
            inner: https,
            limit: connect_limit,
        };
        let pool = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(config.concurrency)
            .pool_timer(TokioTimer::new())
            .build(connector);
        Ok(Self {
            pool,
            url: Secret::new(url),
            uri: Secret::new(uri),
            timeout: config.timeout,
            follow_redirects,
            headers,
        })
    }

    /// POSTs `body` with `extra` (this request's own headers, on top of the client's) to
    /// the URL: delivered on a
    /// 2xx answer, else the error the status or the transport gives. The answer's status
    /// must come within the destination's `timeout`; its body is then read (a success's,
    /// so the connection is reused; a failure's, for the error's excerpt) until the same
    /// deadline and no longer.
    pub(super) async fn post(
        &self,
        extra: HeaderMap,
        body: Bytes,
        redactor: &Redactor,
    ) -> Result<(), DeliveryError> {
        let deadline = Instant::now() + self.timeout;
        let mut headers = self.headers.clone();
        headers.extend(extra);
        let response =
            match tokio::time::timeout_at(deadline, self.send(headers, body, deadline)).await {
                Ok(response) => response?,
                Err(_) => {
                    return Err(DeliveryError::retryable(format!(
                        "timed out: no answer within {}",
                        humantime::format_duration(self.timeout)
                    )));
                }
            };
        if response.status().is_success() {
            drain(response, deadline).await;
            Ok(())
        } else {
            // A 3xx here was not followed (see `redirect`): the endpoint's answer, which
            // trying again will not change.
            Err(status_error(response, redactor, deadline).await)
        }
    }

    /// Sends the request, following redirects as [`Self::redirect`] allows.
    async fn send(
        &self,
        headers: HeaderMap,
        body: Bytes,
        deadline: Instant,
    ) -> Result<Response<Incoming>, DeliveryError> {
        let (mut url, mut uri) = (None::<Url>, self.uri.expose().clone());
        let mut followed = 0;
        loop {
            let mut request = Request::post(uri.clone())
                .body(Full::new(body.clone()))
                .expect("a POST to a parsed URI is a valid request");
            *request.headers_mut() = headers.clone();
            let response = self.pool.request(request).await.map_err(transport_error)?;
            let current = url.as_ref().unwrap_or(self.url.expose());
            let Some(next) = self.redirect(current, &response) else {
                return Ok(response);
            };
            if followed == MAX_REDIRECTS {
                return Err(DeliveryError::retryable(format!(
                    "request failed: more than {MAX_REDIRECTS} redirects"
                )));
            }
            followed += 1;
            drain(response, deadline).await;
            uri = next.as_str().parse().map_err(|e| {
                DeliveryError::permanent(format!("redirect to an invalid URI: {e}"))
            })?;
            url = Some(next);
        }
    }

    /// Where a response redirects to, when the destination follows it: only with
    /// `follow_redirects`, only `307` and `308` (which repeat the POST with its body; on
    /// `301`, `302` and `303` an HTTP client sends a GET without the event, which would then
    /// count as delivered), and only within the configured URL's origin (see
    /// `web::same_origin`): the request carries the configured headers and the signature,
    /// which must not go to another host. Anything else is answered as it is.
    fn redirect(&self, current: &Url, response: &Response<Incoming>) -> Option<Url> {
        let status = response.status();
        if !self.follow_redirects
            || (status != StatusCode::TEMPORARY_REDIRECT
                && status != StatusCode::PERMANENT_REDIRECT)
        {
            return None;
        }
        let location = response.headers().get(LOCATION)?.to_str().ok()?;
        let next = current.join(location).ok()?;
        same_origin(self.url.expose(), &next).then_some(next)
    }
}

/// Classifies a transport error: every error before a response (connect, TLS, proxy,
/// reset) is worth retrying. hyper's errors name no URL, so no credential reaches the text.
fn transport_error(e: hyper_util::client::legacy::Error) -> DeliveryError {
    let kind = if e.is_connect() {
        "connection failed"
    } else {
        "request failed"
    };
    DeliveryError::retryable(format!("{kind}: {}", crate::telemetry::error_chain(&e)))
}

/// Bounds opening a connection as a whole (DNS, TCP, the proxy's `CONNECT`, the TLS
/// handshake), also when hyper finishes a connection in the background after a request
/// took another one from the pool.
#[derive(Clone)]
struct ConnectTimeout {
    inner: HttpsConnector<ProxyConnector>,
    limit: Duration,
}

impl Service<Uri> for ConnectTimeout {
    type Response = hyper_rustls::MaybeHttpsStream<ProxyStream>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, dst: Uri) -> Self::Future {
        let (connecting, limit) = (self.inner.call(dst), self.limit);
        Box::pin(async move {
            match tokio::time::timeout(limit, connecting).await {
                Ok(connected) => connected,
                Err(_) => Err(format!(
                    "timed out connecting (after {})",
                    humantime::format_duration(limit)
                )
                .into()),
            }
        })
    }
}

/// Opens a connection for a URI: directly, or through the proxy the environment names
/// for it (a `CONNECT` tunnel for `https`; for `http` the proxy's own connection, marked
/// so requests on it are written in absolute form).
#[derive(Clone)]
struct ProxyConnector {
    direct: HttpConnector,
    proxies: Arc<Matcher>,
    /// Sent with a `CONNECT`, as with every request.
    user_agent: HeaderValue,
}

impl Service<Uri> for ProxyConnector {
    type Response = ProxyStream;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<ProxyStream, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.direct.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, dst: Uri) -> Self::Future {
        let mut direct = self.direct.clone();
        let proxy = self.proxies.intercept(&dst);
        let user_agent = self.user_agent.clone();
        Box::pin(async move {
            let Some(proxy) = proxy else {
                let io = direct.call(dst).await?;
                return Ok(ProxyStream {
                    io,
                    absolute_form: false,
                });
            };
            // `HttpClient::new` refused other schemes for the destination's origin.
            if proxy.uri().scheme() != Some(&http::uri::Scheme::HTTP) {
                return Err("only http:// proxies are supported".into());
            }
            if dst.scheme() == Some(&http::uri::Scheme::HTTPS) {
                let mut connect_headers = HeaderMap::new();
                connect_headers.insert(USER_AGENT, user_agent);
                let mut tunnel =
                    Tunnel::new(proxy.uri().clone(), direct).with_headers(connect_headers);
                if let Some(auth) = proxy.basic_auth() {
                    tunnel = tunnel.with_auth(auth.clone());
                }
                let io = tunnel.ready().await?.call(dst).await?;
                Ok(ProxyStream {
                    io,
                    absolute_form: false,
                })
            } else {
                let io = direct.call(proxy.uri().clone()).await?;
                Ok(ProxyStream {
                    io,
                    absolute_form: true,
                })
            }
        })
    }
}

/// A TCP connection, direct or to a proxy; `absolute_form` when requests on it go to an
/// `http` proxy (hyper then writes the full URI in the request line).
struct ProxyStream {
    io: TokioIo<TcpStream>,
    absolute_form: bool,
}

impl Connection for ProxyStream {
    fn connected(&self) -> Connected {
        self.io.connected().proxy(self.absolute_form)
    }
}

impl hyper::rt::Read for ProxyStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for ProxyStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
}
