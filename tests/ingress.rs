//! Ingress: every answer the sender can get, and that 200 means stored.

mod common;

use common::*;
use serde_json::json;
use std::time::Duration;

fn audit_only() -> &'static str {
    "destinations:\n  audit:\n    type: file\n    path: events.jsonl\nroutes:\n  - to: [audit]\n"
}

async fn raw(
    relay: &TestRelay,
    method: reqwest::Method,
    path: &str,
    headers: &[(&str, &str)],
    body: impl Into<reqwest::Body>,
) -> (u16, serde_json::Value) {
    let url = relay.url.replace("/webhook", path);
    let mut req = relay.client.request(method, url).body(body);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(serde_json::Value::Null))
}

fn body(e: &serde_json::Value) -> String {
    e.to_string()
}

#[tokio::test]
async fn accepted_event_is_stored_before_the_200() {
    let setup = Setup::new();
    let relay = TestRelay::start(setup.config(audit_only())).await;
    let (status, answer) = relay.send(&event("ENROLL", "face-1")).await;
    assert_eq!(status, 200);
    let id = answer["id"]
        .as_str()
        .expect("answer carries the event id")
        .to_string();
    // Checked right after the answer, from another connection: the row is already there.
    let (name, payload): (String, String) = setup
        .db()
        .query_row(
            "SELECT event_name, payload FROM events WHERE id = ?1",
            [&id],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!(name, "ENROLL");
    assert_eq!(
        payload,
        body(&event("ENROLL", "face-1")),
        "body stored byte for byte"
    );
    relay.shutdown().await;
}

#[tokio::test]
async fn tokens_are_checked_and_never_explained() {
    let setup = Setup::new();
    let relay = TestRelay::start(setup.config(audit_only())).await;
    let e = body(&event("AUTH", "face-1"));
    let ct = ("content-type", "application/json");

    let cases: Vec<Vec<(&str, &str)>> = vec![
        vec![ct], // no header
        vec![ct, ("www-authenticate", "Bearer wrong-token")],
        vec![ct, ("www-authenticate", "Basic dG9rZW4=")],
    ];
    let mut answers = vec![];
    for headers in cases {
        let (status, answer) = raw(
            &relay,
            reqwest::Method::POST,
            "/webhook",
            &headers,
            e.clone(),
        )
        .await;
        assert_eq!(status, 401);
        answers.push(answer);
    }
    assert!(
        answers.windows(2).all(|w| w[0] == w[1]),
        "answers must not differ by cause: {answers:?}"
    );

    // Scheme in any case, and a bare token, are accepted.
    for auth in [
        format!("bearer {TOKEN}"),
        format!("BEARER {TOKEN}"),
        TOKEN.to_string(),
    ] {
        let (status, _) = raw(
            &relay,
            reqwest::Method::POST,
            "/webhook",
            &[ct, ("www-authenticate", &auth)],
            e.clone(),
        )
        .await;
        assert_eq!(status, 200, "{auth}");
    }
    relay.shutdown().await;
}

#[tokio::test]
async fn payload_app_id_must_be_the_tokens_application() {
    let setup = Setup::new();
    let relay = TestRelay::start(setup.config(audit_only())).await;
    let mut e = event("AUTH", "face-1");
    e["appId"] = json!("some-other-app");
    let (status, _) = relay.send(&e).await;
    assert_eq!(status, 401);
    relay.shutdown().await;
}

#[tokio::test]
async fn malformed_requests_get_precise_answers() {
    let setup = Setup::new();
    let relay = TestRelay::start(setup.config(audit_only())).await;
    let auth = format!("Bearer {TOKEN}");
    let ok_headers = [
        ("content-type", "application/json"),
        ("www-authenticate", auth.as_str()),
    ];

    let (s, a) = raw(
        &relay,
        reqwest::Method::POST,
        "/webhook",
        &ok_headers,
        "{not json",
    )
    .await;
    assert_eq!(s, 400);
    assert_eq!(a["error"], "invalid_payload");

    let (s, a) = raw(
        &relay,
        reqwest::Method::POST,
        "/webhook",
        &ok_headers,
        r#"{"eventName":"AUTH","appId":"fioa-test","clientIp":"1.2.3.4"}"#,
    )
    .await;
    assert_eq!(s, 400);
    assert!(a["message"].as_str().unwrap().contains("facialId"), "{a}");

    let (s, _) = raw(
        &relay,
        reqwest::Method::POST,
        "/webhook",
        &ok_headers,
        r#"{"eventName":"AUTH","facialId":7,"appId":"fioa-test","clientIp":"1.2.3.4"}"#,
    )
    .await;
    assert_eq!(s, 400, "wrong type");

    let deep = "[".repeat(100_000) + &"]".repeat(100_000);
    let (s, _) = raw(&relay, reqwest::Method::POST, "/webhook", &ok_headers, deep).await;
    // 100k brackets are 200 KB, over the 64 KiB limit: either way never a 200 or a crash.
    assert!(s == 400 || s == 413, "{s}");
    let deep = "[".repeat(20_000) + &"]".repeat(20_000);
    let (s, _) = raw(&relay, reqwest::Method::POST, "/webhook", &ok_headers, deep).await;
    assert_eq!(s, 400, "deep nesting under the size limit");

    let (s, _) = raw(
        &relay,
        reqwest::Method::POST,
        "/webhook",
        &[
            ("content-type", "text/plain"),
            ("www-authenticate", auth.as_str()),
        ],
        body(&event("AUTH", "f")),
    )
    .await;
    assert_eq!(s, 415);

    let (s, a) = raw(&relay, reqwest::Method::GET, "/webhook", &ok_headers, "").await;
    assert_eq!(s, 405);
    assert_eq!(a["error"], "method_not_allowed");

    let (s, _) = raw(
        &relay,
        reqwest::Method::POST,
        "/elsewhere",
        &ok_headers,
        body(&event("AUTH", "f")),
    )
    .await;
    assert_eq!(s, 404);

    let big = json!({"eventName":"AUTH","facialId":"f","appId":"fioa-test","clientIp":"1.2.3.4",
        "pad": "x".repeat(70 * 1024)});
    let (s, _) = raw(
        &relay,
        reqwest::Method::POST,
        "/webhook",
        &ok_headers,
        big.to_string(),
    )
    .await;
    assert_eq!(s, 413);

    // A chunked body (no Content-Length) over the limit is cut off too.
    let chunks = futures_util::stream::iter(
        (0..100).map(|_| Ok::<_, std::io::Error>(bytes::Bytes::from(vec![b' '; 1024]))),
    );
    let (s, _) = raw(
        &relay,
        reqwest::Method::POST,
        "/webhook",
        &ok_headers,
        reqwest::Body::wrap_stream(chunks),
    )
    .await;
    assert_eq!(s, 413);

    assert_eq!(stored_events(&setup), 0, "nothing rejected was stored");
    relay.shutdown().await;
}

#[tokio::test]
async fn unknown_event_names_and_extra_fields_are_kept() {
    let setup = Setup::new();
    let relay = TestRelay::start(setup.config(audit_only())).await;
    let mut e = event("FACE_UPDATED", "face-9");
    e["payload"] = json!({"linked": {"customer": 42}});
    let (status, answer) = relay.send(&e).await;
    assert_eq!(status, 200);
    let stored: String = setup
        .db()
        .query_row(
            "SELECT payload FROM events WHERE id = ?1",
            [answer["id"].as_str().unwrap()],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&stored).unwrap(),
        e
    );
    relay.shutdown().await;
}

#[tokio::test]
async fn a_flood_of_bad_tokens_is_cut_off_per_source() {
    let setup = Setup::new();
    let cfg = format!(
        "ingress:\n  auth_failures: {{ per_second: 0.01, burst: 3 }}\n{}",
        audit_only()
    );
    let relay = TestRelay::start(setup.config(&cfg)).await;
    let e = event("AUTH", "f");
    let mut statuses = vec![];
    for _ in 0..5 {
        statuses.push(send(&relay.client, &relay.url, Some("bad"), &e).await.0);
    }
    assert_eq!(statuses, vec![401, 401, 401, 429, 429]);
    // The real sender (right token) is not affected by the budget.
    assert_eq!(relay.send(&e).await.0, 200);
    relay.shutdown().await;
}

#[tokio::test]
async fn allow_ips_rejects_other_sources() {
    let setup = Setup::new();
    let cfg = format!("ingress:\n  allow_ips: [10.0.0.0/8]\n{}", audit_only());
    let relay = TestRelay::start(setup.config(&cfg)).await;
    assert_eq!(relay.send(&event("AUTH", "f")).await.0, 403);
    relay.shutdown().await;

    let setup = Setup::new();
    let cfg = format!("ingress:\n  allow_ips: [127.0.0.1]\n{}", audit_only());
    let relay = TestRelay::start(setup.config(&cfg)).await;
    assert_eq!(relay.send(&event("AUTH", "f")).await.0, 200);
    relay.shutdown().await;
}

#[tokio::test]
async fn slow_headers_are_cut_off_and_do_not_block_others() {
    use tokio::io::AsyncWriteExt;
    let setup = Setup::new();
    let cfg = format!("ingress:\n  header_timeout: 300ms\n{}", audit_only());
    let relay = TestRelay::start(setup.config(&cfg)).await;
    let addr = relay.relay.local_addr();
    let mut slow = tokio::net::TcpStream::connect(addr).await.unwrap();
    slow.write_all(b"POST /webhook HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    // A normal client is served while the slow one dawdles.
    assert_eq!(relay.send(&event("AUTH", "f")).await.0, 200);
    // The slow one is disconnected by the header timeout (read returns EOF or an answer).
    let mut buf = vec![0u8; 1024];
    let n = tokio::time::timeout(WAIT, tokio::io::AsyncReadExt::read(&mut slow, &mut buf))
        .await
        .expect("slow connection closed by the header timeout")
        .unwrap_or(0);
    let text = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(n == 0 || text.starts_with("HTTP/1.1 408"), "{text}");
    relay.shutdown().await;
}

#[tokio::test]
async fn store_failure_answers_503_never_200() {
    let setup = Setup::new();
    let relay = TestRelay::start(setup.config(audit_only())).await;
    assert_eq!(relay.send(&event("AUTH", "before")).await.0, 200);
    // Another process holds the write lock (as a stuck admin command would): the event
    // cannot be made durable within store_timeout, so the answer must be 503.
    let db = setup.db();
    db.execute_batch("BEGIN IMMEDIATE").unwrap();
    let (status, _) = relay.send(&event("AUTH", "blocked")).await;
    assert_eq!(status, 503);
    db.execute_batch("ROLLBACK").unwrap();
    // And it recovers by itself.
    assert_eq!(relay.send(&event("AUTH", "after")).await.0, 200);
    relay.shutdown().await;
}

#[tokio::test]
async fn silent_connections_do_not_hold_the_connection_slots() {
    let setup = Setup::new();
    let cfg = format!(
        "ingress:\n  max_connections: 2\n  header_timeout: 300ms\n{}",
        audit_only()
    );
    let relay = TestRelay::start(setup.config(&cfg)).await;
    let addr = relay.relay.local_addr();
    // Two clients take both slots and send nothing at all.
    let _a = tokio::net::TcpStream::connect(addr).await.unwrap();
    let _b = tokio::net::TcpStream::connect(addr).await.unwrap();
    // The sender still gets its answer: the silent ones are dropped after header_timeout.
    let answered = tokio::time::timeout(WAIT, relay.send(&event("AUTH", "after-silence"))).await;
    assert_eq!(
        answered.expect("answered while silent clients connect").0,
        200
    );
    relay.shutdown().await;
}

#[tokio::test]
async fn a_body_that_is_not_utf8_is_a_400_not_a_503() {
    let setup = Setup::new();
    let relay = TestRelay::start(setup.config(audit_only())).await;
    let auth = format!("Bearer {TOKEN}");
    let mut body =
        br#"{"eventName":"AUTH","facialId":"f","appId":"fioa-test","clientIp":"1.2.3.4","x":""#
            .to_vec();
    body.extend_from_slice(b"\xff\"}");
    let (s, a) = raw(
        &relay,
        reqwest::Method::POST,
        "/webhook",
        &[
            ("content-type", "application/json"),
            ("www-authenticate", auth.as_str()),
        ],
        body,
    )
    .await;
    assert_eq!(s, 400);
    assert_eq!(a["error"], "invalid_payload");
    relay.shutdown().await;
}

/// Reads one HTTP/1.1 answer from a raw connection: the head, then `Content-Length`
/// bytes of body (or up to EOF). Fails after [`WAIT`].
async fn read_answer(conn: &mut tokio::net::TcpStream) -> (String, String) {
    use tokio::io::AsyncReadExt;
    let read = async {
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let text = String::from_utf8_lossy(&got).to_string();
            if let Some((head, body)) = text.split_once("\r\n\r\n") {
                let length = head
                    .lines()
                    .find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        k.eq_ignore_ascii_case("content-length")
                            .then(|| v.trim().parse::<usize>().ok())?
                    })
                    .unwrap_or(usize::MAX);
                if body.len() >= length {
                    return (head.to_string(), body.to_string());
                }
            }
            let n = conn.read(&mut buf).await.unwrap_or(0);
            if n == 0 {
                let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
                return (head.to_string(), body.to_string());
            }
            got.extend_from_slice(&buf[..n]);
        }
    };
    tokio::time::timeout(WAIT, read)
        .await
        .expect("an answer on the raw connection in time")
}

#[tokio::test]
async fn a_body_that_stops_arriving_gets_408_and_is_not_stored() {
    use tokio::io::AsyncWriteExt;
    let setup = Setup::new();
    let cfg = format!("ingress:\n  body_timeout: 300ms\n{}", audit_only());
    let relay = TestRelay::start(setup.config(&cfg)).await;
    let mut conn = tokio::net::TcpStream::connect(relay.relay.local_addr())
        .await
        .unwrap();
    // Valid headers announcing 100 bytes; 10 of them come, then nothing.
    let head = format!(
        "POST /webhook HTTP/1.1\r\nHost: relay\r\nContent-Type: application/json\r\n\
         WWW-Authenticate: Bearer {TOKEN}\r\nContent-Length: 100\r\n\r\n"
    );
    conn.write_all(head.as_bytes()).await.unwrap();
    conn.write_all(br#"{"eventNam"#).await.unwrap();
    let (head, body) = read_answer(&mut conn).await;
    assert!(head.starts_with("HTTP/1.1 408"), "{head}\n\n{body}");
    let answer: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    assert_eq!(answer["error"], "request_timeout", "{body}");
    assert_eq!(stored_events(&setup), 0, "a partial body was stored");
    relay.shutdown().await;
}

#[tokio::test]
async fn past_max_connections_a_client_waits_for_a_free_slot() {
    use tokio::io::AsyncWriteExt;
    let setup = Setup::new();
    let cfg = format!(
        "ingress:\n  max_connections: 1\n  header_timeout: 30s\n{}",
        audit_only()
    );
    let relay = TestRelay::start(setup.config(&cfg)).await;
    // The only slot: a client that has sent half its headers (well within header_timeout).
    let mut holder = tokio::net::TcpStream::connect(relay.relay.local_addr())
        .await
        .unwrap();
    holder
        .write_all(b"POST /webhook HTTP/1.1\r\nHost: relay\r\n")
        .await
        .unwrap();
    // The kernel's accept backlog is first in, first out: the holder is accepted first.
    let mut waiting = tokio::spawn({
        let (client, url) = (relay.client.clone(), relay.url.clone());
        async move { send(&client, &url, Some(TOKEN), &event("AUTH", "queued")).await }
    });
    // Nothing tells from outside that a connection waits in the backlog, so this negative
    // is a short bounded wait: served at once, the request would be answered in a few ms.
    let early = tokio::time::timeout(Duration::from_millis(300), &mut waiting).await;
    assert!(
        early.is_err(),
        "answered while the only connection slot was taken: {early:?}"
    );
    assert_eq!(stored_events(&setup), 0);
    // The slot frees when the holder goes: the waiting request is served.
    drop(holder);
    let (status, answer) = tokio::time::timeout(WAIT, waiting)
        .await
        .expect("answered once the slot was free")
        .unwrap();
    assert_eq!(status, 200, "{answer}");
    assert_eq!(stored_events(&setup), 1);
    relay.shutdown().await;
}

#[tokio::test]
async fn an_app_mismatch_401_is_the_same_answer_as_a_wrong_token() {
    const OTHER_APP: &str = "fioa-other";
    let setup = Setup::new();
    let path = setup.write_config_with_apps(&[(OTHER_APP, "tok-other-98765")], audit_only());
    let (config, _) = faceio_relay::config::load(&path).unwrap_or_else(|e| panic!("{e}"));
    let relay = TestRelay::start(config).await;
    let answer = |token: &'static str, app: &'static str| {
        let (client, url) = (relay.client.clone(), relay.url.clone());
        async move {
            let mut e = event("AUTH", "face-m");
            e["appId"] = json!(app);
            let resp = client
                .post(&url)
                .header("WWW-Authenticate", format!("Bearer {token}"))
                .json(&e)
                .send()
                .await
                .unwrap();
            let status = resp.status().as_u16();
            let ct = resp.headers().get("content-type").cloned();
            (status, ct, resp.bytes().await.unwrap())
        }
    };
    // A valid token of APP, with the other application's appId.
    let mismatch = answer(TOKEN, OTHER_APP).await;
    let wrong_token = answer("not-a-token-of-anyone", APP).await;
    assert_eq!(mismatch.0, 401);
    assert_eq!(
        mismatch, wrong_token,
        "an app mismatch must not be told apart from a wrong token"
    );
    // Both tokens are valid for their own application.
    assert_eq!(relay.send(&event("AUTH", "face-a")).await.0, 200);
    let mut e = event("AUTH", "face-b");
    e["appId"] = json!(OTHER_APP);
    assert_eq!(
        send(&relay.client, &relay.url, Some("tok-other-98765"), &e)
            .await
            .0,
        200
    );
    assert_eq!(stored_events(&setup), 2);
    relay.shutdown().await;
}
