//! PostgreSQL helpers: a scratch database per test on the local server (created fresh,
//! dropped at the end, so tests run in parallel and leave nothing behind), configs that
//! use it, and a fake HTTP destination that records how many requests for one event are
//! under way at once.
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use sqlx::{Connection, Executor, PgConnection};

use crate::common::{APP, TOKEN};

/// The server's maintenance database (`FACEIO_TEST_PG` overrides it).
pub fn admin_url() -> String {
    std::env::var("FACEIO_TEST_PG")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// A database of its own for one test, dropped (with any connection still open) when
/// this is dropped.
pub struct TestDb {
    pub name: String,
    pub url: String,
}

impl TestDb {
    pub async fn create() -> Self {
        let name = format!("faceio_test_{}", uuid::Uuid::now_v7().simple());
        let mut admin = PgConnection::connect(&admin_url())
            .await
            .expect("the local PostgreSQL server answers (see .ci/run)");
        admin
            .execute(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .await
            .unwrap();
        let _ = admin.close().await;
        let base = admin_url();
        let server = &base[..base.rfind('/').expect("URL has a database")];
        Self {
            url: format!("{server}/{name}"),
            name,
        }
    }

    /// A connection to this database, for looking at the tables.
    pub async fn connect(&self) -> PgConnection {
        PgConnection::connect(&self.url).await.unwrap()
    }

    /// `SELECT COUNT(*) FROM deliveries WHERE state = $1`.
    pub async fn count(&self, state: &str) -> i64 {
        let mut c = self.connect().await;
        let n = sqlx::query_scalar("SELECT COUNT(*) FROM deliveries WHERE state = $1")
            .bind(state)
            .fetch_one(&mut c)
            .await
            .unwrap();
        let _ = c.close().await;
        n
    }

    /// Refuses new connections and ends those open: to this relay, PostgreSQL is down.
    pub async fn cut_off(&self) {
        let mut admin = PgConnection::connect(&admin_url()).await.unwrap();
        admin
            .execute(sqlx::AssertSqlSafe(format!(
                "ALTER DATABASE {} ALLOW_CONNECTIONS false",
                self.name
            )))
            .await
            .unwrap();
        sqlx::query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1")
            .bind(&self.name)
            .execute(&mut admin)
            .await
            .unwrap();
        let _ = admin.close().await;
    }

    /// Undoes [`TestDb::cut_off`].
    pub async fn restore(&self) {
        let mut admin = PgConnection::connect(&admin_url()).await.unwrap();
        admin
            .execute(sqlx::AssertSqlSafe(format!(
                "ALTER DATABASE {} ALLOW_CONNECTIONS true",
                self.name
            )))
            .await
            .unwrap();
        let _ = admin.close().await;
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        // Drop runs inside the test's runtime, which cannot be blocked on: use a thread
        // with its own.
        let dropped = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let mut admin = PgConnection::connect(&admin_url()).await?;
                admin
                    .execute(sqlx::AssertSqlSafe(format!(
                        "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                    )))
                    .await?;
                admin.close().await
            })
        })
        .join();
        if !matches!(dropped, Ok(Ok(()))) {
            eprintln!("warning: could not drop test database {}", self.name);
        }
    }
}

/// Writes `relay.yaml` into `dir` for a relay on `db`, with one application using
/// [`APP`]/[`TOKEN`], and `body` (destinations and routes) appended.
pub fn write_config(dir: &Path, db: &TestDb, poll_interval: &str, body: &str) -> PathBuf {
    let yaml = format!(
        "listen: 127.0.0.1:0\nadmin_listen: 127.0.0.1:0\nwebhook_path: /webhook\n\
         store:\n  backend: postgres\n  url: {url}\n  pool_size: 4\n\
         applications:\n  - app_id: {APP}\n    token: {TOKEN}\n\
         delivery:\n  poll_interval: {poll_interval}\n  shutdown_grace: 2s\n{body}",
        url = db.url
    );
    let path = dir.join("relay.yaml");
    std::fs::write(&path, yaml).unwrap();
    path
}

/// One request the [`Tracker`] receiver answered.
#[derive(Debug, Clone)]
pub struct Arrival {
    pub event_id: String,
    pub at: Instant,
}

#[derive(Default)]
struct TrackerState {
    /// Requests under way per event ID.
    under_way: HashMap<String, usize>,
    /// The most requests for one event ever under way at once.
    max_concurrent: usize,
    arrivals: Vec<Arrival>,
}

struct TrackerShared {
    state: Mutex<TrackerState>,
    /// How long each request is held before the answer (so overlaps would show).
    hold: Duration,
}

/// A fake HTTP destination on 127.0.0.1:0 that answers 200 after `hold`, and records
/// every request's `X-Faceio-Relay-Event-Id` and how many requests for the same event
/// were under way at once.
pub struct Tracker {
    pub addr: SocketAddr,
    shared: Arc<TrackerShared>,
    task: tokio::task::JoinHandle<()>,
}

/// Counts a request as under way until dropped, also when the connection is cut and
/// hyper drops the handler (a relay killed mid-request).
struct UnderWay {
    shared: Arc<TrackerShared>,
    id: String,
}

impl Drop for UnderWay {
    fn drop(&mut self) {
        let mut st = self.shared.state.lock().unwrap();
        if let Some(n) = st.under_way.get_mut(&self.id) {
            *n -= 1;
        }
    }
}

async fn track(State(s): State<Arc<TrackerShared>>, headers: HeaderMap) -> StatusCode {
    let id = headers
        .get("x-faceio-relay-event-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    {
        let mut st = s.state.lock().unwrap();
        let n = st.under_way.entry(id.clone()).or_default();
        *n += 1;
        let n = *n;
        st.max_concurrent = st.max_concurrent.max(n);
        st.arrivals.push(Arrival {
            event_id: id.clone(),
            at: Instant::now(),
        });
    }
    let _under_way = UnderWay {
        shared: Arc::clone(&s),
        id,
    };
    tokio::time::sleep(s.hold).await;
    StatusCode::OK
}

impl Tracker {
    pub async fn start(hold: Duration) -> Self {
        let shared = Arc::new(TrackerShared {
            state: Mutex::new(TrackerState::default()),
            hold,
        });
        let app = axum::Router::new()
            .fallback(track)
            .with_state(Arc::clone(&shared));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Self { addr, shared, task }
    }

    pub fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    pub fn arrivals(&self) -> Vec<Arrival> {
        self.shared.state.lock().unwrap().arrivals.clone()
    }

    /// How many requests each event ID got.
    pub fn per_event(&self) -> HashMap<String, usize> {
        let mut counts = HashMap::new();
        for a in self.arrivals() {
            *counts.entry(a.event_id).or_default() += 1;
        }
        counts
    }

    pub fn max_concurrent(&self) -> usize {
        self.shared.state.lock().unwrap().max_concurrent
    }
}

impl Drop for Tracker {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Waits (checking every 50 ms) until `check` holds, failing after `limit`.
pub async fn within<F, Fut>(limit: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `host:port` of the PostgreSQL server in [`admin_url`].
fn server_addr() -> String {
    let base = admin_url();
    let after_scheme = &base[base.find("://").map_or(0, |i| i + 3)..];
    let authority = after_scheme.split('/').next().unwrap_or(after_scheme);
    authority
        .rsplit('@')
        .next()
        .unwrap_or(authority)
        .to_string()
}

/// A TCP proxy in front of the PostgreSQL server whose connections can be made to hang:
/// after [`FreezingProxy::freeze`], nothing more passes through the connections open
/// then, but both of their ends stay open (a network path that stops answering without
/// failing: PostgreSQL keeps those sessions, and their locks). Connections opened later
/// pass as usual.
pub struct FreezingProxy {
    pub port: u16,
    /// Cancelled by `freeze`; each connection watches the token current when it opened.
    freeze: Arc<Mutex<tokio_util::sync::CancellationToken>>,
    stop: tokio_util::sync::CancellationToken,
}

impl FreezingProxy {
    pub async fn start() -> Self {
        use tokio_util::sync::CancellationToken;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let freeze = Arc::new(Mutex::new(CancellationToken::new()));
        let stop = CancellationToken::new();
        let upstream = server_addr();
        let (freezes, stops) = (Arc::clone(&freeze), stop.clone());
        tokio::spawn(async move {
            loop {
                let mut client = tokio::select! {
                    accepted = listener.accept() => accepted.unwrap().0,
                    () = stops.cancelled() => return,
                };
                let frozen = freezes.lock().unwrap().clone();
                let stop = stops.clone();
                let upstream = upstream.clone();
                tokio::spawn(async move {
                    let Ok(mut server) = tokio::net::TcpStream::connect(&upstream).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => return,
                        () = frozen.cancelled() => {}
                        () = stop.cancelled() => return,
                    }
                    // Frozen: both ends stay open, nothing passes.
                    stop.cancelled().await;
                    drop((client, server));
                });
            }
        });
        Self { port, freeze, stop }
    }

    /// `db`'s URL through this proxy.
    pub fn url(&self, db: &TestDb) -> String {
        db.url
            .replacen(&server_addr(), &format!("127.0.0.1:{}", self.port), 1)
    }

    /// Every connection open now hangs from here on.
    pub fn freeze(&self) {
        let mut current = self.freeze.lock().unwrap();
        current.cancel();
        *current = tokio_util::sync::CancellationToken::new();
    }
}

impl Drop for FreezingProxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}
