//! The forwarder in a process of its own (a hidden subcommand of `loadgen`), so its CPU
//! time is read from `/proc/<pid>/stat` exactly as the relay's is, and neither shares a
//! runtime or a process with the load generator and the sink.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};

use anyhow::{Context, bail};

use crate::servers;

/// `loadgen __forwarder SINK CONCURRENCY CLIENT`: runs the forwarder until stdin closes.
pub const SUBCOMMAND: &str = "__forwarder";

/// The running forwarder child.
pub struct ForwarderProc {
    child: Child,
    pub addr: SocketAddr,
}

impl ForwarderProc {
    /// Starts `loadgen __forwarder` and waits for the address it listens on.
    pub fn start(
        sink: SocketAddr,
        concurrency: usize,
        client: servers::ForwardClient,
    ) -> anyhow::Result<Self> {
        let exe = std::env::current_exe()?;
        let mut child = Command::new(exe)
            .args([
                SUBCOMMAND,
                &sink.to_string(),
                &concurrency.to_string(),
                client.name(),
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("cannot start the forwarder child")?;
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("piped")).read_line(&mut line)?;
        let Some(addr) = line.trim().strip_prefix("addr=") else {
            let _ = child.kill();
            let _ = child.wait();
            bail!("the forwarder child said {line:?} instead of its address");
        };
        Ok(Self {
            addr: addr.parse()?,
            child,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for ForwarderProc {
    fn drop(&mut self) {
        // Closing stdin ends it; kill in case it does not.
        drop(self.child.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The child's `main`: a runtime like the relay's (`#[tokio::main]`: one worker per
/// vCPU), the forwarder, its address on stdout, and an end when the parent goes.
pub fn child_main(args: &[String]) -> anyhow::Result<()> {
    let [sink, concurrency, client] = args else {
        bail!("usage: loadgen {SUBCOMMAND} SINK_ADDR CONCURRENCY hyper|reqwest");
    };
    let sink: SocketAddr = sink.parse()?;
    let concurrency: usize = concurrency.parse()?;
    let client = servers::ForwardClient::parse(client)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let addr = servers::start_forwarder(sink, concurrency, client).await?;
        let mut out = std::io::stdout();
        writeln!(out, "addr={addr}")?;
        out.flush()?;
        tokio::task::spawn_blocking(|| {
            let mut rest = Vec::new();
            let _ = std::io::stdin().read_to_end(&mut rest);
        })
        .await?;
        Ok(())
    })
}
