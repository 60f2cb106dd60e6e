//! Micro-benchmarks of the per-event hot pieces (BENCHMARKS.md):
//! payload parse + auth, route matching over 100 rules, Slack template render.
//!
//! `cargo bench -p faceio-relay-bench --bench micro`

use std::hint::black_box;
use std::path::Path;

use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};

use faceio_relay::config::{Config, load_str};
use faceio_relay::destinations::{DestinationKind, SlackDestination};
use faceio_relay::event::verify::{authenticate, verify};
use faceio_relay::routing::Router;
use faceio_relay::store::Delivery;

const ENROLL: &str = r#"{"eventName":"ENROLL","facialId":"b0f1c2d3e4f5a6b7c8d9@fioa-bench","appId":"fioa-bench","clientIp":"203.0.113.7","details":{"timestamp":"2026-11-27","gender":"female","age":31}}"#;
const AUTH: &str = r#"{"eventName":"AUTH","facialId":"b0f1c2d3e4f5a6b7c8d9@fioa-bench","appId":"fioa-bench","clientIp":"203.0.113.7"}"#;

/// A config with `routes` rules over 10 destinations (plus a Slack one with the
/// default template), every kind of match key in use.
fn config(routes: usize) -> Config {
    let mut yaml = String::from(
        "listen: 127.0.0.1:0\nadmin_listen: off\nstore:\n  path: /tmp/unused.db\n\
         applications:\n  - app_id: fioa-other\n    token: other-token-0001\n\
         \x20 - app_id: fioa-bench\n    token: bench-token-5f0c2a9e1d\n\
         destinations:\n  slack:\n    type: slack\n    webhook_url: https://hooks.slack.invalid/services/T/B/x\n",
    );
    for d in 0..10 {
        yaml.push_str(&format!(
            "  api{d}:\n    type: http\n    url: http://127.0.0.1:9/{d}\n"
        ));
    }
    yaml.push_str("routes:\n");
    for r in 0..routes {
        let matcher = match r % 5 {
            0 => format!("{{ eventName: [ENROLL, DELETION], appId: fioa-{r} }}"),
            1 => format!("{{ clientIp: [10.{r}.0.0/16, 192.0.2.{r}] }}"),
            2 => format!("{{ details.gender: female, details.age: {{ min: {r}, max: 200 }} }}"),
            3 => format!("{{ facialId: face-{r}, eventName: AUTH }}"),
            _ => "{ eventName: [ENROLL, AUTH, DELETION] }".to_string(),
        };
        yaml.push_str(&format!(
            "  - name: r{r}\n    match: {matcher}\n    to: [api{}]\n",
            r % 10
        ));
    }
    yaml.push_str("  - name: slack\n    to: [slack]\n");
    load_str(&yaml, Path::new("/tmp/bench.yaml"), &|_| None)
        .unwrap_or_else(|e| panic!("bench config invalid:\n{e}"))
        .0
}

fn parse_and_auth(c: &mut Criterion) {
    let cfg = config(1);
    let header = b"Bearer bench-token-5f0c2a9e1d".as_slice();
    let mut g = c.benchmark_group("ingress");
    for (name, body) in [("ENROLL", ENROLL), ("AUTH", AUTH)] {
        let body = Bytes::from_static(body.as_bytes());
        g.bench_function(format!("authenticate+verify {name}"), |b| {
            b.iter(|| {
                let auth = authenticate(&cfg.applications, Some(black_box(header))).unwrap();
                verify(auth, black_box(body.clone())).unwrap()
            })
        });
    }
    g.finish();
}

fn route_100(c: &mut Criterion) {
    let cfg = config(100);
    let router = Router::new(&cfg);
    let auth = authenticate(&cfg.applications, Some(b"bench-token-5f0c2a9e1d")).unwrap();
    let event = verify(auth, Bytes::from_static(ENROLL.as_bytes())).unwrap();
    assert!(!router.route(event.payload()).is_empty());
    c.bench_function("routing/route over 100 rules", |b| {
        b.iter(|| router.route(black_box(event.payload())))
    });
}

fn render_slack(c: &mut Criterion) {
    let cfg = config(1);
    let slack = cfg
        .destinations
        .iter()
        .find(|d| d.name == "slack")
        .expect("slack destination");
    let DestinationKind::Slack(slack_cfg) = &slack.kind else {
        panic!("not slack");
    };
    let dest = SlackDestination::new(slack, slack_cfg).expect("slack builds");
    let delivery = Delivery {
        id: 1,
        event_id: "019ac2d4-0000-7000-8000-000000000001".into(),
        destination: "slack".into(),
        attempts: 0,
        received_at_ms: 1_795_000_000_000,
        body: Bytes::from_static(ENROLL.as_bytes()),
        claim: None,
    };
    c.bench_function("slack/render default template (ENROLL)", |b| {
        b.iter(|| dest.render(black_box(&delivery)).unwrap())
    });
}

criterion_group!(benches, parse_and_auth, route_100, render_slack);
criterion_main!(benches);
