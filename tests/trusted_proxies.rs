//! Behind a reverse proxy: `allow_ips`, the failed-request budget, the per-source cap and
//! the `peer` log field see the real client, named by a trusted proxy's
//! `X-Forwarded-For` or PROXY header (v1 and v2); an untrusted peer gets no say.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use proxy_header::{ProxiedAddress, ProxyHeader};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use common::attack::*;
use common::proc::*;
use common::*;

const CLIENT: &str = "203.0.113.7";
const STRANGER: &str = "198.51.100.1";

fn config(setup: &Setup, ingress: &str) -> std::path::PathBuf {
    setup.write_config(&format!(
        "ingress:\n{ingress}\
         destinations:\n  api:\n    type: http\n    url: http://127.0.0.1:9/unused\n\
         routes:\n  - match: {{ eventName: NOTHING }}\n    to: [api]\n"
    ))
}

/// POSTs an event from `from` with the given `X-Forwarded-For` (if any) and token.
async fn post_via(from: std::net::IpAddr, url: &str, xff: Option<&str>, token: &str) -> u16 {
    let mut req = client_from(from)
        .post(url)
        .header("WWW-Authenticate", format!("Bearer {token}"))
        .json(&event("AUTH", "via-proxy"));
    if let Some(x) = xff {
        req = req.header("X-Forwarded-For", x);
    }
    req.send().await.unwrap().status().as_u16()
}

#[tokio::test]
async fn allow_ips_sees_the_client_a_trusted_proxy_names_and_nobody_else_can_name_one() {
    let setup = Setup::new();
    let daemon = Relayd::start(&config(
        &setup,
        &format!("  trusted_proxies: [127.0.0.1]\n  allow_ips: [{CLIENT}]\n"),
    ))
    .await;
    let url = daemon.url();
    // Through the proxy (127.0.0.1), the allowed client and a stranger.
    assert_eq!(post_via(ATTACKER, &url, Some(CLIENT), TOKEN).await, 200);
    assert_eq!(post_via(ATTACKER, &url, Some(STRANGER), TOKEN).await, 403);
    // A stranger who writes the allowed address into the header himself: the proxy
    // appends the address it saw, and that one (the rightmost) counts.
    let spoofed = format!("{CLIENT}, {STRANGER}");
    assert_eq!(post_via(ATTACKER, &url, Some(&spoofed), TOKEN).await, 403);
    // Not through the proxy: 127.0.0.2 is not trusted, its header is ignored.
    assert_eq!(post_via(FACEIO, &url, Some(CLIENT), TOKEN).await, 403);
    daemon.wait_log(&format!("peer={STRANGER}")).await;
}

#[tokio::test]
async fn the_failed_request_budget_is_kept_per_forwarded_client() {
    let setup = Setup::new();
    let daemon = Relayd::start(&config(
        &setup,
        "  trusted_proxies: [127.0.0.0/30]\n  auth_failures: { per_second: 0.1, burst: 3 }\n",
    ))
    .await;
    let url = daemon.url();
    let mut statuses = Vec::new();
    for _ in 0..5 {
        statuses.push(post_via(ATTACKER, &url, Some(STRANGER), "wrong").await);
    }
    assert_eq!(statuses, [401, 401, 401, 429, 429]);
    // Another client behind the same proxy has its own budget: the proxy is not one
    // bucket for the whole internet.
    assert_eq!(post_via(ATTACKER, &url, Some(CLIENT), "wrong").await, 401);
    // Two trusted hops (127.0.0.2 forwards to 127.0.0.1's proxy): still the client.
    let chain = format!("{STRANGER}, 127.0.0.2");
    assert_eq!(post_via(ATTACKER, &url, Some(&chain), "wrong").await, 429);
}

/// Sends `header` then a webhook over HTTP/1.1 on `stream`; the answer's status.
async fn webhook_after(mut stream: TcpStream, header: &[u8]) -> u16 {
    let body = serde_json::to_vec(&event("AUTH", "proxied")).unwrap();
    let request = format!(
        "POST /webhook HTTP/1.1\r\nHost: relay\r\nWWW-Authenticate: Bearer {TOKEN}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let mut all = header.to_vec();
    all.extend_from_slice(request.as_bytes());
    all.extend_from_slice(&body);
    stream.write_all(&all).await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(WAIT, stream.read_to_end(&mut answer)).await;
    let text = String::from_utf8_lossy(&answer);
    text.split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

fn v1(client: &str, relay: SocketAddr) -> Vec<u8> {
    format!(
        "PROXY TCP4 {client} {} 40000 {}\r\n",
        relay.ip(),
        relay.port()
    )
    .into_bytes()
}

fn v2(client: &str, relay: SocketAddr) -> Vec<u8> {
    let source: SocketAddr = format!("{client}:40000").parse().unwrap();
    let mut buf = Vec::new();
    ProxyHeader::with_address(ProxiedAddress::stream(source, relay))
        .encode_v2(&mut buf)
        .unwrap();
    buf
}

#[tokio::test]
async fn a_proxy_protocol_header_from_a_trusted_proxy_names_the_client() {
    let setup = Setup::new();
    let daemon = Relayd::start(&config(
        &setup,
        &format!(
            "  trusted_proxies: [127.0.0.1]\n  proxy_protocol: true\n  allow_ips: [{CLIENT}]\n"
        ),
    ))
    .await;
    let addr = daemon.addr;
    for (version, header) in [("v1", v1 as fn(&str, SocketAddr) -> Vec<u8>), ("v2", v2)] {
        let allowed =
            webhook_after(connect_from(ATTACKER, addr).await, &header(CLIENT, addr)).await;
        assert_eq!(allowed, 200, "PROXY {version} naming the allowed client");
        let refused =
            webhook_after(connect_from(ATTACKER, addr).await, &header(STRANGER, addr)).await;
        assert_eq!(refused, 403, "PROXY {version} naming a stranger");
    }
    // A trusted proxy's connection without the header is refused (it was promised).
    let bare = webhook_after(connect_from(ATTACKER, addr).await, b"").await;
    assert_eq!(bare, 0, "no PROXY header from a proxy that must send one");
    // An untrusted peer's PROXY header is not read as one: it is a bad HTTP request.
    let status = webhook_after(connect_from(FACEIO, addr).await, &v1(CLIENT, addr)).await;
    assert!(status == 400 || status == 0, "got {status}");
}

#[tokio::test]
async fn the_per_source_cap_counts_the_client_a_proxy_protocol_header_names() {
    let setup = Setup::new();
    let daemon = Relayd::start(&config(
        &setup,
        "  trusted_proxies: [127.0.0.1]\n  proxy_protocol: true\n  max_connections_per_ip: 2\n  idle_timeout: 30s\n",
    ))
    .await;
    let addr = daemon.addr;
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = connect_from(ATTACKER, addr).await;
        s.write_all(&v2(STRANGER, addr)).await.unwrap();
        s.write_all(H2_PREFACE_AND_SETTINGS).await.unwrap();
        held.push(s);
    }
    let admin = daemon.admin.unwrap();
    open_ingress_connections_until(admin, "two connections open", |n| n >= 2.0).await;
    // A third for the same client is closed; another client through the same proxy is
    // served.
    let mut third = connect_from(ATTACKER, addr).await;
    third.write_all(&v2(STRANGER, addr)).await.unwrap();
    third.write_all(H2_PREFACE_AND_SETTINGS).await.unwrap();
    assert!(closed_within(&mut third, Duration::from_secs(2)).await);
    let other = webhook_after(connect_from(ATTACKER, addr).await, &v2(CLIENT, addr)).await;
    assert_eq!(other, 200);
}
