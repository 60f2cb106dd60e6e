#!/usr/bin/env bash
# Builds the Debian package: release binary, completions and man pages
# (build-assets.sh), then `cargo deb` with the [package.metadata.deb] settings in
# Cargo.toml. Needs cargo-deb: `cargo install cargo-deb --locked`.
# The .deb lands in ${CARGO_TARGET_DIR:-target}/debian/; its contents are listed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! cargo deb --version >/dev/null 2>&1; then
  echo "build-deb: cargo-deb is missing; install it with: cargo install cargo-deb --locked" >&2
  exit 1
fi

cargo build --release --locked --bin faceio-relay
BIN=${CARGO_TARGET_DIR:-target}/release/faceio-relay packaging/build-assets.sh
# --no-build: the binary was just built; cargo deb would build it again otherwise.
deb=$(cargo deb --no-build --locked "$@" | tail -n 1)
echo "built $deb"
dpkg-deb --info "$deb"
dpkg-deb --contents "$deb"
