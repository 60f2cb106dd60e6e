#!/usr/bin/env bash
# System test: the real .deb in a real systemd. Builds the package with
# packaging/build-deb.sh, boots Debian 12 in a container (systemd-nspawn --boot on a
# debootstrap minbase root file system cached under /var/cache/faceio-relay-ci/), and
# walks an operator's day in it: install, token and config, start, simulate, journal,
# the sandbox, reload and logrotate, the watchdog and crashes, stop with deliveries in
# flight, upgrade, remove, purge. Each step prints what it checked; a failure prints the
# container's `journalctl -u faceio-relay` tail. The commands of the README's "Install as
# a service" section must be the ones run here, in the same order.
#
# Needs root, systemd-nspawn (systemd-container), debootstrap, nsenter and cargo-deb
# (installed with cargo if missing). Run by .ci/run.
set -euo pipefail
cd "$(dirname "$0")/../.."
source tests/system/lib.sh

[ "$(id -u)" -eq 0 ] || fail "run as root: the test boots a container"
for tool in systemd-nspawn debootstrap nsenter flock; do
  command -v "$tool" >/dev/null || fail "$tool is missing (apt-get install systemd-container debootstrap util-linux)"
done
CARGO_DEB_VERSION=3.8.0
if ! cargo deb --version >/dev/null 2>&1; then
  cargo install cargo-deb --locked --version "$CARGO_DEB_VERSION"
fi

SUITE_STARTED=$(now_ms)
SCRATCH=$(mktemp -d /tmp/faceio-relay-systest.XXXXXX)
NSPAWN_PID=
CT_PID=
on_exit() {
  local rc=$?
  set +e
  if [ "$rc" -ne 0 ] && [ -n "${CT_PID:-}" ] && kill -0 "${NSPAWN_PID:-0}" 2>/dev/null; then
    say "--- the container's journalctl -u faceio-relay (last 60 lines):" >&2
    ct journalctl -u faceio-relay -n 60 --no-pager 2>&1 | show >&2
  fi
  stop_container
  rm -rf "$SCRATCH"
  [ "$rc" -eq 0 ] || say "system test FAILED" >&2
  exit "$rc"
}
trap on_exit EXIT
trap 'say "failed at tests/system/run.sh:$LINENO: $BASH_COMMAND" >&2' ERR
: >"$SCRATCH/operator.log"

TARGET=$(realpath -m "${CARGO_TARGET_DIR:-target}")
CONFIG=/etc/faceio-relay/relay.yaml
EVENTS=/var/log/faceio-relay/events.jsonl
RECEIVED=/run/receiver

# ---------------------------------------------------------------------------------------
step "0. build the package (packaging/build-deb.sh) and a higher version for the upgrade"
# The upgrade first: cargo deb deletes older packages of the same name from its output
# directory, and the README's glob must find the one package in target/debian.
crate_version=$(cargo pkgid | sed 's/.*[@#]//')
UPGRADE_VERSION=${crate_version}+systest1
mkdir -p "$SCRATCH/upgrade"
packaging/build-deb.sh --deb-version "$UPGRADE_VERSION" --output "$SCRATCH/upgrade/" \
  >"$SCRATCH/build.log" 2>&1 || {
  tail -n 30 "$SCRATCH/build.log" >&2
  fail "building the upgrade package failed"
}
rm -f "$TARGET"/debian/faceio-relay_*.deb
op_host packaging/build-deb.sh >"$SCRATCH/build.log" 2>&1 || {
  tail -n 30 "$SCRATCH/build.log" >&2
  fail "packaging/build-deb.sh failed"
}
shopt -s nullglob
debs=("$TARGET"/debian/faceio-relay_*.deb)
upgrade_debs=("$SCRATCH"/upgrade/faceio-relay_*.deb)
shopt -u nullglob
[ "${#debs[@]}" -eq 1 ] || fail "expected one .deb in $TARGET/debian, found: ${debs[*]:-none}"
[ "${#upgrade_debs[@]}" -eq 1 ] || fail "expected one upgrade .deb, found: ${upgrade_debs[*]:-none}"
DEB_VERSION=$(dpkg-deb -f "${debs[0]}" Version)
[ "$(dpkg-deb -f "${upgrade_debs[0]}" Version)" = "$UPGRADE_VERSION" ] || fail "the upgrade package is not version $UPGRADE_VERSION"
dpkg --compare-versions "$UPGRADE_VERSION" gt "$DEB_VERSION" || fail "$UPGRADE_VERSION is not newer than $DEB_VERSION"
ok "built $(basename "${debs[0]}") ($DEB_VERSION) and $(basename "${upgrade_debs[0]}") ($UPGRADE_VERSION)"

ensure_rootfs
boot_container \
  --bind-ro="$TARGET/debian:/root/faceio-relay/target/debian" \
  --bind-ro="$SCRATCH/upgrade:/root/upgrade/target/debian" \
  --bind-ro="$PWD/tests/system:/root/system"

# ---------------------------------------------------------------------------------------
step "1. dpkg -i: the postinst says what to do; the unit is enabled, not started; check says what is missing"
op 'dpkg -i ./target/debian/faceio-relay_*.deb'
grep -Fq 'needs your FACEIO' <<<"$OUT" || fail "the postinst did not say the token is needed"
POSTINST=$(sed -n 's/^  \(sudo \)\{0,1\}\([a-z]\)/\2/p' <<<"$OUT" | sed 's/[[:space:]]*#.*$//')
printf '%s\n' "$POSTINST" | grep -qx 'install -m 600 /dev/null /etc/faceio-relay/faceio-token' \
  || fail "the postinst does not say how to create the token file"
ok "the postinst message names the token file, the config, check and start"
[ "$(ct systemctl is-enabled faceio-relay)" = enabled ] || fail "the unit is not enabled"
state=$(ct systemctl is-active faceio-relay || true)
[ "$state" = inactive ] || fail "the unit is $state after install, not inactive"
ok "faceio-relay.service is enabled and inactive"
rc=0
op 'faceio-relay check' || rc=$?
[ "$rc" -eq 1 ] || fail "check on the packaged config exited $rc, not 1"
grep -Fq 'applications[0].token_file' <<<"$OUT" || fail "check does not name the missing token file"
grep -Fq 'cannot read the token file' <<<"$OUT" || fail "check does not say the token file is missing"
ok "check exits 1: applications[0].token_file: cannot read the token file"

# ---------------------------------------------------------------------------------------
step "2. token and app id as the postinst says; start; active only once READY; STATUS"
# The operator follows the postinst's lines, in its order.
expected_postinst="install -m 600 /dev/null /etc/faceio-relay/faceio-token
sudoedit /etc/faceio-relay/faceio-token
sudoedit /etc/faceio-relay/relay.yaml
faceio-relay check
systemctl start faceio-relay"
[ "$POSTINST" = "$expected_postinst" ] || {
  printf '%s\n' "$POSTINST" | show >&2
  fail "the postinst's commands changed; update this test and the README"
}
TOKEN=systest-token-$RANDOM$RANDOM
APP_ID=fioa-systest
op 'install -m 600 /dev/null /etc/faceio-relay/faceio-token'
printf '%s\n' "$TOKEN" | op_edit /etc/faceio-relay/faceio-token
ct cat "$CONFIG" | sed "s/app_id: fioa-change-me /app_id: $APP_ID /" >"$SCRATCH/relay.yaml"
grep -q "app_id: $APP_ID " "$SCRATCH/relay.yaml" || fail "the packaged relay.yaml has no app_id: fioa-change-me"
op_edit "$CONFIG" <"$SCRATCH/relay.yaml"
cp "$SCRATCH/relay.yaml" "$SCRATCH/base.yaml"
op 'faceio-relay check' || fail "check fails with the token and app id in place"
grep -Fq "$APP_ID" <<<"$OUT" || fail "check's summary does not name $APP_ID"
# Secrets for ${VAR}s go in the env file (mode 0600); the relay reads it at start.
ct_sh "install -m 600 /dev/null /etc/faceio-relay/env && echo RECEIVER_URL=http://127.0.0.1:8099/api >/etc/faceio-relay/env"
op "sh -c 'set -a; . /etc/faceio-relay/env; exec faceio-relay check'" || fail "check with the env file fails"
ok "check passes, with and without the env file"
journal_mark
op 'systemctl start faceio-relay'
# Type=notify: `systemctl start` returns once the relay sent READY=1, and by then it
# answers; systemd logged "Started" after the relay's own start-up lines.
[ "$(ct systemctl is-active faceio-relay)" = active ] || fail "not active after start"
ct curl -fsS -o /dev/null http://127.0.0.1:9090/readyz || fail "active, but /readyz does not answer 200"
ct curl -sS -o /dev/null -w '%{http_code}' -X POST http://127.0.0.1:8080/webhook >"$SCRATCH/code" || true
[ "$(cat "$SCRATCH/code")" != 000 ] || fail "active, but the webhook port does not answer"
journal_pids_since >"$SCRATCH/start.log"
pid=$(main_pid)
started_at=$(grep -n 'Started faceio-relay.service' "$SCRATCH/start.log" | head -n 1 | cut -d: -f1)
ready_at=$(grep -n "^$pid	faceio-relay ready" "$SCRATCH/start.log" | head -n 1 | cut -d: -f1)
[ -n "$started_at" ] || fail "no 'Started faceio-relay.service' line"
[ -n "$ready_at" ] || fail "the relay (pid $pid) did not log 'faceio-relay ready'"
[ "$ready_at" -lt "$started_at" ] || fail "systemd said Started before the relay was ready (not Type=notify?)"
[ "$(unit_prop Type)" = notify ] || fail "the unit is not Type=notify"
ok "is-active is 'active' only after READY: 'Started' follows the relay's start-up log, /readyz and the webhook port answer at once"
op 'systemctl status faceio-relay'
grep -Eq 'Status: "(accepting webhooks|[0-9]+ accepted)' <<<"$OUT" || fail "systemctl status shows no STATUS line"
ok "systemctl status shows the relay's STATUS line"
OP_FOR=2 op 'journalctl -u faceio-relay -f'
grep -Fq 'faceio-relay' <<<"$OUT" || fail "journalctl -u faceio-relay -f shows nothing"

# ---------------------------------------------------------------------------------------
step "3. simulate ENROLL: 200, a line in events.jsonl, its story in the journal by EVENT_ID"
simulate ENROLL
ENROLL_ID=$ID
ok "simulate ENROLL answered 200, event $ENROLL_ID"
wait_until 10 "event $ENROLL_ID in $EVENTS" all_in_file "$EVENTS" "$ENROLL_ID"
ok "$EVENTS holds event $ENROLL_ID"
wait_until 10 "the delivered line of $ENROLL_ID" \
  eval "ct journalctl -u faceio-relay EVENT_ID=$ENROLL_ID -o export --no-pager | grep -qx 'STATUS=delivered'"
ct journalctl -u faceio-relay EVENT_ID="$ENROLL_ID" -o export --no-pager >"$SCRATCH/story"
awk 'BEGIN { RS = "" } { m = d = s = ""
  for (i = 1; i <= split($0, f, "\n"); i++) {
    if (f[i] ~ /^MESSAGE=/) m = substr(f[i], 9)
    if (f[i] ~ /^DESTINATION=/) d = f[i]
    if (f[i] ~ /^STATUS=/) s = f[i] }
  print m (d != "" ? " " d : "") (s != "" ? " " s : "") }' "$SCRATCH/story" >"$SCRATCH/story.txt"
show <"$SCRATCH/story.txt"
grep -q '^event accepted' "$SCRATCH/story.txt" || fail "no 'event accepted' line for EVENT_ID=$ENROLL_ID"
grep -q '^delivery succeeded DESTINATION=audit STATUS=delivered$' "$SCRATCH/story.txt" \
  || fail "no 'delivery succeeded' line with DESTINATION=audit STATUS=delivered for EVENT_ID=$ENROLL_ID"
ok "journalctl -u faceio-relay EVENT_ID=$ENROLL_ID: accepted, then delivered with DESTINATION=audit STATUS=delivered"
wait_until 12 "STATUS with 1 accepted, 1 delivered" \
  eval "ct systemctl status faceio-relay --no-pager | grep -Fq 'Status: \"1 accepted, 1 delivered'"
ok "systemctl status: \"1 accepted, 1 delivered ...\""

# ---------------------------------------------------------------------------------------
step "4. the sandbox: dynamic user, nothing writable but its directories, token by credential"
pid=$(main_pid)
uid=$(ct awk '/^Uid:/ { print $2 }' "/proc/$pid/status")
[ "$uid" -ge 61184 ] && [ "$uid" -le 65519 ] || fail "the relay runs as uid $uid, not a dynamic user (61184-65519)"
ct test -L /var/lib/faceio-relay || fail "/var/lib/faceio-relay is not DynamicUser's link to /var/lib/private"
db_uid=$(ct stat -c %u /var/lib/private/faceio-relay/relay.db)
[ "$db_uid" = "$uid" ] || fail "the store belongs to uid $db_uid, not the service's $uid"
ok "the relay (pid $pid) runs as dynamic uid $uid, owner of /var/lib/private/faceio-relay/relay.db"
environ=$(ct_sh "tr '\\0' '\\n' </proc/$pid/environ")
grep -qx 'CREDENTIALS_DIRECTORY=/run/credentials/faceio-relay.service' <<<"$environ" \
  || fail "the relay has no CREDENTIALS_DIRECTORY"
[ "$(ct stat -c '%u %a' /etc/faceio-relay/faceio-token)" = "0 600" ] || fail "the token file is not root's, 0600"
ok "CREDENTIALS_DIRECTORY=/run/credentials/faceio-relay.service; /etc/faceio-relay/faceio-token stays root's, 0600"

# The token is read through the credential: pointed at the original, the relay cannot read it.
sed "s|token_file: \${CREDENTIALS_DIRECTORY:-/etc/faceio-relay}/faceio-token|token_file: /etc/faceio-relay/faceio-token|" \
  "$SCRATCH/base.yaml" >"$SCRATCH/relay.yaml"
op_edit "$CONFIG" <"$SCRATCH/relay.yaml"
journal_mark
ct systemctl restart faceio-relay 2>/dev/null && fail "the relay started reading /etc/faceio-relay/faceio-token itself"
expect_failed_once 'cannot read the token file: Permission denied'
ok "with token_file: /etc/faceio-relay/faceio-token the start fails (Permission denied), exit 78, not restarted: the token comes only by \$CREDENTIALS_DIRECTORY"

# A file destination outside StateDirectory= and LogsDirectory=: in /etc/faceio-relay
# (root's), then in a directory anyone may write to, where only the sandbox
# (ProtectSystem=strict) stands in the way.
ct install -d -m 1777 /srv/drop
for outside in /etc/faceio-relay/events.jsonl /srv/drop/events.jsonl; do
  awk -v path="$outside" '{ print } /^destinations:/ { print "  outside:\n    type: file\n    path: " path }' \
    "$SCRATCH/base.yaml" | sed 's/to: \[audit\]$/to: [audit, outside]/' >"$SCRATCH/relay.yaml"
  grep -q 'to: \[audit, outside\]' "$SCRATCH/relay.yaml" || fail "no route to audit in the config to extend"
  op_edit "$CONFIG" <"$SCRATCH/relay.yaml"
  op 'faceio-relay check' || fail "check refuses the destination $outside (root can write there)"
  journal_mark
  ct systemctl restart faceio-relay 2>/dev/null && fail "the relay started with a destination at $outside"
  wait_journal "cannot open $outside"
  expect_failed_once "cannot open $outside"
  case $outside in
    /srv/*) journal_since | grep -F "cannot open $outside" | grep -q 'Read-only file system' \
      || fail "the log does not say $outside is on a read-only file system" ;;
  esac
  ct test ! -e "$outside" || fail "the relay wrote $outside"
  ok "a file destination at $outside fails the start with 'cannot open $outside', exit 78, not restarted: the unit stays failed"
done
op_edit "$CONFIG" <"$SCRATCH/base.yaml"
# As the README says after a failed start.
ct systemctl start faceio-relay
ok "config restored; systemctl start: running again"

# ---------------------------------------------------------------------------------------
step "5. reload: a valid change applies, a broken file keeps the old config; logrotate"
awk '{ print } /^destinations:/ { print "  enrollments:\n    type: file\n    path: /var/log/faceio-relay/enrollments.jsonl" }
     /^routes:/ { print "  - name: enrollments\n    match: { eventName: ENROLL }\n    to: [enrollments]" }' \
  "$SCRATCH/base.yaml" >"$SCRATCH/valid.yaml"
op_edit "$CONFIG" <"$SCRATCH/valid.yaml"
pid=$(main_pid)
journal_mark
op 'faceio-relay check && systemctl reload faceio-relay'
wait_journal 'configuration reloaded'
simulate ENROLL
wait_until 10 "event $ID in enrollments.jsonl" all_in_file /var/log/faceio-relay/enrollments.jsonl "$ID"
[ "$(main_pid)" = "$pid" ] || fail "the reload restarted the relay"
ok "valid change: 'configuration reloaded', the new enrollments destination gets ENROLL events, same pid"

# Two mistakes: an unknown key and a route to a destination that does not exist.
sed -e 's/^  retention: 7d/  retention: 7d\n  retentoin: 8d/' -e 's/to: \[enrollments\]/to: [enrolments]/' \
  "$SCRATCH/valid.yaml" >"$SCRATCH/broken.yaml"
op_edit "$CONFIG" <"$SCRATCH/broken.yaml"
rc=0
op 'faceio-relay check' || rc=$?
[ "$rc" -eq 1 ] || fail "check passed the broken file"
journal_mark
ct systemctl reload faceio-relay
wait_journal 'still running on the previous one'
journal_since | grep -F 'relay.yaml:' | show
journal_since | grep -Eq 'relay\.yaml:[0-9]+:[0-9]+: store\.retentoin' || fail "the reload log lacks the unknown key's error with line and column"
journal_since | grep -Eq 'relay\.yaml:[0-9]+:[0-9]+: routes\[[0-9]\]\.to\[0\].*enrolments' || fail "the reload log lacks the unknown destination's error with line and column"
# `simulate` reads relay.yaml, broken now: post as FACEIO would, with curl.
post_event ENROLL "$APP_ID" "$TOKEN"
wait_until 10 "event $ID in enrollments.jsonl (old config kept)" all_in_file /var/log/faceio-relay/enrollments.jsonl "$ID"
[ "$(ct systemctl is-active faceio-relay)" = active ] && [ "$(main_pid)" = "$pid" ] || fail "the broken reload stopped or restarted the relay"
ok "broken file: both errors logged with line and column, the relay keeps the previous config (same pid, enrollments still fed)"
op_edit "$CONFIG" <"$SCRATCH/valid.yaml"
op 'faceio-relay check && systemctl reload faceio-relay'

# logrotate with the packaged file: its postrotate reloads; the relay writes a fresh file.
before=$(ct_sh "wc -l <$EVENTS")
journal_mark
ct logrotate -f /etc/logrotate.d/faceio-relay
ct test -s "$EVENTS.1" || fail "logrotate did not rotate $EVENTS"
[ "$(ct_sh "wc -l <$EVENTS.1")" = "$before" ] || fail "$EVENTS.1 does not hold the $before lines written before"
wait_journal 'configuration reloaded'
simulate AUTH
wait_until 10 "event $ID in a fresh $EVENTS" all_in_file "$EVENTS" "$ID"
[ "$(ct_sh "wc -l <$EVENTS")" = 1 ] || fail "$EVENTS is not a fresh file with the one new event"
[ "$(ct stat -c %u "$EVENTS")" = "$(ct awk '/^Uid:/ { print $2 }' "/proc/$(main_pid)/status")" ] \
  || fail "the fresh $EVENTS does not belong to the service"
[ "$(count_in "$EVENTS.1" "$ID")" = 0 ] || fail "the new event went to $EVENTS.1"
ok "logrotate -f: $EVENTS.1 has the $before old lines; after its reload the next event opens a fresh $EVENTS"
cp "$SCRATCH/valid.yaml" "$SCRATCH/base.yaml"

# ---------------------------------------------------------------------------------------
step "6. watchdog: kill -STOP is caught within WatchdogSec; kill -9 restarts; nothing answered is lost"
watchdog_s=$(seconds_of "$(unit_prop WatchdogUSec)")
restart_s=$(seconds_of "$(unit_prop RestartUSec)")
ids=()
for _ in 1 2 3 4 5; do simulate AUTH; ids+=("$ID"); done
restarts=$(unit_prop NRestarts)
pid=$(main_pid)
journal_mark
stopped=$(now_ms)
ct kill -STOP "$pid"
say "   kill -STOP $pid (WatchdogSec=${watchdog_s}s)"
wait_until $((watchdog_s + 20)) "a restart after the watchdog" \
  eval '[ "$(unit_prop NRestarts)" -gt '"$restarts"' ] && [ "$(ct systemctl is-active faceio-relay)" = active ]'
took=$(($(now_ms) - stopped))
journal_since | grep -F 'Watchdog timeout' | show
journal_since_has 'Watchdog timeout' || fail "systemd did not log a watchdog timeout"
[ "$took" -le $(((watchdog_s + restart_s + 5) * 1000)) ] || fail "restarted ${took} ms after STOP, more than WatchdogSec + RestartSec"
[ "$(main_pid)" != "$pid" ] || fail "same pid after the watchdog"
wait_until 20 "the 5 events sent before STOP in $EVENTS" all_in_file "$EVENTS" "${ids[@]}"
ok "watchdog timeout, restarted ${took} ms after kill -STOP (NRestarts $restarts -> $(unit_prop NRestarts)); the 5 events answered before are in $EVENTS"

ids=()
for _ in 1 2 3 4 5; do simulate DELETION; ids+=("$ID"); done
restarts=$(unit_prop NRestarts)
pid=$(main_pid)
ct kill -9 "$pid"
say "   kill -9 $pid"
wait_until 20 "a restart after kill -9" \
  eval '[ "$(unit_prop NRestarts)" -gt '"$restarts"' ] && [ "$(ct systemctl is-active faceio-relay)" = active ]'
wait_until 20 "the 5 events sent before kill -9 in $EVENTS" all_in_file "$EVENTS" "${ids[@]}"
ok "kill -9: restarted (Restart=on-failure, NRestarts now $(unit_prop NRestarts)); the 5 events answered before are in $EVENTS"

# ---------------------------------------------------------------------------------------
step "7. systemctl stop with deliveries in flight to a slow API: exits in time, delivers after start"
ct mkdir -p "$RECEIVED"
ct systemd-run --unit=receiver --quiet perl /root/system/receiver.pl 8099 "$RECEIVED"
wait_until 10 "the receiver to listen" ct test -e "$RECEIVED/listening"
awk '{ print } /^destinations:/ { print "  api:\n    type: http\n    url: ${RECEIVER_URL}\n    timeout: 5m\n    concurrency: 4" }
     /^routes:/ { print "  - name: api\n    to: [api]" }' "$SCRATCH/base.yaml" >"$SCRATCH/api.yaml"
op_edit "$CONFIG" <"$SCRATCH/api.yaml"
journal_mark
# The URL is ${RECEIVER_URL} from /etc/faceio-relay/env (EnvironmentFile=): check needs it too.
op "sh -c 'set -a; . /etc/faceio-relay/env; exec faceio-relay check' && systemctl reload faceio-relay"
wait_journal 'configuration reloaded'
ct touch "$RECEIVED/hold"
ids=()
for _ in 1 2 3 4 5 6; do simulate ENROLL; ids+=("$ID"); done
wait_until 10 "4 deliveries held by the slow API" eval '[ "$(ct_sh "wc -l <$RECEIVED/held")" -ge 4 ]'
stop_timeout_s=$(seconds_of "$(unit_prop TimeoutStopUSec)")
stopping=$(now_ms)
ct systemctl stop faceio-relay
took=$(($(now_ms) - stopping))
[ "$took" -lt $((stop_timeout_s * 1000)) ] || fail "stop took ${took} ms, TimeoutStopSec=${stop_timeout_s}s"
[ "$(unit_prop Result)" = success ] || fail "the stop was not clean: Result=$(unit_prop Result)"
[ "$(unit_prop ExecMainStatus)" = 0 ] || fail "the relay exited $(unit_prop ExecMainStatus) on SIGTERM"
answered=$(ct_sh "cat $RECEIVED/answered 2>/dev/null | wc -l")
[ "$answered" -eq 0 ] || fail "the held deliveries were answered"
ok "stopped in ${took} ms (TimeoutStopSec=${stop_timeout_s}s), exit 0, with $(ct_sh "wc -l <$RECEIVED/held") deliveries held unanswered"
ct rm "$RECEIVED/hold"
ct systemctl start faceio-relay
wait_until 30 "the 6 deliveries answered after the start" all_lines_in "$RECEIVED/answered" "${ids[@]}"
ok "after the next start all 6 events reached the API"
cp "$SCRATCH/api.yaml" "$SCRATCH/base.yaml"

# ---------------------------------------------------------------------------------------
step "8. upgrade while running keeps the store and pending deliveries; remove keeps config and state; purge removes them"
# A dead letter in the store, to find after the upgrade.
awk '{ print } /^destinations:/ { print "  nowhere:\n    type: http\n    url: http://127.0.0.1:9/\n    retry: { max_attempts: 1 }" }
     /^routes:/ { print "  - name: nowhere\n    match: { eventName: DELETION }\n    to: [nowhere]" }' \
  "$SCRATCH/base.yaml" >"$SCRATCH/relay.yaml"
op_edit "$CONFIG" <"$SCRATCH/relay.yaml"
journal_mark
op "sh -c 'set -a; . /etc/faceio-relay/env; exec faceio-relay check' && systemctl reload faceio-relay"
wait_journal 'configuration reloaded'
simulate DELETION
DEAD_ID=$ID
wait_until 20 "the dead letter of $DEAD_ID" eval "relay_cli dead-letters list --json | grep -Fq '\"event_id\":\"$DEAD_ID\"'"
ct touch "$RECEIVED/hold"
held_before=$(ct_sh "sort -u $RECEIVED/held | wc -l")
ids=()
for _ in 1 2 3; do simulate ENROLL; ids+=("$ID"); done
wait_until 10 "3 deliveries held before the upgrade" eval '[ "$(ct_sh "sort -u $RECEIVED/held | wc -l")" -ge $((held_before + 3)) ]'
pid=$(main_pid)
# The operator's checkout, a version later: its target/debian holds the new package.
OP_DIR=/root/upgrade op 'dpkg -i ./target/debian/faceio-relay_*.deb'
[ "$(ct dpkg-query -W -f '${Version}' faceio-relay)" = "$UPGRADE_VERSION" ] || fail "the installed version is not $UPGRADE_VERSION"
[ "$(ct systemctl is-active faceio-relay)" = active ] || fail "the relay is not running after the upgrade"
[ "$(main_pid)" != "$pid" ] || fail "the upgrade did not restart the relay (same pid $pid)"
ok "dpkg -i $UPGRADE_VERSION while running: restarted (pid $pid -> $(main_pid)), active"
relay_cli dead-letters list --json | grep -Fq "\"event_id\":\"$DEAD_ID\"" || fail "the dead letter of $DEAD_ID is gone after the upgrade"
ct rm "$RECEIVED/hold"
wait_until 30 "the 3 pending deliveries answered after the upgrade" all_lines_in "$RECEIVED/answered" "${ids[@]}"
ok "after the upgrade: the dead letter is still in the store and the 3 deliveries pending at the upgrade reached the API"

OP_ANSWER=y op 'apt-get remove faceio-relay'
ct test ! -e /usr/bin/faceio-relay || fail "apt-get remove left the binary"
state=$(ct systemctl is-active faceio-relay || true)
[ "$state" != active ] || fail "the relay still runs after apt-get remove"
for kept in "$CONFIG" /etc/faceio-relay/faceio-token /var/lib/private/faceio-relay/relay.db "$EVENTS"; do
  ct test -e "$kept" || fail "apt-get remove deleted $kept"
done
cmp -s <(ct cat "$CONFIG") "$SCRATCH/relay.yaml" || fail "apt-get remove changed $CONFIG"
ok "apt-get remove: stopped, binary gone; relay.yaml (as edited), the token, the store and the events file kept"
OP_ANSWER=y op 'apt-get purge faceio-relay'
for gone in /etc/faceio-relay /var/lib/faceio-relay /var/lib/private/faceio-relay \
  /var/log/faceio-relay /var/log/private/faceio-relay /etc/logrotate.d/faceio-relay; do
  ct test ! -e "$gone" || fail "apt-get purge left $gone"
done
ok "apt-get purge: /etc/faceio-relay, the store and the logs are gone"

# ---------------------------------------------------------------------------------------
step "README"
check_readme_matches

say ""
say "system test passed in $((($(now_ms) - SUITE_STARTED) / 1000)) s (boot ${BOOT_MS} ms)"
