//! The command line: `run`, `check`, `simulate`, `dead-letters`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use clap::{Args, CommandFactory, Parser, Subcommand};

use crate::config::{self, Config, DEFAULT_CONFIG_PATH, LogFormat};
use crate::store::{ReplayVerdict, Selection, Store};

/// `println!` for command output. A reader that goes away (`dead-letters list | head`)
/// ends the command quietly, where `println!` would panic on the broken pipe.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if let Err(e) = writeln!(std::io::stdout(), $($arg)*) {
            if e.kind() != std::io::ErrorKind::BrokenPipe {
                eprintln!("error: cannot write the output: {e}");
                std::process::exit(1);
            }
            std::process::exit(0);
        }
    }};
}

/// `run`'s exit status when the configuration keeps the relay from starting (an
/// invalid file, the demo token refused, a destination or certificate that cannot be
/// set up): `EX_CONFIG` of sysexits.h. The unit's `RestartPreventExitStatus=78` stops
/// systemd from restarting a relay that would fail the same way again; other failures
/// (a port in use, an unreachable PostgreSQL) exit 1 and are retried.
pub const EXIT_CONFIG: u8 = 78;

const EXAMPLES: &str = "\
Examples:
  faceio-relay check --config relay.yaml              validate before a restart
  faceio-relay run --config relay.yaml                run in the foreground
  faceio-relay simulate ENROLL --config relay.yaml    send a test event to the running relay
  faceio-relay dead-letters list --json               failed deliveries, one JSON per line
  faceio-relay dead-letters replay --destination crm  send them again after an outage

Docs: README.md (config reference, metrics, reload, running as a systemd service).";

/// Receives FACEIO webhooks, verifies them, stores them durably and fans them out to
/// Slack, HTTP APIs and files by the rules in relay.yaml.
#[derive(Debug, Parser)]
#[command(
    name = "faceio-relay",
    version,
    about,
    long_about = None,
    propagate_version = true,
    after_help = EXAMPLES
)]
pub struct Cli {
    /// Path to relay.yaml.
    #[arg(short, long, global = true, env = "FACEIO_RELAY_CONFIG", default_value = DEFAULT_CONFIG_PATH)]
    pub config: PathBuf,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the relay daemon. SIGHUP reloads the config (an invalid one is reported and
    /// the running one kept); SIGTERM or Ctrl-C stops it without losing anything pending.
    Run(RunArgs),
    /// Validate the config and exit: 0 with a summary, or 1 with every error
    /// (file:line:column, key path, and a suggestion for mistyped keys).
    Check,
    /// Send one realistic, correctly authenticated FACEIO event to the running relay
    /// and print its answer.
    Simulate(SimulateArgs),
    /// Inspect, replay and purge deliveries that failed for good.
    #[command(subcommand)]
    DeadLetters(DeadLetterCommand),
    /// Write shell completions or man pages from these definitions (for packagers;
    /// see packaging/build-assets.sh).
    #[command(subcommand, hide = true)]
    Generate(GenerateCommand),
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Accept the shipped demo token (`demo-token-change-me`) even when `listen` is
    /// reachable from other machines. Without it, run refuses to start (and a reload
    /// is refused) in that case; on a loopback `listen` the token is only warned about.
    #[arg(long)]
    pub allow_demo_token: bool,
}

#[derive(Debug, Subcommand)]
pub enum GenerateCommand {
    /// Print the completion script for SHELL on stdout.
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
    /// Write faceio-relay.1 and one page per subcommand (faceio-relay-run.1, …) into DIR.
    Man {
        /// Created if missing.
        dir: PathBuf,
    },
}

#[derive(Debug, Args)]
pub struct SimulateArgs {
    /// Event to send: ENROLL, AUTH, DELETION (or any other name your routes expect).
    pub event: String,
    /// Application to send as (default: the first in the config).
    #[arg(long)]
    pub app_id: Option<String>,
    /// Facial ID to put in the event (default: a fresh random one).
    #[arg(long)]
    pub facial_id: Option<String>,
    /// Relay URL to post to (default: built from `listen`, `webhook_path` and whether
    /// `tls:` is set).
    #[arg(long)]
    pub url: Option<String>,
    /// Also trust this PEM certificate (for a relay serving a self-signed or private-CA
    /// certificate).
    #[arg(long, value_name = "PEM")]
    pub ca_cert: Option<std::path::PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum DeadLetterCommand {
    /// List dead letters, newest first.
    List {
        /// One JSON object per line (id, event_id, event_name, destination, attempts, last_error, failed_at).
        #[arg(long)]
        json: bool,
        /// Only this destination's.
        #[arg(long)]
        destination: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Show one dead letter with its event's payload.
    Show {
        /// Dead-letter ID (from `list`).
        id: i64,
        /// Print as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Queue dead letters for delivery again (attempts start over). The running relay
    /// decides within its poll interval (1s by default) and this command reports it: it
    /// queues those of destinations it runs and refuses the others, which stay dead
    /// letters with the reason (exit 1 when IDs or --destination were refused).
    Replay(SelectArgs),
    /// Delete dead letters for good.
    Purge(SelectArgs),
}

/// Which dead letters: IDs, `--all`, or `--destination NAME`.
#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
pub struct SelectArgs {
    /// Dead-letter IDs.
    pub ids: Vec<i64>,
    /// Every dead letter.
    #[arg(long)]
    pub all: bool,
    /// Every dead letter of this destination.
    #[arg(long)]
    pub destination: Option<String>,
}

impl SelectArgs {
    fn selection(&self) -> Selection {
        if self.all {
            Selection::All
        } else if let Some(d) = &self.destination {
            Selection::Destination(d.clone())
        } else {
            Selection::Ids(self.ids.clone())
        }
    }
}

/// Entry point used by `main`.
pub async fn main() -> ExitCode {
    let cli = Cli::parse();
    match dispatch(cli).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Check => Ok(check(&cli.config).await),
        Command::Run(args) => {
            let Some(config) = load_or_report(&cli.config) else {
                return Ok(ExitCode::from(EXIT_CONFIG));
            };
            if !args.allow_demo_token
                && let Some(why) = config.demo_token_refusal(config.listen)
            {
                eprintln!("error: {why}");
                eprintln!("{}: nothing was started", cli.config.display());
                return Ok(ExitCode::from(EXIT_CONFIG));
            }
            let (logs, _flush) =
                crate::telemetry::init(config.log_format, config.log_level.as_deref());
            match crate::service::run(&cli.config, config, logs, args.allow_demo_token).await {
                Ok(()) => Ok(ExitCode::SUCCESS),
                Err(e)
                    if e.downcast_ref::<crate::RelayError>()
                        .is_some_and(crate::RelayError::is_config) =>
                {
                    eprintln!("error: {e:#}");
                    eprintln!("{}: nothing was started", cli.config.display());
                    Ok(ExitCode::from(EXIT_CONFIG))
                }
                Err(e) => Err(e),
            }
        }
        Command::Simulate(args) => {
            let (_, _flush) = crate::telemetry::init(LogFormat::Text, None);
            let Some(config) = load_or_report(&cli.config) else {
                return Ok(ExitCode::FAILURE);
            };
            simulate(&config, &args).await
        }
        Command::DeadLetters(cmd) => {
            let (_, _flush) = crate::telemetry::init(LogFormat::Text, None);
            let Some(config) = load_for_admin(&cli.config) else {
                return Ok(ExitCode::FAILURE);
            };
            dead_letters(&config, cmd).await
        }
        Command::Generate(what) => generate(what),
    }
}

/// Completions and man pages, from the same clap definitions the binary parses with.
fn generate(what: GenerateCommand) -> anyhow::Result<ExitCode> {
    let mut command = Cli::command();
    match what {
        GenerateCommand::Completions { shell } => {
            use std::io::Write as _;
            // Into a buffer first: clap_complete panics on a write error (`| head`).
            let mut script = Vec::new();
            let name = command.get_name().to_string();
            clap_complete::generate(shell, &mut command, name, &mut script);
            std::io::stdout()
                .write_all(&script)
                .context("cannot write the completion script")?;
        }
        GenerateCommand::Man { dir } => {
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            clap_mangen::generate_to(command, &dir)
                .with_context(|| format!("cannot write man pages to {}", dir.display()))?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Loads the config, printing warnings; on errors prints them all and returns `None`.
fn load_or_report(path: &Path) -> Option<Config> {
    match config::load(path) {
        Ok((config, warnings)) => {
            for w in &warnings {
                eprintln!("warning: {w}");
            }
            Some(config)
        }
        Err(errors) => {
            for e in &errors.0 {
                eprintln!("error: {e}");
            }
            eprintln!(
                "{}: {} error(s); nothing was started",
                path.display(),
                errors.0.len()
            );
            None
        }
    }
}

/// Stands in for secrets the operator's shell does not have (the daemon gets them from
/// its unit). It parses as a URL, so URL-valued secrets still validate.
const ADMIN_PLACEHOLDER: &str = "http://unset.invalid/";

/// Loads the config for the `dead-letters` commands, which need only the store path and
/// the destination names: variables holding secrets need not be set in the operator's
/// shell. Every other error is reported as for `run`.
fn load_for_admin(path: &Path) -> Option<Config> {
    let (Ok(text), Ok(absolute)) = (std::fs::read_to_string(path), std::fs::canonicalize(path))
    else {
        return load_or_report(path);
    };
    let env =
        |name: &str| Some(std::env::var(name).unwrap_or_else(|_| ADMIN_PLACEHOLDER.to_string()));
    match config::load_str(&text, &absolute, &env) {
        Ok((config, _warnings)) => Some(config),
        Err(_) => load_or_report(path),
    }
}

async fn check(path: &Path) -> ExitCode {
    let Some(config) = load_or_report(path) else {
        return ExitCode::FAILURE;
    };
    let problems = preflight(&config).await;
    if problems > 0 {
        eprintln!(
            "{}: {problems} destination(s) cannot deliver as configured",
            path.display()
        );
        return ExitCode::FAILURE;
    }
    out!("{}: OK", path.display());
    out!("{}", config.summary());
    previews(&config);
    ExitCode::SUCCESS
}

/// How long `check` waits for one destination's server.
const PREFLIGHT_TIMEOUT: Duration = Duration::from_secs(5);

/// Asks each destination's server, all at once, whether it can deliver (see
/// [`crate::destinations::Destination::preflight`]): a server that answers with a
/// problem is an error, one that does not answer a warning. Returns the errors' count.
async fn preflight(config: &Config) -> usize {
    use crate::destinations::PreflightError;
    let checks = config.destinations.iter().map(|d| async move {
        let outcome = match crate::destinations::build(d) {
            Err(e) => {
                // Printed below after the destination's name: not twice.
                let text = e.to_string();
                let prefix = format!("destination {}: ", d.name);
                Err(PreflightError::Problem(
                    text.strip_prefix(&prefix)
                        .map_or(text.clone(), str::to_string),
                ))
            }
            Ok(dest) => tokio::time::timeout(PREFLIGHT_TIMEOUT, dest.preflight())
                .await
                .unwrap_or_else(|_| {
                    Err(PreflightError::Unreachable(format!(
                        "no answer within {}",
                        humantime::format_duration(PREFLIGHT_TIMEOUT)
                    )))
                }),
        };
        (d.name.as_str(), outcome)
    });
    let mut problems = 0;
    for (name, outcome) in futures_util::future::join_all(checks).await {
        match outcome {
            Ok(()) => {}
            Err(PreflightError::Problem(why)) => {
                eprintln!("error: destination {name}: {why}");
                problems += 1;
            }
            Err(PreflightError::Unreachable(why)) => {
                eprintln!("warning: destination {name}: server not checked: {why}");
            }
        }
    }
    problems
}

/// Shows what each destination sends for each documented event, where its kind can
/// say (Slack: the message), so the message is seen before the first real event.
fn previews(config: &Config) {
    let app_id = config
        .applications
        .first()
        .map_or("fioa-sample", |a| a.app_id.as_str());
    for d in &config.destinations {
        if let Some(preview) = d.kind.preview(&d.name, app_id) {
            out!("{}", preview.trim_end());
        }
    }
}

/// A realistic FACEIO payload for `event`.
pub fn sample_payload(event: &str, app_id: &str, facial_id: &str) -> serde_json::Value {
    let mut payload = serde_json::json!({
        "eventName": event,
        "facialId": facial_id,
        "appId": app_id,
        "clientIp": "203.0.113.7",
    });
    if event == "ENROLL" {
        let today = humantime::format_rfc3339(SystemTime::now()).to_string();
        payload["details"] = serde_json::json!({
            "timestamp": &today[..10],
            "gender": "female",
            "age": 31,
        });
    }
    payload
}

async fn simulate(config: &Config, args: &SimulateArgs) -> anyhow::Result<ExitCode> {
    let app = match &args.app_id {
        Some(id) => config
            .applications
            .iter()
            .find(|a| &a.app_id == id)
            .with_context(|| format!("no application with app_id {id} in the config"))?,
        None => config
            .applications
            .first()
            .context("the config has no applications")?,
    };
    let url = match &args.url {
        Some(u) => u.clone(),
        None => {
            let mut addr = config.listen;
            if addr.ip().is_unspecified() {
                addr.set_ip(if addr.is_ipv4() {
                    std::net::Ipv4Addr::LOCALHOST.into()
                } else {
                    std::net::Ipv6Addr::LOCALHOST.into()
                });
            }
            let scheme = if config.tls.is_some() {
                "https"
            } else {
                "http"
            };
            format!("{scheme}://{addr}{}", config.webhook_path)
        }
    };
    let facial_id = args
        .facial_id
        .clone()
        .unwrap_or_else(|| format!("sim-{}", uuid::Uuid::now_v7().simple()));
    let payload = sample_payload(&args.event, &app.app_id, &facial_id);
    out!("POST {url}\n{}", serde_json::to_string_pretty(&payload)?);
    let mut client = reqwest::Client::builder();
    if let Some(path) = &args.ca_cert {
        let pem = std::fs::read(path)
            .with_context(|| format!("cannot read --ca-cert {}", path.display()))?;
        let cert = reqwest::Certificate::from_pem(&pem)
            .with_context(|| format!("{} is not a PEM certificate", path.display()))?;
        client = client.add_root_certificate(cert);
    }
    let response = client
        .build()?
        .post(&url)
        .header("WWW-Authenticate", format!("Bearer {}", app.token.expose()))
        .json(&payload)
        .timeout(std::time::Duration::from_secs(6))
        .send()
        .await
        .map_err(|e| {
            let cause = crate::telemetry::error_chain(&e.without_url());
            anyhow::anyhow!("cannot reach the relay at {url}: {cause}")
        })?;
    let status = response.status();
    let body = response.text().await.unwrap_or_default();
    out!("\nHTTP {status}\n{body}");
    Ok(if status.is_success() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

async fn dead_letters(config: &Config, cmd: DeadLetterCommand) -> anyhow::Result<ExitCode> {
    let store = crate::store::open_admin(&config.store).await?;
    let store = store.as_ref();
    match cmd {
        DeadLetterCommand::List {
            json,
            destination,
            limit,
        } => {
            let rows = store.dead_letters(destination.as_deref(), limit).await?;
            if rows.len() == limit {
                eprintln!("(showing the newest {limit}; pass --limit to see more)");
            }
            if json {
                for r in &rows {
                    out!("{}", serde_json::to_string(r)?);
                }
            } else if rows.is_empty() {
                out!("no dead letters");
            } else {
                out!(
                    "{:<8} {:<20} {:<10} {:>8}  {:<24}  LAST ERROR",
                    "ID",
                    "DESTINATION",
                    "EVENT",
                    "ATTEMPTS",
                    "FAILED AT"
                );
                for r in &rows {
                    let mut err = r.last_error.clone();
                    if err.chars().count() > 60 {
                        err = err.chars().take(59).collect::<String>() + "…";
                    }
                    out!(
                        "{:<8} {:<20} {:<10} {:>8}  {:<24}  {}",
                        r.id,
                        r.destination,
                        r.event_name,
                        r.attempts,
                        r.failed_at,
                        err
                    );
                }
            }
        }
        DeadLetterCommand::Show { id, json } => {
            let Some((row, body)) = store.dead_letter(id).await? else {
                eprintln!("no dead letter with id {id}");
                return Ok(ExitCode::FAILURE);
            };
            let payload: serde_json::Value =
                serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
            if json {
                let mut v = serde_json::to_value(&row)?;
                v["payload"] = payload;
                out!("{v}");
            } else {
                out!("id:          {}", row.id);
                out!("event:       {} ({})", row.event_id, row.event_name);
                out!("destination: {}", row.destination);
                out!("attempts:    {}", row.attempts);
                out!("failed at:   {}", row.failed_at);
                out!("last error:  {}", row.last_error);
                out!("payload:\n{}", serde_json::to_string_pretty(&payload)?);
            }
        }
        DeadLetterCommand::Replay(select) => {
            return replay(config, store, select.selection()).await;
        }
        DeadLetterCommand::Purge(select) => {
            let n = store.purge(&select.selection()).await?;
            out!("purged {n} dead letter(s)");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// How long `dead-letters replay` waits for a relay's decision beyond two poll intervals.
const REPLAY_PATIENCE: Duration = Duration::from_secs(3);

/// How often `dead-letters replay` looks for the decision (another process makes it).
const REPLAY_LOOK_EVERY: Duration = Duration::from_millis(100);

/// `dead-letters replay`. The running relay decides, not this command: relay.yaml on disk
/// may not be what it runs (an edit not yet reloaded), and a dead letter queued for a
/// destination no relay runs would sit pending with no dispatcher. So the command records
/// a request per dead letter; the relay queues again those of destinations it runs and
/// refuses the others (they stay dead letters, with the reason); the command waits for
/// that verdict and reports it.
async fn replay(
    config: &Config,
    store: &dyn Store,
    selection: Selection,
) -> anyhow::Result<ExitCode> {
    // An explicit choice that is refused fails the command; `--all` only warns.
    let explicit = !matches!(selection, Selection::All);
    let mut failed = false;
    if let Selection::Ids(ids) = &selection {
        for &id in ids {
            if store.dead_letter(id).await?.is_none() {
                eprintln!("error: no dead letter with id {id}");
                failed = true;
            }
        }
    }
    let batch = uuid::Uuid::now_v7().to_string();
    let requested = store.request_replay(&selection, &batch).await?;
    let verdict = if requested == 0 {
        ReplayVerdict::default()
    } else {
        let patience = config.delivery.poll_interval * 2 + REPLAY_PATIENCE;
        let deadline = Instant::now() + patience;
        let verdict = loop {
            let verdict = store.replay_verdict(&batch).await?;
            if verdict.undecided == 0 || Instant::now() >= deadline {
                break verdict;
            }
            tokio::time::sleep(REPLAY_LOOK_EVERY).await;
        };
        store.forget_replay(&batch).await?;
        if verdict.undecided > 0 {
            eprintln!(
                "warning: no running relay decided about {} dead letter(s) within {}: they stay \
                 dead letters, marked for replay, until a relay runs and decides (is it running, \
                 and on this store?)",
                verdict.undecided,
                humantime::format_duration(patience)
            );
        }
        verdict
    };
    let per = |groups: &[(String, u64)]| {
        groups
            .iter()
            .map(|(d, n)| format!("{d}: {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let replayed: u64 = verdict.replayed.iter().map(|(_, n)| n).sum();
    if replayed == 0 {
        out!("replayed 0 dead letter(s)");
    } else {
        out!(
            "replayed {replayed} dead letter(s) ({}); the running relay has queued them",
            per(&verdict.replayed)
        );
    }
    if verdict.gone > 0 {
        out!(
            "{} were no longer dead letters (purged or replayed meanwhile)",
            verdict.gone
        );
    }
    for (destination, n) in &verdict.refused {
        eprintln!(
            "{}: refused {n} dead letter(s) of destination {destination}: no running relay \
             has it in its config, so nothing would deliver them; they stay dead letters. \
             Add it to the config and reload, then replay again, or purge them \
             (`dead-letters purge --destination {destination}`)",
            if explicit { "error" } else { "warning" }
        );
        failed |= explicit;
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn replay_needs_exactly_one_selection() {
        assert!(Cli::try_parse_from(["faceio-relay", "dead-letters", "replay"]).is_err());
        assert!(
            Cli::try_parse_from(["faceio-relay", "dead-letters", "replay", "--all", "3"]).is_err()
        );
        let cli = Cli::try_parse_from([
            "faceio-relay",
            "dead-letters",
            "replay",
            "3",
            "4",
            "--config",
            "x.yaml",
        ])
        .unwrap();
        assert_eq!(cli.config, PathBuf::from("x.yaml"));
        match cli.command {
            Command::DeadLetters(DeadLetterCommand::Replay(s)) => {
                assert_eq!(s.selection(), Selection::Ids(vec![3, 4]))
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn enroll_sample_has_details_and_others_do_not() {
        let e = sample_payload("ENROLL", "app", "f");
        assert_eq!(e["details"]["gender"], "female");
        assert_eq!(e["details"]["timestamp"].as_str().unwrap().len(), 10);
        assert!(sample_payload("AUTH", "app", "f").get("details").is_none());
    }
}
