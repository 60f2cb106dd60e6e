//! The config loader through its public API, on the fixtures in `tests/config/`.
//!
//! Every fixture states what it expects in header comments:
//! - `# expect: LINE:COL KEY.PATH: message fragment` — an error (invalid fixtures); the
//!   number of errors must equal the number of these lines. An empty key path is written
//!   as nothing between the position and `: `.
//! - `# warn: LINE:COL KEY.PATH: message fragment` — a warning (valid fixtures), counted
//!   the same way.

use std::path::{Path, PathBuf};
use std::time::Duration;

use faceio_relay::config::{ConfigError, ConfigErrors, Warning, load, load_str};
use faceio_relay::destinations::DestinationKind;

/// The environment the fixtures are loaded with.
fn test_env(name: &str) -> Option<String> {
    let v = match name {
        "FACEIO_TOKEN" => "tok-faceio-7f3a9c",
        "SLACK_WEBHOOK_URL" => "https://hooks.slack.com/services/T000/B000/slacksecret42",
        "CRM_TOKEN" => "crm-bearer-d41d8c",
        "CRM_SIGNING_SECRET" => "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        "CREDENTIALS_DIRECTORY" => "tokens",
        "EMPTY" => "",
        _ => return None,
    };
    Some(v.to_owned())
}

/// Values of `test_env` that are secrets and must never be printed.
const SECRETS: &[&str] = &[
    "tok-faceio-7f3a9c",
    "slacksecret42",
    "crm-bearer-d41d8c",
    "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
    "file-token-b5678",
];

fn no_env(_: &str) -> Option<String> {
    None
}

/// Makes the fixtures' token files readable by their owner only, as a real one must be
/// (git checks them out 0644, which the loader warns about).
fn private_token_files() {
    use std::os::unix::fs::PermissionsExt as _;
    for kind in ["valid", "invalid"] {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/config")
            .join(kind)
            .join("tokens");
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
    }
}

fn fixtures(kind: &str) -> Vec<PathBuf> {
    private_token_files();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/config")
        .join(kind);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no fixtures in {}", dir.display());
    files
}

#[derive(Debug)]
struct Expected {
    line: u64,
    column: u64,
    path: String,
    fragment: String,
}

/// The `# <tag>:` lines of a fixture.
fn expectations(text: &str, tag: &str) -> Vec<Expected> {
    let prefix = format!("# {tag}:");
    text.lines()
        .filter_map(|l| l.strip_prefix(&prefix))
        .map(|rest| {
            let rest = rest.trim_start();
            let (pos, rest) = rest.split_once(' ').expect("`LINE:COL path: fragment`");
            let (line, column) = pos.split_once(':').expect("LINE:COL");
            let (path, fragment) = rest.split_once(": ").expect("`path: fragment`");
            Expected {
                line: line.parse().expect("line"),
                column: column.parse().expect("column"),
                path: path.trim().to_owned(),
                fragment: fragment.trim().to_owned(),
            }
        })
        .collect()
}

/// Line, column, path and message of an error or a warning.
trait Diag {
    fn parts(&self) -> (u64, u64, &str, &str);
}
impl Diag for ConfigError {
    fn parts(&self) -> (u64, u64, &str, &str) {
        (self.line, self.column, &self.path, &self.message)
    }
}
impl Diag for Warning {
    fn parts(&self) -> (u64, u64, &str, &str) {
        (self.line, self.column, &self.path, &self.message)
    }
}

fn check_expectations<D: Diag + std::fmt::Display>(
    file: &Path,
    what: &str,
    expected: &[Expected],
    got: &[D],
) -> Vec<String> {
    let shown: Vec<String> = got.iter().map(|d| format!("  {d}")).collect();
    let mut failures = Vec::new();
    for e in expected {
        let found = got.iter().any(|d| {
            let (line, column, path, message) = d.parts();
            line == e.line && column == e.column && path == e.path && message.contains(&e.fragment)
        });
        if !found {
            failures.push(format!(
                "{}: expected {what} {}:{} {}: {} not reported; got:\n{}",
                file.display(),
                e.line,
                e.column,
                e.path,
                e.fragment,
                shown.join("\n")
            ));
        }
    }
    if expected.len() != got.len() {
        failures.push(format!(
            "{}: expected {} {what}(s), got {}:\n{}",
            file.display(),
            expected.len(),
            got.len(),
            shown.join("\n")
        ));
    }
    failures
}

fn load_fixture(
    file: &Path,
) -> (
    String,
    Result<(faceio_relay::config::Config, Vec<Warning>), ConfigErrors>,
) {
    let text = std::fs::read_to_string(file).unwrap();
    let result = load_str(&text, file, &test_env);
    (text, result)
}

#[test]
fn invalid_fixtures_report_every_expected_error() {
    let mut failures = Vec::new();
    for file in fixtures("invalid") {
        let (text, result) = load_fixture(&file);
        let expected = expectations(&text, "expect");
        assert!(
            !expected.is_empty(),
            "{}: no `# expect:` lines",
            file.display()
        );
        match result {
            Ok(_) => failures.push(format!("{}: loaded without errors", file.display())),
            Err(errors) => {
                failures.extend(check_expectations(&file, "error", &expected, &errors.0));
                let shown = errors.to_string();
                for secret in SECRETS {
                    assert!(
                        !shown.contains(secret),
                        "{}: secret in errors:\n{shown}",
                        file.display()
                    );
                }
            }
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n\n"));
}

#[test]
fn valid_fixtures_load_with_their_expected_warnings() {
    let mut failures = Vec::new();
    for file in fixtures("valid") {
        let (text, result) = load_fixture(&file);
        match result {
            Err(errors) => failures.push(format!("{}: errors:\n{errors}", file.display())),
            Ok((config, warnings)) => {
                let expected = expectations(&text, "warn");
                failures.extend(check_expectations(&file, "warning", &expected, &warnings));
                let shown = format!("{config:?}\n{}", config.summary());
                for secret in SECRETS {
                    assert!(
                        !shown.contains(secret),
                        "{}: secret shown:\n{shown}",
                        file.display()
                    );
                }
            }
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n\n"));
}

fn fixture_path(rel: &str) -> PathBuf {
    private_token_files();
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/config")
        .join(rel)
}

#[test]
fn full_example_is_typed_as_written() {
    let file = fixture_path("valid/full.yaml");
    let text = std::fs::read_to_string(&file).unwrap();
    let (config, warnings) = load_str(&text, &file, &no_env).unwrap_or_else(|e| panic!("{e}"));
    assert!(warnings.is_empty(), "{warnings:?}");
    assert_eq!(config.source, file);
    assert_eq!(config.listen.to_string(), "0.0.0.0:8443");
    assert_eq!(config.webhook_path, "/faceio/webhook");
    assert_eq!(config.ingress.max_body, 128 * 1024);
    assert_eq!(config.ingress.header_timeout, Duration::from_secs(2));
    assert_eq!(config.ingress.body_timeout, Duration::from_millis(2500));
    assert_eq!(config.ingress.store_timeout, Duration::from_secs(4));
    assert_eq!(config.ingress.max_connections, 256);
    let ips: Vec<String> = config
        .ingress
        .allow_ips
        .iter()
        .map(|n| n.to_string())
        .collect();
    assert_eq!(ips, ["10.0.0.0/8", "192.168.1.7/32", "2001:db8::/32"]);
    assert_eq!(config.ingress.auth_failures.per_second, 0.5);
    assert_eq!(config.ingress.auth_failures.burst, 5);
    assert_eq!(config.ingress.idle_timeout, Duration::from_secs(30));
    assert_eq!(config.ingress.handshake_timeout, Duration::from_secs(3));
    assert_eq!(config.ingress.max_connections_per_ip, 16);
    let proxies: Vec<String> = config
        .ingress
        .trusted_proxies
        .iter()
        .map(|n| n.to_string())
        .collect();
    assert_eq!(proxies, ["127.0.0.1/32", "::1/128", "10.1.0.0/16"]);
    assert!(config.ingress.proxy_protocol);
    assert_eq!(
        config.admin.token.as_ref().map(|t| t.expose().as_str()),
        Some("admin-token-full-5e2")
    );
    assert!(!format!("{:?}", config.admin).contains("admin-token-full"));
    assert_eq!(config.admin.max_connections, 8);
    assert_eq!(config.admin.header_timeout, Duration::from_secs(2));
    assert_eq!(config.admin.idle_timeout, Duration::from_secs(20));
    let dir = file.parent().unwrap();
    assert_eq!(config.store.path, dir.join("state/relay.db"));
    assert!(!config.store.path.to_string_lossy().contains("/./"));
    assert_eq!(config.store.retention, Duration::from_secs(30 * 86_400));
    assert_eq!(config.delivery.shutdown_grace, Duration::from_secs(20));
    assert_eq!(config.delivery.poll_interval, Duration::from_millis(250));

    let apps: Vec<(&str, &str)> = config
        .applications
        .iter()
        .map(|a| (a.app_id.as_str(), a.token.expose().as_str()))
        .collect();
    assert_eq!(
        apps,
        [
            ("fioa1234", "literal-token-a1234"),
            ("fiob5678", "file-token-b5678")
        ]
    );

    assert_eq!(config.destinations.len(), 3);
    let slack = &config.destinations[0];
    assert_eq!(slack.name, "team-slack");
    let DestinationKind::Slack(s) = &slack.kind else {
        panic!("{slack:?}")
    };
    assert_eq!(
        s.webhook_url.expose(),
        "https://hooks.example.test/services/default"
    );
    assert_eq!(
        s.text.as_deref(),
        Some("New {{ eventName }} for {{ facialId }}")
    );
    assert_eq!(slack.concurrency, 4);
    assert_eq!(slack.timeout, Duration::from_secs(10));
    assert_eq!(slack.retry, Default::default());
    let rl = slack.rate_limit.unwrap();
    assert_eq!((rl.per_second, rl.burst), (1.0, 1));

    let crm = &config.destinations[1];
    let DestinationKind::Http(h) = &crm.kind else {
        panic!("{crm:?}")
    };
    assert_eq!(h.url.expose(), "http://127.0.0.1:9000/faceio");
    let headers: Vec<(&str, &str)> = h
        .headers
        .iter()
        .map(|(k, v)| (k.as_str(), v.expose().as_str()))
        .collect();
    assert_eq!(
        headers,
        [
            ("Authorization", "Bearer none"),
            ("X-Source", "faceio-relay")
        ]
    );
    assert_eq!(
        h.signing_secret.as_ref().unwrap().expose(),
        "whsec_c2VjcmV0"
    );
    assert!(h.follow_redirects);
    assert_eq!(crm.timeout, Duration::from_secs(5));
    assert_eq!(crm.concurrency, 8);
    assert_eq!(crm.retry.max_attempts, 10);
    assert_eq!(crm.retry.initial_delay, Duration::from_millis(500));
    assert_eq!(crm.retry.max_delay, Duration::from_secs(300));
    let rl = crm.rate_limit.unwrap();
    assert_eq!((rl.per_second, rl.burst), (50.0, 100));

    let audit = &config.destinations[2];
    let DestinationKind::File(f) = &audit.kind else {
        panic!("{audit:?}")
    };
    assert_eq!(f.path, dir.join("data/events.jsonl"));
    assert_eq!(audit.concurrency, 16);
    assert_eq!(audit.rate_limit, None);

    assert_eq!(config.routes.len(), 3);
    let r = &config.routes[0];
    assert_eq!(r.name, "enrollments");
    assert_eq!(r.to, ["team-slack", "crm"]);
    assert_eq!(
        r.matcher.event_name.as_deref(),
        Some(&["ENROLL".to_string()][..])
    );
    let r = &config.routes[1];
    assert_eq!(r.name, "adults-from-office");
    let m = &r.matcher;
    assert_eq!(m.event_name.as_ref().unwrap(), &["AUTH", "DELETION"]);
    assert_eq!(m.app_id.as_ref().unwrap(), &["fioa1234"]);
    assert_eq!(m.facial_id.as_ref().unwrap(), &["f1", "f2"]);
    let nets: Vec<String> = m
        .client_ip
        .as_ref()
        .unwrap()
        .iter()
        .map(|n| n.to_string())
        .collect();
    assert_eq!(nets, ["203.0.113.0/24", "198.51.100.9/32", "::1/128"]);
    assert_eq!(m.gender.as_ref().unwrap(), &["female"]);
    let age = m.age.unwrap();
    assert_eq!((age.min, age.max), (Some(18.0), Some(65.5)));
    assert_eq!(r.to, ["crm"]);
    let r = &config.routes[2];
    assert_eq!(r.name, "route-3");
    assert_eq!(r.matcher, Default::default());
    assert_eq!(r.to, ["audit"]);
}

#[test]
fn defaults_apply_to_a_minimal_file() {
    let (config, warnings) = load_str(
        "applications:\n  - app_id: fioa1\n    token: t\n",
        Path::new("/etc/faceio-relay/relay.yaml"),
        &no_env,
    )
    .unwrap();
    assert_eq!(config.listen.to_string(), "127.0.0.1:8080");
    assert_eq!(config.webhook_path, "/webhook");
    assert_eq!(config.ingress.max_body, 65_536);
    assert_eq!(config.ingress.header_timeout, Duration::from_secs(5));
    assert_eq!(config.ingress.body_timeout, Duration::from_secs(5));
    assert_eq!(config.ingress.store_timeout, Duration::from_secs(3));
    assert_eq!(config.ingress.max_connections, 1024);
    assert!(config.ingress.allow_ips.is_empty());
    assert_eq!(config.ingress.auth_failures.per_second, 1.0);
    assert_eq!(config.ingress.auth_failures.burst, 10);
    assert_eq!(
        config.store.path,
        Path::new("/etc/faceio-relay/data/relay.db")
    );
    assert_eq!(config.store.retention, Duration::from_secs(7 * 86_400));
    assert_eq!(config.delivery.shutdown_grace, Duration::from_secs(10));
    assert_eq!(config.delivery.poll_interval, Duration::from_secs(1));
    assert!(config.destinations.is_empty() && config.routes.is_empty());
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(warnings[0].message.contains("no routes"), "{warnings:?}");
    assert_eq!(
        warnings[0].to_string(),
        format!(
            "/etc/faceio-relay/relay.yaml:1:1: routes: {}",
            warnings[0].message
        )
    );
}

#[test]
fn debug_output_of_a_loaded_config_shows_no_secret() {
    let file = fixture_path("valid/secrets.yaml");
    let text = std::fs::read_to_string(&file).unwrap();
    let (config, _) = load_str(&text, &file, &test_env).unwrap();
    let debug = format!("{config:?} {config:#?}");
    let summary = config.summary();
    for secret in SECRETS.iter().chain(&[
        "whsec_",
        "hooks.slack.com",
        "9000/faceio",
        "X-Api-Key-Value",
    ]) {
        assert!(
            !debug.contains(secret),
            "`{secret}` in Debug output:\n{debug}"
        );
        assert!(
            !summary.contains(secret),
            "`{secret}` in summary:\n{summary}"
        );
    }
    // The values are there, only hidden.
    let DestinationKind::Http(h) = &config.destinations[1].kind else {
        panic!()
    };
    assert_eq!(h.headers[0].1.expose(), "Bearer crm-bearer-d41d8c");
    assert_eq!(config.applications[0].token.expose(), "tok-faceio-7f3a9c");
}

#[test]
fn errors_never_show_interpolated_values() {
    let text = "\
applications:
  - app_id: fioa1
    token: ${FACEIO_TOKEN}
destinations:
  crm:
    type: http
    url: ${CRM_TOKEN}
  crm2:
    type: http
    url: https://example.test/
    headers: { Authorization: \"Bearer ${CRM_TOKEN}\\n\" }
  crm3: { type: http, url: https://example.test/, concurrency: \"${CRM_TOKEN}\" }
  crm4: { type: http, url: https://example.test/, signing_secret: \"whsec_${CRM_TOKEN}!\" }
  slack: { type: slack, webhook_url: \"${CRM_TOKEN}\" }
routes:
  - to: [crm, crm2, crm3, crm4, slack]
";
    let errors = load_str(text, Path::new("relay.yaml"), &test_env).unwrap_err();
    assert_eq!(errors.0.len(), 5, "{errors}");
    let shown = errors.to_string();
    assert!(!shown.contains("crm-bearer"), "{shown}");
    assert!(
        shown.contains("relay.yaml:7:10: destinations.crm.url: not a valid URL"),
        "{shown}"
    );
}

#[test]
fn names_from_the_environment_are_not_echoed() {
    let text = "\
applications:
  - { app_id: \"${CRM_TOKEN}\", token: a }
  - { app_id: \"${CRM_TOKEN}\", token: b }
destinations:
  audit: { type: file, path: a.jsonl }
routes:
  - to: [\"${CRM_TOKEN}\", audit]
";
    let errors = load_str(text, Path::new("relay.yaml"), &test_env).unwrap_err();
    let shown = errors.to_string();
    assert_eq!(errors.0.len(), 2, "{shown}");
    assert!(!shown.contains("crm-bearer"), "{shown}");
    assert!(
        shown.contains(
            "relay.yaml:3:15: applications[1].app_id: duplicate app_id (value from the environment)"
        ),
        "{shown}"
    );
    assert!(
        shown.contains(
            "relay.yaml:7:10: routes[0].to[0]: unknown destination (value from the environment)"
        ),
        "{shown}"
    );
}

#[test]
fn summary_describes_the_config() {
    let file = fixture_path("valid/full.yaml");
    let text = std::fs::read_to_string(&file).unwrap();
    let (config, _) = load_str(&text, &file, &test_env).unwrap();
    let summary = config.summary();
    for expected in [
        "listen 0.0.0.0:8443 (http, webhook path /faceio/webhook)",
        "admin 127.0.0.1:9090 (/metrics with admin.token, /healthz, /readyz)",
        "clients: named by trusted proxies 127.0.0.1/32, ::1/128, 10.1.0.0/16 (PROXY header, then X-Forwarded-For); 16 connections each, closed after 30s idle",
        "retention 30days",
        "applications (2): fioa1234, fiob5678",
        "team-slack: slack, concurrency 4",
        "crm: http, concurrency 8, timeout 5s, rate limit 50/s burst 100, retry 10 attempts 500ms..5m",
        "audit: file, concurrency 16",
        // Each kind's own part, after the shared settings; never a URL or a header value.
        "retry 20 attempts 1s..10m; text template",
        "..5m; FACEIO body as sent, 2 headers, signed (Standard Webhooks), follows same-origin redirects",
        "/data/events.jsonl",
        "enrollments: eventName ENROLL -> team-slack, crm",
        "details.age 18..65.5",
        "route-3: every event -> audit",
    ] {
        assert!(
            summary.contains(expected),
            "`{expected}` not in:\n{summary}"
        );
    }
    for secret in [
        "127.0.0.1:9000",
        "hooks.example.test",
        "Bearer",
        "whsec_",
        "X-Source",
    ] {
        assert!(!summary.contains(secret), "{secret} in {summary}");
    }
}

#[test]
fn unreadable_file_is_one_error_naming_it() {
    let missing = Path::new("/nonexistent/faceio-relay/relay.yaml");
    let errors = load(missing).unwrap_err();
    assert_eq!(errors.0.len(), 1);
    let e = &errors.0[0];
    assert_eq!(e.file, missing);
    assert_eq!((e.line, e.column), (0, 0));
    let shown = errors.to_string();
    assert!(
        shown.starts_with("/nonexistent/faceio-relay/relay.yaml: cannot read"),
        "{shown}"
    );
    assert!(shown.contains("os error"), "{shown}");
}

#[test]
fn load_resolves_paths_against_the_config_directory() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("token"), "from-file\n\n").unwrap();
    private(&dir.path().join("token"));
    let file = dir.path().join("relay.yaml");
    std::fs::write(
        &file,
        "store: { path: db/relay.db }\napplications:\n  - { app_id: fioa1, token_file: token }\ndestinations:\n  out: { type: file, path: events.jsonl }\nroutes:\n  - to: out\n",
    )
    .unwrap();
    let (config, warnings) = load(&file).unwrap();
    assert!(warnings.is_empty(), "{warnings:?}");
    assert_eq!(config.source, file);
    assert_eq!(config.store.path, dir.path().join("db/relay.db"));
    assert_eq!(config.applications[0].token.expose(), "from-file");
    let DestinationKind::File(f) = &config.destinations[0].kind else {
        panic!()
    };
    assert_eq!(f.path, dir.path().join("events.jsonl"));
}

#[test]
fn errors_display_as_file_line_column_path_message() {
    let errors = load_str(
        "applications:\n  - app_id: a\n    token: t\n    tokn: x\n",
        Path::new("relay.yaml"),
        &no_env,
    )
    .unwrap_err();
    assert_eq!(
        errors.to_string(),
        "relay.yaml:4:5: applications[0].tokn: unknown field `tokn`; did you mean `token`?"
    );
    let errors = load_str("a: [\n", Path::new("relay.yaml"), &no_env).unwrap_err();
    assert_eq!(errors.0.len(), 1);
    assert!(errors.0[0].path.is_empty());
    assert!(errors.to_string().starts_with("relay.yaml:"), "{errors}");
}

#[test]
fn repository_relay_yaml_loads_without_environment() {
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("relay.yaml");
    if !file.exists() {
        return;
    }
    let text = std::fs::read_to_string(&file).unwrap();
    if let Err(errors) = load_str(&text, &file, &no_env) {
        panic!("relay.yaml does not load with no variables set:\n{errors}");
    }
}

#[test]
fn example_fixture_loads_without_environment() {
    let file = fixture_path("valid/relay-example.yaml");
    let text = std::fs::read_to_string(&file).unwrap();
    let (config, warnings) = load_str(&text, &file, &no_env).unwrap_or_else(|e| panic!("{e}"));
    assert!(warnings.is_empty(), "{warnings:?}");
    assert_eq!(config.applications.len(), 2);
    assert_eq!(config.routes.len(), 2);
}

#[test]
fn check_reports_token_file_errors_at_their_line_and_column() {
    let file = fixture_path("invalid/token-file.yaml");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_faceio-relay"))
        .arg("--config")
        .arg(&file)
        .arg("check")
        .env_remove("FACEIO_RELAY_CONFIG")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let shown = file.display().to_string();
    for expected in [
        format!("{shown}:10:17: applications[1].token_file: the token file is empty"),
        format!("{shown}:12:17: applications[2].token_file: the token file is empty"),
        format!("{shown}:14:17: applications[3].token_file: cannot read the token file"),
    ] {
        assert!(
            stderr.contains(&expected),
            "missing {expected:?} in:\n{stderr}"
        );
    }
    assert!(stderr.contains("3 error(s)"), "{stderr}");
}

/// Makes `path` readable by its owner only.
fn private(path: &Path) {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

#[test]
fn token_files_are_trimmed_and_warned_about_when_others_can_read_them() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    // Whitespace on both sides, as an editor or `echo` leaves it.
    std::fs::write(&token, " \t tok-from-file-123 \n\n").unwrap();
    private(&token);
    let file = dir.path().join("relay.yaml");
    std::fs::write(
        &file,
        "applications:\n  - { app_id: fioa1, token_file: token }\nroutes: []\n",
    )
    .unwrap();
    let (config, warnings) = load(&file).unwrap();
    assert_eq!(config.applications[0].token.expose(), "tok-from-file-123");
    assert!(
        !warnings.iter().any(|w| w.message.contains("readable")),
        "{warnings:?}"
    );

    for mode in [0o640, 0o604] {
        std::fs::set_permissions(&token, std::fs::Permissions::from_mode(mode)).unwrap();
        let (_, warnings) = load(&file).unwrap();
        let w = warnings
            .iter()
            .find(|w| w.message.contains("readable by group or others"))
            .unwrap_or_else(|| panic!("no warning for mode {mode:o}: {warnings:?}"));
        assert_eq!(w.path, "applications[0].token_file");
        assert_eq!((w.line, w.column), (2, 34));
        assert!(!w.to_string().contains("tok-from-file"), "{w}");
    }
}

#[test]
fn the_demo_token_is_refused_behind_a_reverse_proxy_too() {
    let file = std::path::PathBuf::from("/etc/faceio-relay/relay.yaml");
    let load = |extra: &str| {
        let text = format!(
            "listen: 127.0.0.1:8080\napplications: [{{ app_id: fioa1, token: demo-token-change-me }}]\n{extra}"
        );
        load_str(&text, &file, &test_env).unwrap().0
    };
    let local = load("");
    assert_eq!(
        local.demo_token_refusal(local.listen),
        None,
        "loopback, no proxy"
    );
    let proxied = load("ingress:\n  trusted_proxies: [127.0.0.1]\n");
    let why = proxied
        .demo_token_refusal(proxied.listen)
        .expect("refused behind a reverse proxy");
    assert!(
        why.contains("trusted_proxies") && why.contains("--allow-demo-token"),
        "{why}"
    );
}
