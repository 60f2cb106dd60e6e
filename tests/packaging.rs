//! What the package ships: the example config, the unit's paths, the logrotate file,
//! and the completions and man pages generated from the clap definitions.

use std::path::{Path, PathBuf};
use std::process::Command;

use faceio_relay::config::{DEFAULT_CONFIG_PATH, load_str};
use faceio_relay::destinations::DestinationKind;

fn repo(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

fn binary() -> Command {
    Command::new(env!("CARGO_BIN_EXE_faceio-relay"))
}

#[test]
fn packaged_relay_yaml_loads_with_the_token_from_the_credentials_directory() {
    let credentials = tempfile::tempdir().unwrap();
    std::fs::write(
        credentials.path().join("faceio-token"),
        "tok-from-credential\n",
    )
    .unwrap();
    // systemd's copy of a credential is readable by the service only.
    std::fs::set_permissions(
        credentials.path().join("faceio-token"),
        std::os::unix::fs::PermissionsExt::from_mode(0o400),
    )
    .unwrap();
    let dir = credentials.path().to_str().unwrap().to_owned();
    let env = move |name: &str| (name == "CREDENTIALS_DIRECTORY").then(|| dir.clone());

    let file = repo("packaging/relay.yaml");
    let text = std::fs::read_to_string(&file).unwrap();
    let (config, warnings) = load_str(&text, &file, &env).unwrap_or_else(|e| panic!("{e}"));
    assert!(warnings.is_empty(), "{warnings:?}");

    assert_eq!(
        config.store.path,
        Path::new("/var/lib/faceio-relay/relay.db"),
        "the store is in StateDirectory="
    );
    for d in &config.destinations {
        if let DestinationKind::File(f) = &d.kind {
            assert!(
                f.path.starts_with("/var/log/faceio-relay/"),
                "file destination {} outside LogsDirectory=: {}",
                d.name,
                f.path.display()
            );
        }
    }
    assert_eq!(config.applications.len(), 1);
    assert_eq!(config.applications[0].token.expose(), "tok-from-credential");
    assert!(config.tls.is_none(), "TLS stays opt-in");
}

#[test]
fn unit_runs_the_packaged_config_and_writes_only_its_directories() {
    let unit = std::fs::read_to_string(repo("systemd/faceio-relay.service")).unwrap();
    let has = |line: &str| unit.lines().any(|l| l.trim() == line);
    assert!(has(&format!(
        "ExecStart=/usr/bin/faceio-relay run --config {DEFAULT_CONFIG_PATH}"
    )));
    for line in [
        "Type=notify",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "StateDirectory=faceio-relay",
        "LogsDirectory=faceio-relay",
        "ConfigurationDirectory=faceio-relay",
        "ProtectSystem=strict",
        "LoadCredential=faceio-token:/etc/faceio-relay/faceio-token",
        "EnvironmentFile=-/etc/faceio-relay/env",
    ] {
        assert!(has(line), "unit lacks {line}");
    }
    assert!(
        !unit.lines().any(|l| l.starts_with("ReadWritePaths=")),
        "the service writes only StateDirectory= and LogsDirectory="
    );
}

#[test]
fn the_unit_allows_more_descriptors_than_ingress_connections() {
    // systemd's default soft limit is 1024: at the default connection cap, accept()
    // would fail with EMFILE before the cap is reached.
    let unit = std::fs::read_to_string(repo("systemd/faceio-relay.service")).unwrap();
    let limit: usize = unit
        .lines()
        .find_map(|l| l.trim().strip_prefix("LimitNOFILE="))
        .expect("unit sets LimitNOFILE=")
        .parse()
        .unwrap();
    let credentials = tempfile::tempdir().unwrap();
    std::fs::write(credentials.path().join("faceio-token"), "t\n").unwrap();
    let dir = credentials.path().to_str().unwrap().to_owned();
    let env = move |name: &str| (name == "CREDENTIALS_DIRECTORY").then(|| dir.clone());
    let file = repo("packaging/relay.yaml");
    let text = std::fs::read_to_string(&file).unwrap();
    let (config, _) = load_str(&text, &file, &env).unwrap_or_else(|e| panic!("{e}"));
    let max_connections = config.ingress.max_connections;
    assert!(
        limit >= 4 * max_connections,
        "LimitNOFILE={limit} leaves too little beyond {max_connections} connections"
    );
}

#[test]
fn man_pages_and_completions_come_from_the_cli_definitions() {
    let out = tempfile::tempdir().unwrap();
    let status = binary()
        .args(["generate", "man"])
        .arg(out.path())
        .status()
        .unwrap();
    assert!(status.success());
    let main_page = std::fs::read_to_string(out.path().join("faceio-relay.1")).unwrap();
    // roff escapes hyphens.
    let main_page = main_page.replace("\\-", "-");
    assert!(main_page.contains(".TH faceio-relay 1"), "{main_page}");
    assert!(main_page.contains("dead-letters"), "{main_page}");
    assert!(
        !main_page.contains("generate"),
        "the hidden command stays hidden"
    );
    for page in ["faceio-relay-run.1", "faceio-relay-dead-letters-replay.1"] {
        assert!(out.path().join(page).exists(), "{page} missing");
    }

    for (shell, marker) in [
        ("bash", "complete -F"),
        ("zsh", "#compdef faceio-relay"),
        ("fish", "complete -c faceio-relay"),
    ] {
        let output = binary()
            .args(["generate", "completions", shell])
            .output()
            .unwrap();
        assert!(output.status.success(), "{shell}");
        let script = String::from_utf8(output.stdout).unwrap();
        assert!(script.contains(marker), "{shell}: {script}");
        assert!(script.contains("dead-letters"), "{shell}: {script}");
    }

    let help = binary().arg("--help").output().unwrap();
    let help = String::from_utf8(help.stdout).unwrap();
    assert!(
        help.contains("dead-letters") && !help.contains("generate"),
        "{help}"
    );
}

/// Runs the shipped logrotate file (paths moved into a scratch directory, the reload
/// replaced by a marker file) through the real logrotate.
#[test]
fn logrotate_renames_leaves_the_new_file_to_the_relay_and_reloads() {
    if Command::new("logrotate").arg("--version").output().is_err() {
        eprintln!("logrotate is not installed; skipping");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let logs = dir.path().join("log");
    std::fs::create_dir(&logs).unwrap();
    std::fs::write(logs.join("events.jsonl"), "{\"id\":\"1\"}\n").unwrap();
    let marker = dir.path().join("reloaded");

    let shipped = std::fs::read_to_string(repo("packaging/logrotate")).unwrap();
    assert!(shipped.contains("systemctl reload faceio-relay"));
    let conf = shipped
        .replace("/var/log/faceio-relay/", &format!("{}/", logs.display()))
        .replace(
            "systemctl reload faceio-relay",
            &format!("touch {}", marker.display()),
        );
    let conf_path = dir.path().join("logrotate.conf");
    std::fs::write(&conf_path, conf).unwrap();

    let output = Command::new("logrotate")
        .arg("--force")
        .arg("--state")
        .arg(dir.path().join("state"))
        .arg(&conf_path)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        logs.join("events.jsonl.1").exists(),
        "rotated, not compressed yet"
    );
    assert!(
        !logs.join("events.jsonl").exists(),
        "nocreate: the relay, not logrotate (as root), makes the new file"
    );
    assert!(marker.exists(), "postrotate ran");
}
