//! HTTPS on the ingress: handshake, ALPN, certificate reload without dropping
//! connections, and what a failed reload or a stalled handshake does.

mod common;

use std::time::{Duration, Instant};

use common::*;
use faceio_relay::Relay;
use tokio::io::AsyncReadExt;

const AUDIT: &str =
    "destinations:\n  audit:\n    type: file\n    path: events.jsonl\nroutes:\n  - to: [audit]\n";

/// Writes `pem` where the relay's `tls:` points (replacing what was there).
fn install(setup: &Setup, pem: &Pem) {
    std::fs::write(setup.path("cert.pem"), &pem.cert).unwrap();
    std::fs::write(setup.path("key.pem"), &pem.key).unwrap();
}

/// Starts a relay with `tls:` on the certificate `pem` and the given extra YAML.
async fn start(setup: &Setup, pem: &Pem, extra: &str) -> Relay {
    install(setup, pem);
    let body = format!("tls:\n  cert: cert.pem\n  key: key.pem\n{extra}{AUDIT}");
    Relay::start(setup.config(&body))
        .await
        .expect("relay starts")
}

/// A client that trusts `pem` and nothing else; offers h2 and http/1.1 by ALPN.
fn client_trusting(pem: &Pem) -> reqwest::ClientBuilder {
    let root = reqwest::Certificate::from_pem(pem.cert.as_bytes()).unwrap();
    reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(root)
        .timeout(WAIT)
}

fn https(relay: &Relay) -> String {
    format!("https://127.0.0.1:{}/webhook", relay.local_addr().port())
}

/// POSTs an authenticated event; the answer's status and HTTP version, or the error.
async fn post(
    client: &reqwest::Client,
    url: &str,
    facial_id: &str,
) -> reqwest::Result<(u16, reqwest::Version, serde_json::Value)> {
    let resp = client
        .post(url)
        .header("WWW-Authenticate", format!("Bearer {TOKEN}"))
        .json(&event("AUTH", facial_id))
        .send()
        .await?;
    let version = resp.version();
    let status = resp.status().as_u16();
    Ok((status, version, resp.json().await.unwrap_or_default()))
}

#[tokio::test]
async fn https_post_is_stored_over_h2_or_http1_by_alpn() {
    let setup = Setup::new();
    let pem = self_signed();
    let relay = start(&setup, &pem, "").await;

    let h2 = client_trusting(&pem).build().unwrap();
    let (status, version, answer) = post(&h2, &https(&relay), "face-h2").await.unwrap();
    assert_eq!(status, 200, "{answer}");
    assert_eq!(version, reqwest::Version::HTTP_2, "h2 chosen by ALPN");
    let id = answer["id"].as_str().expect("answer carries the event id");
    let facial_id: String = setup
        .db()
        .query_row(
            "SELECT json_extract(payload, '$.facialId') FROM events WHERE id = ?1",
            [id],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(facial_id, "face-h2");

    let h1 = client_trusting(&pem).http1_only().build().unwrap();
    let (status, version, _) = post(&h1, &https(&relay), "face-h1").await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(
        version,
        reqwest::Version::HTTP_11,
        "http/1.1 chosen by ALPN"
    );
    assert_eq!(stored_events(&setup), 2);
    relay.shutdown().await;
}

#[tokio::test]
async fn plain_http_to_the_tls_port_fails() {
    let setup = Setup::new();
    let pem = self_signed();
    let relay = start(&setup, &pem, "").await;
    let url = format!("http://{}/webhook", relay.local_addr());
    let client = reqwest::Client::builder().timeout(WAIT).build().unwrap();
    let result = post(&client, &url, "face-plain").await;
    assert!(result.is_err(), "plain HTTP got an answer: {result:?}");
    assert_eq!(stored_events(&setup), 0);
    relay.shutdown().await;
}

#[tokio::test]
async fn reload_serves_the_new_certificate_and_keeps_open_connections() {
    let setup = Setup::new();
    let old = self_signed();
    let relay = start(&setup, &old, "").await;
    let url = https(&relay);

    // One keep-alive client per protocol; each opens its connection before the reload.
    let old_h2 = client_trusting(&old).build().unwrap();
    let old_h1 = client_trusting(&old).http1_only().build().unwrap();
    assert_eq!(post(&old_h2, &url, "before-h2").await.unwrap().0, 200);
    assert_eq!(post(&old_h1, &url, "before-h1").await.unwrap().0, 200);

    let new = self_signed();
    install(&setup, &new);
    relay
        .tls_handle()
        .expect("TLS is configured")
        .reload()
        .unwrap();

    // New handshakes get the new certificate: a client trusting only it connects, and a
    // fresh client trusting only the old one is refused.
    let fresh_new = client_trusting(&new).build().unwrap();
    let (status, _, _) = post(&fresh_new, &url, "after-new").await.unwrap();
    assert_eq!(status, 200);
    let fresh_old = client_trusting(&old).build().unwrap();
    let refused = post(&fresh_old, &url, "after-old-fresh").await;
    assert!(
        refused.is_err(),
        "old certificate still served: {refused:?}"
    );

    // The clients that trust only the old certificate still get through, so they are on
    // the connections opened before the reload: nothing was dropped.
    let (status, version, _) = post(&old_h2, &url, "after-h2").await.unwrap();
    assert_eq!((status, version), (200, reqwest::Version::HTTP_2));
    let (status, version, _) = post(&old_h1, &url, "after-h1").await.unwrap();
    assert_eq!((status, version), (200, reqwest::Version::HTTP_11));

    assert_eq!(stored_events(&setup), 5);
    relay.shutdown().await;
}

#[tokio::test]
async fn broken_reload_is_an_error_and_the_old_certificate_keeps_serving() {
    let setup = Setup::new();
    let pem = self_signed();
    let relay = start(&setup, &pem, "").await;
    let handle = relay.tls_handle().unwrap();

    // A renewal that went wrong: the certificate file is cut short.
    let cut = &pem.cert[..pem.cert.len() / 2];
    std::fs::write(setup.path("cert.pem"), cut).unwrap();
    let err = handle.reload().unwrap_err().to_string();
    assert!(
        err.starts_with(&setup.path("cert.pem").display().to_string()),
        "{err}"
    );

    // A key that does not belong to the certificate is refused too.
    install(&setup, &pem);
    std::fs::write(setup.path("key.pem"), self_signed().key).unwrap();
    let err = handle.reload().unwrap_err().to_string();
    assert!(err.contains("does not belong to the certificate"), "{err}");
    assert!(!err.contains("PRIVATE KEY-----\n"), "{err}");

    let client = client_trusting(&pem).build().unwrap();
    let (status, _, _) = post(&client, &https(&relay), "still-served").await.unwrap();
    assert_eq!(status, 200);
    relay.shutdown().await;
}

#[tokio::test]
async fn a_stalled_handshake_is_closed_after_header_timeout_and_frees_its_slot() {
    let setup = Setup::new();
    let pem = self_signed();
    let relay = start(
        &setup,
        &pem,
        "ingress:\n  header_timeout: 300ms\n  max_connections: 1\n",
    )
    .await;

    // Takes the only connection slot and never says a word.
    let started = Instant::now();
    let mut idle = tokio::net::TcpStream::connect(relay.local_addr())
        .await
        .unwrap();

    // A real client waits behind it in the backlog and gets in once the slot is freed.
    let client = client_trusting(&pem).build().unwrap();
    let url = https(&relay);
    let real = tokio::spawn(async move { post(&client, &url, "after-stall").await });

    let mut buf = [0u8; 64];
    let closed = tokio::time::timeout(WAIT, idle.read(&mut buf))
        .await
        .expect("stalled handshake closed in time");
    assert!(matches!(closed, Ok(0) | Err(_)), "{closed:?}");
    assert!(started.elapsed() >= Duration::from_millis(300));

    let (status, _, _) = real.await.unwrap().unwrap();
    assert_eq!(status, 200);
    relay.shutdown().await;
}

#[tokio::test]
async fn start_fails_naming_the_file_when_the_key_does_not_match() {
    let setup = Setup::new();
    let pem = self_signed();
    install(&setup, &pem);
    std::fs::write(setup.path("key.pem"), self_signed().key).unwrap();
    let body = format!("tls:\n  cert: cert.pem\n  key: key.pem\n{AUDIT}");
    let err = Relay::start(setup.config(&body))
        .await
        .err()
        .expect("a mismatched key stops the start")
        .to_string();
    assert!(
        err.starts_with(&setup.path("key.pem").display().to_string()),
        "{err}"
    );
}

#[tokio::test]
async fn a_config_reload_picks_up_a_renewed_certificate() {
    // What `systemctl reload` does after certbot renewed the files in place.
    let setup = Setup::new();
    let old = self_signed();
    let relay = start(&setup, &old, "").await;
    let url = https(&relay);
    let new = self_signed();
    install(&setup, &new);
    let body = format!("tls:\n  cert: cert.pem\n  key: key.pem\n{AUDIT}");
    relay.reload(setup.config(&body)).await.unwrap();
    let fresh_new = client_trusting(&new).build().unwrap();
    assert_eq!(post(&fresh_new, &url, "renewed").await.unwrap().0, 200);
    relay.shutdown().await;
}

#[tokio::test]
async fn simulate_posts_over_https_trusting_a_given_certificate() {
    let setup = Setup::new();
    let pem = self_signed();
    let relay = start(&setup, &pem, "").await;
    let simulate = |extra: Vec<String>| {
        let mut cmd = tokio::process::Command::new(binary());
        cmd.args(["simulate", "ENROLL", "--config"])
            .arg(setup.path("relay.yaml"))
            .args(["--url", &https(&relay)])
            .args(extra);
        cmd.output()
    };
    let cert = setup.path("cert.pem").to_str().unwrap().to_string();
    let trusted = simulate(vec!["--ca-cert".into(), cert]).await.unwrap();
    let stdout = String::from_utf8_lossy(&trusted.stdout);
    assert!(
        trusted.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&trusted.stderr)
    );
    assert!(stdout.contains("HTTP 200"), "{stdout}");
    let untrusted = simulate(vec![]).await.unwrap();
    assert!(
        !untrusted.status.success(),
        "a self-signed certificate is not trusted by default"
    );
    relay.shutdown().await;
}
