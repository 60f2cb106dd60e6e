//! Secrets given through `${VARS}` never show up where an operator or a log collector
//! can read them: the daemon's log, `check`, `simulate`, the `dead-letters` commands and
//! the store's error column.

mod common;

use base64::Engine as _;

use common::proc::*;
use common::*;

const FACEIO_TOKEN: &str = "fioTokSECRETa1b2c3d4e5";
const SLACK_PATH: &str = "/services/T0SECRET/B0SECRET/slackSECRETpath77";
const CRM_QUERY_KEY: &str = "crmSECRETquery55";
const CRM_HEADER: &str = "crmSECRETheader33";
const SIGNING_KEY: &str = "signingSECRETkey99";
const DOWN_PATH: &str = "downSECRETpath11";
const DOWN_HEADER: &str = "downSECRETheader44";

const CONFIG: &str = "\
listen: 127.0.0.1:0
admin_listen: 127.0.0.1:0
store:
  path: relay.db
applications:
  - app_id: fioa-test
    token: ${FACEIO_TOKEN}
delivery:
  poll_interval: 200ms
  shutdown_grace: 2s
destinations:
  team-slack:
    type: slack
    webhook_url: ${SLACK_WEBHOOK_URL}
    retry: { max_attempts: 5, initial_delay: 10ms, max_delay: 20ms }
  crm:
    type: http
    url: ${CRM_URL}
    headers: { Authorization: \"Bearer ${CRM_TOKEN}\" }
    signing_secret: ${CRM_SIGNING_SECRET}
    retry: { max_attempts: 5, initial_delay: 10ms, max_delay: 20ms }
  down:
    type: http
    url: ${DOWN_URL}
    headers: { X-Api-Key: \"${DOWN_KEY}\" }
    retry: { max_attempts: 2, initial_delay: 10ms, max_delay: 20ms }
routes:
  - name: everything
    to: [team-slack, crm, down]
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_never_reach_logs_cli_output_or_the_store() {
    let mut slack = Receiver::start(Reply::status(404).body("no_service")).await;
    slack.script([Reply::status(500).body("internal_error")]);
    let mut crm = Receiver::start(Reply::status(401).body("invalid_token")).await;
    crm.script([Reply::status(500).body("try later")]);
    let closed = Gate::start(crm.addr, GateMode::Refuse).await;

    let signing = format!(
        "whsec_{}",
        base64::engine::general_purpose::STANDARD.encode(SIGNING_KEY)
    );
    let slack_url = format!("http://{}{SLACK_PATH}", slack.addr);
    let crm_url = format!("http://{}/ingest?api_key={CRM_QUERY_KEY}", crm.addr);
    let down_url = closed.url(&format!("/{DOWN_PATH}"));
    let env = [
        ("FACEIO_TOKEN", FACEIO_TOKEN),
        ("SLACK_WEBHOOK_URL", slack_url.as_str()),
        ("CRM_URL", crm_url.as_str()),
        ("CRM_TOKEN", CRM_HEADER),
        ("CRM_SIGNING_SECRET", signing.as_str()),
        ("DOWN_URL", down_url.as_str()),
        ("DOWN_KEY", DOWN_HEADER),
        // The documented verbose level: everything at info and debug is checked.
        ("RUST_LOG", "debug"),
    ];
    let secrets = [
        FACEIO_TOKEN,
        SLACK_PATH,
        "slackSECRETpath77",
        CRM_QUERY_KEY,
        CRM_HEADER,
        SIGNING_KEY,
        &signing,
        &signing["whsec_".len()..],
        DOWN_PATH,
        DOWN_HEADER,
    ];

    let setup = Setup::new();
    let config = setup.path("relay.yaml");
    std::fs::write(&config, CONFIG).unwrap();
    let mut outputs = vec![];

    let check = cli_env(&config, &["check"], &env).await;
    assert!(check.ok(), "{}", check.all());
    assert!(check.stdout.contains("team-slack"), "{}", check.stdout);
    outputs.push(("check", check.all()));

    let daemon = Relayd::start_with(&config, &env).await;
    let url = daemon.url();
    let client = reqwest::Client::new();

    // Accepted events, one of them through `simulate`.
    for (name, face) in [("ENROLL", "s-1"), ("AUTH", "s-2")] {
        let (status, _) = send(&client, &url, Some(FACEIO_TOKEN), &event(name, face)).await;
        assert_eq!(status, 200);
    }
    let sim = cli_env(&config, &["simulate", "AUTH", "--url", &url], &env).await;
    assert!(sim.ok(), "{}", sim.all());
    outputs.push(("simulate", sim.all()));
    let accepted = 3;

    // Rejected ones: no token, wrong tokens (one that contains the real one), the real
    // token with a bad body or another application's appId.
    let near_misses = [
        format!("{FACEIO_TOKEN}-but-longer"),
        FACEIO_TOKEN[..FACEIO_TOKEN.len() - 1].to_string(),
        format!("Basic {FACEIO_TOKEN}"),
    ];
    assert_eq!(send(&client, &url, None, &event("AUTH", "x")).await.0, 401);
    for bad in &near_misses {
        let (status, _) = send(&client, &url, Some(bad), &event("AUTH", "x")).await;
        assert_eq!(status, 401, "{bad}");
    }
    let mut other_app = event("AUTH", "x");
    other_app["appId"] = "fioa-other".into();
    assert_eq!(
        send(&client, &url, Some(FACEIO_TOKEN), &other_app).await.0,
        401
    );
    let not_an_event = serde_json::json!({"eventName": "AUTH", "appId": "fioa-test"});
    assert_eq!(
        send(&client, &url, Some(FACEIO_TOKEN), &not_an_event)
            .await
            .0,
        400
    );

    // Every delivery fails for good: 500 then 404 (Slack), 500 then 401 (CRM), refused.
    eventually("every delivery dead", || {
        count(&setup, "dead") == 3 * accepted && count(&setup, "pending") == 0
    })
    .await;
    // The secrets were really in use.
    let to_crm = crm.next().await;
    assert_eq!(
        to_crm.header("authorization").as_deref(),
        Some(format!("Bearer {CRM_HEADER}").as_str())
    );
    assert!(to_crm.header("webhook-signature").is_some());
    slack.next().await;
    assert!(closed.accepted() >= 2 * accepted as usize);

    let list = cli_env(&config, &["dead-letters", "list", "--json"], &env).await;
    assert!(list.ok(), "{}", list.all());
    let rows: Vec<serde_json::Value> = list
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 3 * accepted as usize, "{}", list.stdout);
    let errors: Vec<&str> = rows
        .iter()
        .map(|r| r["last_error"].as_str().unwrap())
        .collect();
    // The errors say what happened, just not with the secrets.
    assert!(
        errors.iter().any(|e| e.contains("no_service")),
        "{errors:?}"
    );
    assert!(
        errors.iter().any(|e| e.contains("invalid_token")),
        "{errors:?}"
    );
    assert!(
        errors
            .iter()
            .any(|e| e.contains("gave up after 2 attempts")),
        "{errors:?}"
    );
    outputs.push(("dead-letters list --json", list.all()));
    let table = cli_env(&config, &["dead-letters", "list"], &env).await;
    outputs.push(("dead-letters list", table.all()));
    for r in &rows {
        let id = r["id"].to_string();
        let show = cli_env(&config, &["dead-letters", "show", &id], &env).await;
        assert!(show.ok(), "{}", show.all());
        outputs.push(("dead-letters show", show.all()));
    }

    // The admin endpoint (metrics carry destination labels and error counts).
    let admin = daemon.admin.expect("admin endpoint is on");
    for path in ["/metrics", "/healthz", "/readyz"] {
        let resp = client
            .get(format!("http://{admin}{path}"))
            .send()
            .await
            .unwrap();
        assert!(resp.status().is_success(), "{path}: {}", resp.status());
        let body = resp.text().await.unwrap();
        if path == "/metrics" {
            assert!(
                body.contains("team-slack"),
                "per-destination metrics:\n{body}"
            );
        }
        outputs.push(("admin endpoint", body));
    }

    let exited = daemon.terminate(WAIT).await;
    assert!(exited.status.success());
    let log = exited.text();
    for logged in [
        "token matches no configured application",
        "no WWW-Authenticate header",
        "is not the application the token belongs to",
        "missing field `facialId`",
        "moved to dead letters",
    ] {
        assert!(log.contains(logged), "{logged:?} not logged:\n{log}");
    }
    outputs.push(("daemon stderr", exited.text()));

    let db = setup.db();
    let mut stmt = db
        .prepare("SELECT last_error FROM deliveries WHERE last_error IS NOT NULL")
        .unwrap();
    let stored: Vec<String> = stmt
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(stored.len(), 3 * accepted as usize);
    outputs.push(("deliveries.last_error", stored.join("\n")));

    let mut leaks = vec![];
    for (place, text) in &outputs {
        for secret in &secrets {
            if text.contains(secret) {
                leaks.push(format!("{secret:?} in {place}"));
            }
        }
    }
    assert!(leaks.is_empty(), "secrets leaked: {leaks:#?}");
}

#[tokio::test]
async fn check_errors_about_secret_values_do_not_echo_them() {
    let setup = Setup::new();
    let config = setup.path("relay.yaml");
    std::fs::write(&config, CONFIG).unwrap();
    // Each secret is malformed, so `check` has to talk about it.
    let env = [
        ("FACEIO_TOKEN", FACEIO_TOKEN),
        ("SLACK_WEBHOOK_URL", "ftp://hooks.example/slackSECRETpath77"),
        ("CRM_URL", "not a url crmSECRETquery55"),
        ("CRM_TOKEN", "crmSECRETheader33\u{1}"),
        ("CRM_SIGNING_SECRET", "whsec_!!signingSECRETkey99"),
        ("DOWN_URL", "http://"),
        ("DOWN_KEY", "downSECRETheader44\n"),
    ];
    let out = cli_env(&config, &["check"], &env).await;
    assert!(!out.ok(), "{}", out.all());
    let all = out.all();
    for path in [
        "destinations.team-slack.webhook_url",
        "destinations.crm.url",
        "destinations.crm.headers.Authorization",
        "destinations.crm.signing_secret",
        "destinations.down.url",
        "destinations.down.headers.X-Api-Key",
    ] {
        assert!(
            all.contains(&format!(": {path}: ")),
            "no error for {path}:\n{all}"
        );
    }
    for secret in [
        "slackSECRETpath77",
        "crmSECRETquery55",
        "crmSECRETheader33",
        "signingSECRETkey99",
        "downSECRETheader44",
        FACEIO_TOKEN,
    ] {
        assert!(!all.contains(secret), "check echoed {secret}:\n{all}");
    }
}
