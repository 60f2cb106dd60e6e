//! The `faceio-relay` binary: everything lives in the library; see `cli`.

use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    faceio_relay::cli::main().await
}
