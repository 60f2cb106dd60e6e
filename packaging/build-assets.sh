#!/usr/bin/env bash
# Writes shell completions and man pages, generated from the clap definitions by the
# hidden `faceio-relay generate` command, into target/assets/ (where the .deb's assets
# list expects them):
#   target/assets/completions/{faceio-relay.bash,_faceio-relay,faceio-relay.fish}
#   target/assets/man/faceio-relay*.1.gz
# Uses BIN if set, else builds the release binary.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -z "${BIN:-}" ]; then
  cargo build --release --locked --bin faceio-relay
  BIN=${CARGO_TARGET_DIR:-target}/release/faceio-relay
fi

out=target/assets
rm -rf "$out"
mkdir -p "$out/completions" "$out/man"
"$BIN" generate completions bash >"$out/completions/faceio-relay.bash"
"$BIN" generate completions zsh >"$out/completions/_faceio-relay"
"$BIN" generate completions fish >"$out/completions/faceio-relay.fish"
"$BIN" generate man "$out/man"
# -n: no name or timestamp in the header, so the package is reproducible.
gzip -9n "$out"/man/*.1
echo "assets in $out:"
find "$out" -type f | sort
