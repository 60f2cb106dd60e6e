//! Ingress that nobody can starve: idle HTTP/2 and HTTP/1 connections, header tricklers
//! and floods of requests for other paths, all from one address, against the real daemon,
//! while a FACEIO-like sender posts from another address (plain and TLS with ALPN h2).
//! Also: idle connections are closed after `idle_timeout` but a request in progress is
//! not, the per-source connection cap, and 404/405 charged to the failed-request budget.
//!
//! Latencies are printed (the README's fault-test table records one run's figures); the
//! assertions are that FACEIO gets only 200s, with a p99 far inside its 6 s (a timed
//! bound tight enough to matter would fail on a loaded CI machine), and that every
//! attacking socket is closed by the relay in bounded time.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use common::attack::*;
use common::proc::*;
use common::*;

/// A p99 that FACEIO's sender (which gives up after 6 s) would never notice.
const P99_BOUND: Duration = Duration::from_secs(1);

fn config(setup: &Setup, ingress: &str, extra: &str) -> std::path::PathBuf {
    setup.write_config(&format!(
        "ingress:\n{ingress}\
         destinations:\n  api:\n    type: http\n    url: http://127.0.0.1:9/unused\n\
         routes:\n  - match: {{ eventName: NOTHING }}\n    to: [api]\n{extra}"
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_thousand_idle_connections_and_a_404_flood_from_one_address_do_not_stop_faceio() {
    let setup = Setup::new();
    let idle = Duration::from_secs(2);
    let daemon = Relayd::start(&config(
        &setup,
        "  idle_timeout: 2s\n  header_timeout: 2s\n",
        "",
    ))
    .await;
    let addr = daemon.addr;

    // The attack, all from 127.0.0.1: 1,000 raw HTTP/2 idlers, 1,000 HTTP/2 clients that
    // answer PINGs and idle, 1,000 HTTP/1 header tricklers, and a flood of `GET /`.
    let attack_started = Instant::now();
    let mut raw = raw_h2_idlers(1000, addr).await;
    let mut answering = Vec::new();
    for _ in 0..1000 {
        answering.push(h2_idle(connect_from(ATTACKER, addr).await));
    }
    let mut tricklers = header_tricklers(1000, addr).await;
    let stop_flood = CancellationToken::new();
    let flood = not_found_flood(addr, 8, stop_flood.clone());

    // FACEIO, from 127.0.0.2, at 200 requests a second for 3 s during the attack.
    let report = paced_sender(
        client_from(FACEIO),
        daemon.url(),
        200,
        Duration::from_secs(3),
    )
    .await;
    stop_flood.cancel();
    let flood = flood.await.unwrap();
    println!("404 flood answers: {flood:?}");
    report.assert_unharmed("FACEIO under attack", P99_BOUND);
    // The flood ran into its failed-request budget (429) or the per-source cap.
    assert!(
        flood.iter().any(|&(s, n)| (s == 429 || s == 0) && n > 0),
        "{flood:?}"
    );

    // Every attacking socket is closed by the relay: over the cap at once, the rest
    // after the idle or header timeout.
    raw.append(&mut tricklers);
    let deadline = attack_started + idle + Duration::from_secs(5);
    let still_open = still_open_at(deadline, &mut raw, answering).await;
    assert_eq!(still_open, 0, "attacking connections still open");
    let admin = daemon.admin.unwrap();
    let text = metrics_text(admin).await;
    let closed = |reason: &str| {
        metric(
            &text,
            &format!(
                "faceio_relay_connections_closed_by_relay_total{{listener=\"ingress\",reason=\"{reason}\"}}"
            ),
        )
        .unwrap_or(0.0)
    };
    println!(
        "closed by the relay: per_ip_cap {}, idle {}",
        closed("per_ip_cap"),
        closed("idle")
    );
    assert!(closed("per_ip_cap") >= 2000.0, "{text}");
    assert!(closed("idle") >= 1.0, "{text}");
    open_ingress_connections_until(admin, "no ingress connection left open", |n| n == 0.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_close_after_idle_timeout_but_a_request_in_progress_is_not_cut() {
    let setup = Setup::new();
    let idle = Duration::from_secs(1);
    let daemon = Relayd::start(&config(
        &setup,
        "  idle_timeout: 1s\n  body_timeout: 5s\n  max_connections_per_ip: 1000\n",
        "",
    ))
    .await;
    let addr = daemon.addr;

    let started = Instant::now();
    let mut raw = raw_h2_idlers(1, addr).await.remove(0);
    let answering = h2_idle(connect_from(ATTACKER, addr).await);
    // An HTTP/1 keep-alive connection that made one request and then idles.
    let mut keep_alive = connect_from(ATTACKER, addr).await;
    keep_alive
        .write_all(b"GET / HTTP/1.1\r\nHost: relay\r\n\r\n")
        .await
        .unwrap();
    // A webhook whose body takes twice the idle timeout to arrive.
    let mut slow = connect_from(FACEIO, addr).await;
    let body = serde_json::to_vec(&event("AUTH", "slow-body")).unwrap();
    let head = format!(
        "POST /webhook HTTP/1.1\r\nHost: relay\r\nWWW-Authenticate: Bearer {TOKEN}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    slow.write_all(head.as_bytes()).await.unwrap();
    slow.write_all(&body[..10]).await.unwrap();

    assert!(closed_within(&mut raw, idle * 4).await, "raw HTTP/2 idler");
    let raw_closed = started.elapsed();
    tokio::time::timeout(idle * 4, answering)
        .await
        .expect("an HTTP/2 client that answers PINGs is closed too")
        .unwrap();
    assert!(
        closed_within(&mut keep_alive, idle * 4).await,
        "HTTP/1 keep-alive"
    );
    assert!(
        raw_closed >= idle,
        "closed after {raw_closed:?}, before idle_timeout"
    );

    // The slow webhook's connection was not cut: its body completes and it gets 200.
    tokio::time::sleep_until((started + idle * 2).into()).await;
    slow.write_all(&body[10..]).await.unwrap();
    let mut answer = vec![0u8; 12];
    tokio::time::timeout(WAIT, slow.read_exact(&mut answer))
        .await
        .expect("answered")
        .expect("the connection is still open");
    assert_eq!(
        &answer,
        b"HTTP/1.1 200",
        "{}",
        String::from_utf8_lossy(&answer)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_source_gets_at_most_max_connections_per_ip() {
    let setup = Setup::new();
    let daemon = Relayd::start(&config(
        &setup,
        "  max_connections_per_ip: 3\n  idle_timeout: 30s\n",
        "",
    ))
    .await;
    let addr = daemon.addr;
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut s = connect_from(ATTACKER, addr).await;
        s.write_all(H2_PREFACE_AND_SETTINGS).await.unwrap();
        held.push(s);
    }
    // Wait until the relay has accepted all three.
    let admin = daemon.admin.unwrap();
    open_ingress_connections_until(admin, "three connections open", |n| n >= 3.0).await;
    let mut fourth = connect_from(ATTACKER, addr).await;
    fourth.write_all(H2_PREFACE_AND_SETTINGS).await.unwrap();
    assert!(
        closed_within(&mut fourth, Duration::from_secs(2)).await,
        "a fourth connection from the same address is closed"
    );
    // Another address is served, and so is the first one's again once a slot is free.
    let (status, _) = send(
        &client_from(FACEIO),
        &daemon.url(),
        Some(TOKEN),
        &event("AUTH", "other-source"),
    )
    .await;
    assert_eq!(status, 200);
    drop(held.pop());
    open_ingress_connections_until(admin, "a slot given back", |n| n <= 2.0).await;
    let (status, _) = send(
        &client_from(ATTACKER),
        &daemon.url(),
        Some(TOKEN),
        &event("AUTH", "same-source"),
    )
    .await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_for_other_paths_spend_the_failed_request_budget_but_webhooks_still_pass() {
    let setup = Setup::new();
    let daemon = Relayd::start(&config(
        &setup,
        "  auth_failures: { per_second: 0.1, burst: 5 }\n",
        "",
    ))
    .await;
    let client = client_from(ATTACKER);
    let base = format!("http://{}", daemon.addr);
    let mut statuses = Vec::new();
    for i in 0..8 {
        let r = if i % 2 == 0 {
            client.get(format!("{base}/admin")).send().await
        } else {
            client.get(daemon.url()).send().await
        };
        statuses.push(r.unwrap().status().as_u16());
    }
    assert_eq!(&statuses[..5], &[404, 405, 404, 405, 404], "{statuses:?}");
    assert!(statuses[5..].iter().all(|&s| s == 429), "{statuses:?}");
    // FACEIO behind the same address (a shared NAT) is not locked out: a webhook with the
    // right token never spends the budget.
    let (status, _) = send(&client, &daemon.url(), Some(TOKEN), &event("AUTH", "nat")).await;
    assert_eq!(status, 200);
    // Another source has its own budget.
    let r = client_from(FACEIO)
        .get(format!("{base}/admin"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
}

// ----- TLS ---------------------------------------------------------------------------------

fn tls_connector(pem: &Pem) -> tokio_rustls::TlsConnector {
    use tokio_rustls::rustls;
    let mut roots = rustls::RootCertStore::empty();
    let der = rustls::pki_types::CertificateDer::from_pem_slice(pem.cert.as_bytes()).unwrap();
    roots.add(der).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

use tokio_rustls::rustls::pki_types::pem::PemObject;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_tls_with_h2_idle_and_half_open_connections_do_not_stop_faceio() {
    let setup = Setup::new();
    let pem = self_signed();
    std::fs::write(setup.path("cert.pem"), &pem.cert).unwrap();
    std::fs::write(setup.path("key.pem"), &pem.key).unwrap();
    let daemon = Relayd::start(&config(
        &setup,
        "  idle_timeout: 2s\n  handshake_timeout: 2s\n",
        "tls:\n  cert: cert.pem\n  key: key.pem\n",
    ))
    .await;
    let addr = daemon.addr;
    let started = Instant::now();
    // 500 connections that never start the TLS handshake, and 500 that complete it with
    // ALPN h2, answer PINGs and idle (the per-source cap closes most of them at once).
    let mut half_open = Vec::new();
    for _ in 0..500 {
        half_open.push(connect_from(ATTACKER, addr).await);
    }
    let connector = tls_connector(&pem);
    let mut idlers = Vec::new();
    for _ in 0..500 {
        let tcp = connect_from(ATTACKER, addr).await;
        let connector = connector.clone();
        idlers.push(tokio::spawn(async move {
            let name = tokio_rustls::rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
            if let Ok(tls) = connector.connect(name, tcp).await {
                assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
                let _ = h2_idle(tls).await;
            }
        }));
    }
    let root = reqwest::Certificate::from_pem(pem.cert.as_bytes()).unwrap();
    let faceio = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(root)
        .local_address(FACEIO)
        .timeout(Duration::from_secs(6))
        .build()
        .unwrap();
    let url = format!("https://127.0.0.1:{}/webhook", addr.port());
    let report = paced_sender(faceio, url, 200, Duration::from_secs(3)).await;
    report.assert_unharmed("FACEIO over TLS under attack", P99_BOUND);

    // Closed within the handshake timeout (never started) or the idle timeout (h2 idlers).
    let deadline = started + Duration::from_secs(2) + Duration::from_secs(6);
    let still_open = still_open_at(deadline, &mut half_open, idlers).await;
    assert_eq!(still_open, 0, "attacking connections still open over TLS");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_source_past_its_budget_is_answered_429_and_disconnected() {
    let setup = Setup::new();
    let daemon = Relayd::start(&config(
        &setup,
        "  auth_failures: { per_second: 0.1, burst: 3 }\n  idle_timeout: 60s\n",
        "",
    ))
    .await;
    let tcp = connect_from(ATTACKER, daemon.addr).await;
    let (mut send, conn) = h2::client::handshake(tcp).await.unwrap();
    let conn = tokio::spawn(conn);
    let mut statuses = Vec::new();
    for i in 0..4 {
        let req = axum::http::Request::get(format!("http://{}/probe", daemon.addr))
            .body(())
            .unwrap();
        let (answer, _) = send.send_request(req, true).unwrap();
        statuses.push(answer.await.unwrap().status().as_u16());
        if i < 3 {
            send = send.ready().await.unwrap();
        }
    }
    assert_eq!(statuses, [404, 404, 404, 429]);
    // HTTP/2 has no `Connection: close`: the relay sends GOAWAY and closes, long before
    // the idle timeout (60 s here) would.
    tokio::time::timeout(Duration::from_secs(5), conn)
        .await
        .expect("the connection is closed after the 429")
        .unwrap()
        .ok();
}

#[tokio::test]
async fn http1_answers_tell_the_client_to_stop_reusing_the_connection_before_idle_timeout() {
    let setup = Setup::new();
    let daemon = Relayd::start(&config(&setup, "  idle_timeout: 10s\n", "")).await;
    let answer = client_from(FACEIO)
        .post(daemon.url())
        .header("WWW-Authenticate", format!("Bearer {TOKEN}"))
        .json(&event("AUTH", "keep-alive"))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    assert_eq!(answer.version(), reqwest::Version::HTTP_11);
    // A pool that honours it closes the connection a second before the relay would.
    assert_eq!(answer.headers()["keep-alive"], "timeout=9");
}
