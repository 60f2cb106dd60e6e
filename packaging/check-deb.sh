#!/usr/bin/env bash
# Builds the .deb with packaging/build-deb.sh and checks what it installs: the binary,
# the unit, the example config and logrotate file as conffiles, completions, man pages,
# the postinst systemd handling; then runs the packaged binary's `check` on the packaged
# config (token from a credentials directory, as under systemd).
# Installs cargo-deb first if it is missing. Run by .ci/run.
set -euo pipefail
shopt -s nullglob
cd "$(dirname "$0")/.."

CARGO_DEB_VERSION=3.8.0
if ! cargo deb --version >/dev/null 2>&1; then
  cargo install cargo-deb --locked --version "$CARGO_DEB_VERSION"
fi

target=${CARGO_TARGET_DIR:-target}
rm -f "$target"/debian/faceio-relay_*.deb
packaging/build-deb.sh >/dev/null
debs=("$target"/debian/faceio-relay_*.deb)
[ "${#debs[@]}" -eq 1 ] || { echo "check-deb: expected one .deb, found: ${debs[*]}" >&2; exit 1; }
deb=${debs[0]}

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
dpkg-deb -x "$deb" "$scratch/root"
dpkg-deb -e "$deb" "$scratch/control"

fail=0
for path in \
  usr/bin/faceio-relay \
  usr/lib/systemd/system/faceio-relay.service \
  etc/faceio-relay/relay.yaml \
  etc/logrotate.d/faceio-relay \
  usr/share/bash-completion/completions/faceio-relay \
  usr/share/zsh/vendor-completions/_faceio-relay \
  usr/share/fish/vendor_completions.d/faceio-relay.fish \
  usr/share/man/man1/faceio-relay.1.gz \
  usr/share/man/man1/faceio-relay-run.1.gz \
  usr/share/man/man1/faceio-relay-check.1.gz \
  usr/share/man/man1/faceio-relay-dead-letters.1.gz \
  usr/share/doc/faceio-relay/copyright; do
  if [ ! -s "$scratch/root/$path" ]; then
    echo "check-deb: /$path missing or empty in $deb" >&2
    fail=1
  fi
done
for conffile in /etc/faceio-relay/relay.yaml /etc/logrotate.d/faceio-relay; do
  if ! grep -qx "$conffile" "$scratch/control/conffiles"; then
    echo "check-deb: $conffile is not a conffile (edits would be lost on upgrade)" >&2
    fail=1
  fi
done
# The unit is enabled by postinst but not started (the token must be set first).
if ! grep -q 'deb-systemd-helper enable' "$scratch/control/postinst"; then
  echo "check-deb: postinst does not enable the unit" >&2
  fail=1
fi
if grep -Eq '_dh_action=start|deb-systemd-invoke start' "$scratch/control/postinst"; then
  echo "check-deb: postinst starts the unit before a token is set" >&2
  fail=1
fi
cmp -s "$scratch/root/usr/lib/systemd/system/faceio-relay.service" systemd/faceio-relay.service \
  || { echo "check-deb: the packaged unit differs from systemd/faceio-relay.service" >&2; fail=1; }
grep -q 'faceio-relay' <(zcat "$scratch/root/usr/share/man/man1/faceio-relay.1.gz") \
  || { echo "check-deb: the man page does not name the command" >&2; fail=1; }

# The packaged binary accepts the packaged config, token from the credentials directory.
mkdir -p "$scratch/credentials"
echo "packaged-token" >"$scratch/credentials/faceio-token"
if ! CREDENTIALS_DIRECTORY="$scratch/credentials" \
  "$scratch/root/usr/bin/faceio-relay" check \
  --config "$scratch/root/etc/faceio-relay/relay.yaml" >"$scratch/check.out" 2>&1; then
  echo "check-deb: the packaged config does not pass check:" >&2
  cat "$scratch/check.out" >&2
  fail=1
fi

[ "$fail" -eq 0 ] || exit 1
echo "check-deb: $deb installs the binary, unit, conffiles, completions and man pages; its config passes check"
