//! Hostile clients at the ingress: hundreds of connections trickling their headers,
//! bodies far over `max_body` (declared, chunked, or behind a false Content-Length), and
//! deeply nested JSON. The relay stays responsive, answers 413 / 400, and its memory does
//! not follow the attacker's body size.

mod common;

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use common::faults::*;
use common::proc::*;
use common::*;

/// 100 MiB: what the oversize clients send (or claim to).
const HUGE: usize = 100 << 20;

fn config(setup: &Setup, ingress: &str) -> std::path::PathBuf {
    let receiver_url = "http://127.0.0.1:9/unused";
    setup.write_config(&format!(
        "ingress:\n{ingress}\
         destinations:\n  api:\n    type: http\n    url: {receiver_url}\n\
         routes:\n  - match: {{ eventName: NOTHING }}\n    to: [api]\n"
    ))
}

async fn post_ok(url: &str, face: &str) -> (u16, Duration) {
    let started = Instant::now();
    let (status, _) = send(
        &reqwest::Client::new(),
        url,
        Some(TOKEN),
        &event("AUTH", face),
    )
    .await;
    (status, started.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_header_tricklers_do_not_stop_a_normal_client() {
    let setup = Setup::new();
    // The default `max_connections` (1024) leaves room for 500 slow clients; the header
    // timeout (shortened here to keep the test short) then closes them. The per-source
    // cap (which would close most of them at once: tests/ingress_limits.rs) is raised so
    // the header timeout is what this test sees.
    let daemon = Relayd::start(&config(
        &setup,
        "  header_timeout: 2s\n  max_connections_per_ip: 1000\n",
    ))
    .await;
    let mut slow = Vec::new();
    for _ in 0..500 {
        let mut s = TcpStream::connect(daemon.addr).await.unwrap();
        s.write_all(b"P").await.unwrap();
        slow.push(s);
    }
    let header = b"OST /webhook HTTP/1.1\r\nHost: relay\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    let trickle_started = Instant::now();
    let mut worst = Duration::ZERO;
    let mut answered = 0;
    // One byte per connection every 20 ms; a normal client posts in between.
    for (i, byte) in header.iter().cycle().enumerate() {
        if trickle_started.elapsed() > Duration::from_millis(1500) {
            break;
        }
        for s in &mut slow {
            let _ = s.write_all(std::slice::from_ref(byte)).await;
        }
        if i % 10 == 0 {
            let (status, took) = post_ok(&daemon.url(), &format!("normal-{i}")).await;
            assert_eq!(status, 200);
            worst = worst.max(took);
            answered += 1;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!(
        "500 header tricklers: {answered} normal requests answered, slowest {:?}",
        worst
    );
    assert!(answered >= 5);
    assert!(
        worst < Duration::from_secs(1),
        "normal client waited {worst:?}"
    );

    // The tricklers are cut off by the header timeout (2 s), not served forever.
    let deadline = trickle_started + Duration::from_secs(2) + WAIT;
    let mut closed = 0;
    for s in &mut slow {
        let mut buf = [0u8; 512];
        let left = deadline.saturating_duration_since(Instant::now());
        // Closed: EOF, a reset, or an error answer (408/431) followed by EOF.
        if let Ok(r) = tokio::time::timeout(left, s.read(&mut buf)).await {
            match r {
                Ok(0) | Err(_) => closed += 1,
                Ok(_) => {
                    let _ = tokio::time::timeout(left, s.read_to_end(&mut Vec::new())).await;
                    closed += 1;
                }
            }
        }
    }
    assert_eq!(closed, 500, "slow connections closed by the header timeout");
    daemon.terminate(WAIT).await;
}

/// The first line of the answer on a raw connection, reading while `body` is written.
async fn raw_exchange(addr: std::net::SocketAddr, head: String, body: impl BodySource) -> String {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut rd, mut wr) = stream.into_split();
    let writer = tokio::spawn(async move {
        if wr.write_all(head.as_bytes()).await.is_err() {
            return;
        }
        body.write(&mut wr).await;
    });
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    let read = tokio::time::timeout(WAIT, async {
        loop {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    answer.extend_from_slice(&buf[..n]);
                    if answer.windows(2).any(|w| w == b"\r\n") {
                        break;
                    }
                }
            }
        }
    })
    .await;
    assert!(read.is_ok(), "no answer in time");
    writer.abort();
    let text = String::from_utf8_lossy(&answer).to_string();
    text.lines().next().unwrap_or("").to_string()
}

trait BodySource: Send + 'static {
    fn write(
        self,
        wr: &mut tokio::net::tcp::OwnedWriteHalf,
    ) -> impl std::future::Future<Output = ()> + Send;
}

/// `len` bytes of `{"a":"xxxx…`, raw or as HTTP chunks of 64 KiB.
struct Junk {
    len: usize,
    chunked: bool,
}

impl BodySource for Junk {
    async fn write(self, wr: &mut tokio::net::tcp::OwnedWriteHalf) {
        let chunk = vec![b'x'; 64 << 10];
        let mut sent = 0;
        let start: &[u8] = if self.chunked {
            b"6\r\n{\"a\":\"\r\n"
        } else {
            b"{\"a\":\""
        };
        if wr.write_all(start).await.is_err() {
            return;
        }
        while sent < self.len {
            let r = if self.chunked {
                let mut framed = format!("{:x}\r\n", chunk.len()).into_bytes();
                framed.extend_from_slice(&chunk);
                framed.extend_from_slice(b"\r\n");
                wr.write_all(&framed).await
            } else {
                wr.write_all(&chunk).await
            };
            if r.is_err() {
                return;
            }
            sent += chunk.len();
        }
        if self.chunked {
            let _ = wr.write_all(b"0\r\n\r\n").await;
        }
    }
}

fn head(extra: &str) -> String {
    format!(
        "POST /webhook HTTP/1.1\r\nHost: relay\r\nContent-Type: application/json\r\n\
         WWW-Authenticate: Bearer {TOKEN}\r\n{extra}\r\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_megabyte_bodies_get_413_without_the_memory_to_match() {
    let setup = Setup::new();
    let daemon = Relayd::start(&config(&setup, "  max_body: 64KiB\n")).await;
    let pid = daemon.pid();
    // Warm up (first connection, first request) before measuring.
    assert_eq!(post_ok(&daemon.url(), "warm").await.0, 200);
    let rss_before = status_kb(pid, "VmRSS:");
    reset_peak_rss(pid);

    let cases = [
        // Declared: 100 MiB in Content-Length (and the body starts coming).
        (
            "declared 100 MiB",
            format!("Content-Length: {HUGE}\r\n"),
            false,
            " 413 ",
        ),
        // Chunked: no length given, 100 MiB of chunks.
        (
            "chunked 100 MiB",
            "Transfer-Encoding: chunked\r\n".into(),
            true,
            " 413 ",
        ),
        // A false Content-Length under the limit followed by 100 MiB: the relay reads only
        // what was declared (not JSON: 400) and treats the rest as a broken next request.
        (
            "false Content-Length",
            "Content-Length: 1000\r\n".into(),
            false,
            " 400 ",
        ),
    ];
    for (what, header, chunked, status) in cases {
        let junk = Junk { len: HUGE, chunked };
        let answer = raw_exchange(daemon.addr, head(&header), junk).await;
        assert!(answer.contains(status), "{what}: {answer}");
    }

    let peak = status_kb(pid, "VmHWM:");
    let growth_mb = peak.saturating_sub(rss_before) as f64 / 1024.0;
    println!(
        "oversize bodies: 413 declared, 413 chunked, 400 false length; RSS {:.1} MB before, peak {:.1} MB (+{growth_mb:.1} MB)",
        rss_before as f64 / 1024.0,
        peak as f64 / 1024.0
    );
    assert!(
        growth_mb < 16.0,
        "RSS grew {growth_mb:.1} MB for 100 MiB bodies"
    );
    // Still serving.
    assert_eq!(post_ok(&daemon.url(), "after").await.0, 200);
    daemon.terminate(WAIT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_nested_100000_deep_gets_400() {
    let setup = Setup::new();
    // Room for the nesting itself: the body limit must not be what refuses it.
    let daemon = Relayd::start(&config(&setup, "  max_body: 1MiB\n")).await;
    let deep = 100_000;
    let arrays = format!("{}{}", "[".repeat(deep), "]".repeat(deep));
    let objects = format!("{}1{}", "{\"a\":".repeat(deep), "}".repeat(deep));
    let bodies = [
        // Where the payload's fields are, and as the whole body. (Under keys the relay
        // does not read: the next test.)
        format!(
            r#"{{"eventName":"AUTH","facialId":"f","appId":"{APP}","clientIp":"1.2.3.4","details":{arrays}}}"#
        ),
        format!(r#"{{"eventName":{arrays},"facialId":"f","appId":"{APP}","clientIp":"1.2.3.4"}}"#),
        arrays.clone(),
        objects.clone(),
    ];
    assert_all_400(&daemon, &bodies).await;
    assert_eq!(post_ok(&daemon.url(), "after").await.0, 200);
    daemon.terminate(WAIT).await;
}

/// serde skips a field it does not read without any depth limit; the relay must still
/// refuse a 100,000-deep value under a key it does not read (it used to accept, store and
/// forward it, and its own Slack destination then dead-lettered it as "stored payload is
/// not JSON").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_nested_100000_deep_under_an_unknown_key_gets_400() {
    let setup = Setup::new();
    let daemon = Relayd::start(&config(&setup, "  max_body: 1MiB\n")).await;
    let deep = 100_000;
    let arrays = format!("{}{}", "[".repeat(deep), "]".repeat(deep));
    let objects = format!("{}1{}", "{\"a\":".repeat(deep), "}".repeat(deep));
    let bodies = [
        format!(
            r#"{{"eventName":"AUTH","facialId":"f","appId":"{APP}","clientIp":"1.2.3.4","extra":{objects}}}"#
        ),
        format!(
            r#"{{"eventName":"AUTH","facialId":"f","appId":"{APP}","clientIp":"1.2.3.4","payload":{arrays}}}"#
        ),
        format!(
            r#"{{"eventName":"AUTH","facialId":"f","appId":"{APP}","clientIp":"1.2.3.4","details":{objects}}}"#
        ),
    ];
    assert_all_400(&daemon, &bodies).await;
    daemon.terminate(WAIT).await;
}

async fn assert_all_400(daemon: &Relayd, bodies: &[String]) {
    let client = reqwest::Client::new();
    for body in bodies {
        let resp = client
            .post(daemon.url())
            .header("WWW-Authenticate", format!("Bearer {TOKEN}"))
            .header("Content-Type", "application/json")
            .body(body.clone())
            .send()
            .await
            .expect("an answer, not a crash");
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        assert_eq!(status, 400, "{}…: {text}", &body[..90]);
        assert!(text.contains("invalid_payload"), "{text}");
    }
}
