#!/usr/bin/env bash
# Checks systemd/faceio-relay.service: `systemd-analyze verify` must pass and
# `systemd-analyze security` must rate its exposure at MAX_EXPOSURE or lower.
#
# verify checks that ExecStart= exists, so it runs on a copy of the unit whose
# /usr/bin/faceio-relay points at the binary cargo built (run `cargo build` first, or
# pass BIN=/path/to/faceio-relay).
set -euo pipefail
cd "$(dirname "$0")/.."

MAX_EXPOSURE=${MAX_EXPOSURE:-1.5}
UNIT=systemd/faceio-relay.service
BIN=${BIN:-${CARGO_TARGET_DIR:-target}/debug/faceio-relay}

if ! command -v systemd-analyze >/dev/null; then
  echo "check-unit: systemd-analyze not found (install the systemd package)" >&2
  exit 1
fi
if [ ! -x "$BIN" ]; then
  echo "check-unit: $BIN not found; run cargo build first or set BIN" >&2
  exit 1
fi
BIN=$(realpath "$BIN")

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
sed "s|/usr/bin/faceio-relay|$BIN|g" "$UNIT" >"$work/faceio-relay.service"

# verify prints problems but may still exit 0 for some of them: fail on any output
# that mentions the unit.
verify_out=$(systemd-analyze verify --man=no "$work/faceio-relay.service" 2>&1) || {
  echo "$verify_out" >&2
  echo "check-unit: systemd-analyze verify failed" >&2
  exit 1
}
if grep -q "faceio-relay" <<<"$verify_out"; then
  echo "$verify_out" >&2
  echo "check-unit: systemd-analyze verify reported problems with the unit" >&2
  exit 1
fi
echo "check-unit: systemd-analyze verify OK"

security_out=$(systemd-analyze security --offline=true "$UNIT" 2>&1)
overall=$(grep "Overall exposure level" <<<"$security_out" || true)
if [ -z "$overall" ] || grep -qi "invalid\|ignoring" <<<"$security_out"; then
  echo "$security_out" >&2
  echo "check-unit: systemd-analyze security failed or reported unit problems" >&2
  exit 1
fi
score=$(sed -E 's/.*: ([0-9]+\.[0-9]+).*/\1/' <<<"$overall")
echo "check-unit: $overall"
if ! awk -v s="$score" -v max="$MAX_EXPOSURE" 'BEGIN { exit !(s <= max) }'; then
  echo "$security_out" >&2
  echo "check-unit: exposure $score is above $MAX_EXPOSURE" >&2
  exit 1
fi
