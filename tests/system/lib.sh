# Helpers for tests/system/run.sh (sourced): the cached root file system, the container's
# life, running commands inside it, the journal, and assertions.
#
# Inside the container every command runs through `ct`: nsenter into all namespaces of
# the container's init (the child of the systemd-nspawn process), with a clean
# environment, so nothing of the host (PATH, RUST_LOG, CARGO_*) leaks in.

# Packages of the cached root file system, on top of debootstrap's minbase. logrotate:
# step 5 runs the packaged logrotate file.
ROOTFS_PACKAGES=systemd,systemd-sysv,dbus,procps,curl,ca-certificates,logrotate
ROOTFS_SUITE=bookworm
CACHE_DIR=${FACEIO_RELAY_CI_CACHE:-/var/cache/faceio-relay-ci}
# Booting a cached root file system must stay under this.
BOOT_LIMIT_S=60

say() { printf '%s\n' "$*"; }
step() { printf '\n== %s\n' "$*"; }
ok() { printf '   ok: %s\n' "$*"; }
fail() {
  printf 'FAIL: %s\n' "$*" >&2
  exit 1
}
# Indents captured output for the step log.
show() { sed 's/^/   | /'; }

now_ms() { date +%s%3N; }

# The Debian mirror configured for apt on this machine (deb822 .sources or one-line
# .list), for the suite we bootstrap. Fails loudly when there is none.
debian_mirror() {
  local url
  url=$(awk -v suite="$ROOTFS_SUITE" '
    /^[ \t]*$/ { if (uris != "" && hit) { print uris; exit } uris = ""; hit = 0; next }
    /^URIs:/ { uris = $2 }
    /^Suites:/ { for (i = 2; i <= NF; i++) if ($i == suite) hit = 1 }
    END { if (uris != "" && hit) print uris }
  ' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -n 1)
  if [ -z "$url" ]; then
    url=$(awk -v suite="$ROOTFS_SUITE" '$1 == "deb" && $3 == suite { print $2; exit }' \
      /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null | head -n 1)
  fi
  [ -n "$url" ] || fail "no Debian mirror for $ROOTFS_SUITE in /etc/apt/sources.list{,.d/}: debootstrap needs one"
  printf '%s\n' "$url"
}

# The cached root file system, built with debootstrap when missing (or when the package
# list changed: the list is part of the directory name). Sets ROOTFS. It is only ever
# booted with --volatile=overlay, so runs never change it. Takes the cache's lock for
# the rest of the run: systemd-nspawn locks the tree it boots, so a second run (another
# checkout's CI) waits here for the first to finish instead of failing.
ensure_rootfs() {
  local key
  key=$(printf '%s %s' "$ROOTFS_SUITE" "$ROOTFS_PACKAGES" | sha256sum | cut -c1-12)
  ROOTFS=$CACHE_DIR/$ROOTFS_SUITE-minbase-$key
  mkdir -p "$CACHE_DIR"
  exec {CACHE_LOCK}>"$CACHE_DIR/.lock"
  if ! flock -n "$CACHE_LOCK"; then
    say "waiting for another system test to finish with $CACHE_DIR"
    flock -w 1200 "$CACHE_LOCK" || fail "another system test kept $CACHE_DIR locked for 20 minutes"
  fi
  if [ ! -x "$ROOTFS/usr/lib/systemd/systemd" ]; then
    local mirror started
    mirror=$(debian_mirror)
    say "building the root file system $ROOTFS (debootstrap from $mirror; cached for later runs)"
    # Root file systems of an older package list are of no use any more.
    rm -rf "$CACHE_DIR"/"$ROOTFS_SUITE"-minbase-* "$CACHE_DIR"/tmp.*
    local tmp
    tmp=$(mktemp -d "$CACHE_DIR/tmp.XXXXXX")
    started=$(now_ms)
    if ! debootstrap --variant=minbase --include="$ROOTFS_PACKAGES" \
      "$ROOTFS_SUITE" "$tmp" "$mirror" >"$tmp.log" 2>&1; then
      tail -n 30 "$tmp.log" >&2
      rm -rf "$tmp" "$tmp.log"
      fail "debootstrap failed (log above)"
    fi
    rm -f "$tmp.log"
    # Only a complete tree gets the final name.
    mv "$tmp" "$ROOTFS"
    say "root file system built in $(($(now_ms) - started)) ms"
  else
    say "root file system: $ROOTFS (cached)"
  fi
}

# Boots the container: systemd-nspawn --boot on an overlay of the cached root file
# system (writes go to a tmpfs and vanish with the container), no host systemd involved
# (--register=no --keep-unit), a network namespace of its own (only loopback: the relay
# and the test's receiver bind fixed ports, which must not meet the host's). Extra
# arguments are passed to systemd-nspawn (bind mounts). Sets NSPAWN_PID and CT_PID.
boot_container() {
  local machine=relay-systest-$$
  # systemd-nspawn keeps its state under /run/systemd/nspawn, which must be a tmpfs;
  # /run is not one on this machine kind.
  mkdir -p /run/systemd/nspawn
  mountpoint -q /run/systemd/nspawn || mount -t tmpfs tmpfs /run/systemd/nspawn
  local started
  started=$(now_ms)
  systemd-nspawn -D "$ROOTFS" --volatile=overlay --register=no --keep-unit --boot \
    -M "$machine" --private-network --console=passive "$@" \
    >"$SCRATCH/console.log" 2>&1 &
  NSPAWN_PID=$!
  CT_PID=
  local deadline=$((started + BOOT_LIMIT_S * 1000))
  while [ -z "$CT_PID" ]; do
    kill -0 "$NSPAWN_PID" 2>/dev/null || {
      tail -n 30 "$SCRATCH/console.log" >&2
      fail "systemd-nspawn exited while booting (console above)"
    }
    [ "$(now_ms)" -lt "$deadline" ] || fail "the container's init did not appear within ${BOOT_LIMIT_S}s"
    # systemd-nspawn forks helpers first; the container's init is the child that
    # has exec'd systemd.
    CT_PID=$(pgrep -P "$NSPAWN_PID" -x systemd || true)
    [ -n "$CT_PID" ] || sleep 0.1
  done
  # Until systemd's private socket exists, systemctl cannot ask: it says "offline" (or
  # that it cannot connect) at once.
  local state
  while :; do
    state=$(timeout 5 nsenter -t "$CT_PID" -a -- /usr/bin/systemctl is-system-running --wait 2>&1 || true)
    case $state in
      *"Failed to connect to bus"* | *offline* | "") ;;
      *) break ;;
    esac
    [ "$(now_ms)" -lt "$deadline" ] || break
    sleep 0.1
  done
  local took=$(($(now_ms) - started))
  if [ "$state" != running ]; then
    ct systemctl --failed --no-pager 2>&1 | show >&2 || true
    fail "the container did not boot to 'running' within ${BOOT_LIMIT_S}s (is-system-running: ${state:-timed out}, after ${took} ms)"
  fi
  [ "$took" -lt $((BOOT_LIMIT_S * 1000)) ] || fail "booting took ${took} ms, over ${BOOT_LIMIT_S}s"
  BOOT_MS=$took
  ok "container booted to 'running' in ${took} ms (systemd-nspawn pid $NSPAWN_PID, init pid $CT_PID)"
}

# Powers the container off (SIGTERM to systemd-nspawn: an orderly shutdown of its init),
# SIGKILL after 20 s. Safe to call twice.
stop_container() {
  [ -n "${NSPAWN_PID:-}" ] || return 0
  if kill -0 "$NSPAWN_PID" 2>/dev/null; then
    kill -TERM "$NSPAWN_PID" 2>/dev/null || true
    local i
    for i in $(seq 1 200); do
      kill -0 "$NSPAWN_PID" 2>/dev/null || break
      sleep 0.1
    done
    if kill -0 "$NSPAWN_PID" 2>/dev/null; then
      say "the container did not power off in 20 s; killing systemd-nspawn" >&2
      kill -KILL "$NSPAWN_PID" 2>/dev/null || true
    fi
  fi
  wait "$NSPAWN_PID" 2>/dev/null || true
  NSPAWN_PID=
}

# Runs a command inside the container, as root, in CT_DIR (default /root/faceio-relay,
# where ./target/debian/ holds the package as in a checkout), stdin from /dev/null.
ct() { ct_stdin "$@" </dev/null; }
ct_stdin() {
  nsenter -t "$CT_PID" -a -- /usr/bin/env -i \
    PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    HOME=/root LANG=C.UTF-8 TERM=dumb SYSTEMD_PAGER= SYSTEMD_COLORS=0 \
    /bin/bash -c 'cd "$0" && exec "$@"' "${CT_DIR:-/root/faceio-relay}" "$@"
}
# Runs a shell command line inside the container.
ct_sh() { ct /bin/bash -c "$1"; }

# What the operator types, run inside the container and recorded (in order) in
# $SCRATCH/operator.log, which is compared with the README at the end. The output goes to
# $OUT and is shown. With OP_FOR=SECONDS the command runs that long (journalctl -f);
# OP_DIR is the directory it runs in (default: the checkout, /root/faceio-relay);
# OP_ANSWER is what the operator types at its prompt.
op() {
  local line=$1
  printf '%s\n' "$line" >>"$SCRATCH/operator.log"
  say "   \$ $line"
  local rc=0
  if [ -n "${OP_FOR:-}" ]; then
    CT_DIR=${OP_DIR:-} ct timeout "$OP_FOR" /bin/bash -c "$line" >"$SCRATCH/out" 2>&1 || rc=$?
    [ "$rc" -ne 124 ] || rc=0
  elif [ -n "${OP_ANSWER:-}" ]; then
    printf '%s\n' "$OP_ANSWER" | CT_DIR=${OP_DIR:-} ct_stdin /bin/bash -c "$line" >"$SCRATCH/out" 2>&1 || rc=$?
  else
    CT_DIR=${OP_DIR:-} ct /bin/bash -c "$line" >"$SCRATCH/out" 2>&1 || rc=$?
  fi
  OUT=$(cat "$SCRATCH/out")
  [ -z "$OUT" ] || printf '%s\n' "$OUT" | show
  return "$rc"
}
# A host-side operator command (building the package), recorded like op.
op_host() {
  printf '%s\n' "$*" >>"$SCRATCH/operator.log"
  say "   \$ $*"
  "$@"
}
# `sudoedit FILE` as the operator does it: the new content (stdin) replaces the file's,
# which keeps its owner and mode.
op_edit() {
  printf 'sudoedit %s\n' "$1" >>"$SCRATCH/operator.log"
  say "   \$ sudoedit $1"
  nsenter -t "$CT_PID" -a -- /bin/sh -c "cat > '$1'"
}

# The README's "Install as a service" commands, in order: the lines of its sh blocks,
# comments and `sudo` dropped, without `cargo install` (this script installs cargo-deb
# itself) and without the block that installs by hand (the test installs the package).
readme_commands() {
  awk '
    /^## Install as a service/ { section = 1; next }
    section && /^## / { section = 0 }
    !section { next }
    /^```sh/ { block = 1; text = ""; next }
    block && /^```/ {
      block = 0
      if (text !~ /install -m 755 target\/release\/faceio-relay/) printf "%s", text
      next
    }
    block {
      line = $0
      sub(/[ \t]+#.*$/, "", line)
      if (line ~ /^[ \t]*(#|$)/ || line ~ /^cargo install /) next
      gsub(/sudo /, "", line)
      text = text line "\n"
    }
  ' README.md
}

# Fails unless the README's commands were run by the test, in the README's order.
check_readme_matches() {
  local expected=$SCRATCH/readme.cmds
  readme_commands >"$expected"
  [ -s "$expected" ] || fail "no commands found in the README's \"Install as a service\" section"
  if ! awk 'BEGIN { i = n = 0 } NR == FNR { want[n++] = $0; next } i < n && $0 == want[i] { i++ }
            END { if (i < n) { print "first one not run in order: " want[i] > "/dev/stderr"; exit 1 } }' \
    "$expected" "$SCRATCH/operator.log"; then
    say "README \"Install as a service\" commands:" >&2
    show <"$expected" >&2
    say "commands the test ran, in order:" >&2
    show <"$SCRATCH/operator.log" >&2
    fail "the README's install commands are not what the test does"
  fi
  ok "the README's \"Install as a service\" commands ($(wc -l <"$expected")) are the ones this test ran, in the same order"
}

# Polls COMMAND... until it succeeds, for at most SECONDS; fails with DESCRIPTION.
wait_until() {
  local seconds=$1 what=$2
  shift 2
  local deadline=$(($(now_ms) + seconds * 1000))
  until "$@" >/dev/null 2>&1; do
    [ "$(now_ms)" -lt "$deadline" ] || fail "timed out after ${seconds}s waiting for: $what"
    sleep 0.2
  done
}

unit_prop() { ct systemctl show -p "$1" --value faceio-relay; }
main_pid() { unit_prop MainPID; }

# Journal position, for journal_since.
journal_mark() {
  MARK=$(ct journalctl -n 0 --show-cursor --no-pager | sed -n 's/^-- cursor: //p')
  [ -n "$MARK" ] || fail "cannot read the container's journal cursor"
}
# The unit's journal lines since journal_mark, as `MESSAGE` text.
journal_since() { ct journalctl -u faceio-relay --after-cursor="$MARK" --no-pager -o cat; }
journal_since_has() { journal_since | grep -Fq -- "$1"; }
# Waits until the unit logs a line containing TEXT (since journal_mark).
wait_journal() {
  wait_until "${2:-20}" "journal line \"$1\"" journal_since_has "$1"
}

# Sends one event with `faceio-relay simulate`, fails unless answered 200, and sets ID to
# the event ID the relay answered with. Extra arguments go to simulate.
simulate() {
  local out
  out=$(relay_cli simulate "$@" 2>&1) || {
    printf '%s\n' "$out" | show >&2
    fail "faceio-relay simulate $* failed"
  }
  grep -q '^HTTP 200 OK' <<<"$out" || {
    printf '%s\n' "$out" | show >&2
    fail "faceio-relay simulate $* was not answered 200"
  }
  ID=$(sed -n 's/^{"id":"\([^"]*\)"}$/\1/p' <<<"$out")
  [ -n "$ID" ] || fail "no event id in the answer to simulate $*: $out"
}

# Events in a JSON Lines file of the container holding ID.
count_in() { ct_sh "grep -c '\"id\":\"$2\"' '$1' || true"; }
# True when every ID in $@ (after FILE) is in FILE.
all_in_file() {
  local file=$1 id
  shift
  local ids
  ids=$(ct_sh "cat '$file' 2>/dev/null || true")
  for id in "$@"; do
    grep -Fq "\"id\":\"$id\"" <<<"$ids" || return 1
  done
}
# True when every ID in $@ (after FILE) is a line of FILE.
all_lines_in() {
  local file=$1 id
  shift
  local lines
  lines=$(ct_sh "cat '$file' 2>/dev/null || true")
  for id in "$@"; do
    grep -Fxq "$id" <<<"$lines" || return 1
  done
}

# Whole seconds of a systemd time span as `systemctl show` prints it (30s, 500ms, 1min 30s).
seconds_of() {
  local span=$1 total=0 part
  for part in $span; do
    case $part in
      *ms) total=$((total + ${part%ms} / 1000)) ;;
      *min) total=$((total + ${part%min} * 60)) ;;
      *s) total=$((total + ${part%s})) ;;
      *) fail "cannot read the time span '$span'" ;;
    esac
  done
  printf '%s\n' "$total"
}

# The unit's journal entries since journal_mark, one per line: `_PID<tab>MESSAGE`.
journal_pids_since() {
  ct journalctl -u faceio-relay --after-cursor="$MARK" --no-pager -o export |
    awk 'BEGIN { RS = "" } { p = m = ""
      n = split($0, f, "\n")
      for (i = 1; i <= n; i++) {
        if (f[i] ~ /^_PID=/) p = substr(f[i], 6)
        if (f[i] ~ /^MESSAGE=/) m = substr(f[i], 9) }
      print p "\t" m }'
}

# Posts one event as FACEIO does (curl, inside the container) to the relay on
# 127.0.0.1:8080: EVENT_NAME APP_ID TOKEN. Fails unless answered 200; sets ID.
post_event() {
  local body out
  body=$(printf '{"eventName":"%s","facialId":"systest-%s","appId":"%s","clientIp":"203.0.113.9","details":{"timestamp":"2026-12-06","gender":"female","age":30}}' \
    "$1" "$RANDOM$RANDOM" "$2")
  out=$(ct curl -sS -w '\n%{http_code}' -H 'Content-Type: application/json' \
    -H "WWW-Authenticate: Bearer $3" --data-binary "$body" http://127.0.0.1:8080/webhook 2>&1) \
    || fail "curl could not post to the relay: $out"
  [ "$(tail -n 1 <<<"$out")" = 200 ] || fail "a posted $1 event was answered $(tail -n 1 <<<"$out"), not 200: $(head -n 1 <<<"$out")"
  ID=$(head -n 1 <<<"$out" | sed -n 's/^{"id":"\([^"]*\)"}$/\1/p')
  [ -n "$ID" ] || fail "no event id in the answer: $out"
}

# `faceio-relay ARGS...` as root with the env file's variables, as the README's
# `sudo sh -c 'set -a; . /etc/faceio-relay/env; exec faceio-relay check'` does: once
# relay.yaml uses ${VAR}s from it, every command that reads relay.yaml needs them.
relay_cli() {
  ct /bin/sh -c 'set -a; if [ -r /etc/faceio-relay/env ]; then . /etc/faceio-relay/env; fi; exec faceio-relay "$@"' sh "$@"
}

# After a start that must fail for a configuration reason (since journal_mark): the
# relay logged TEXT, exited 78 (EX_CONFIG), and systemd did not restart it
# (RestartPreventExitStatus=78): one attempt, the unit failed, not a crash loop.
# Called once `systemctl start`/`restart` has returned: the job is done, so a restart
# systemd meant to make would show as `activating` (auto-restart) by now.
expect_failed_once() {
  wait_journal "$1"
  journal_since | grep -E -- "$1|faceio-relay.service: |nothing was started" | show
  local attempts
  attempts=$(journal_since | grep -cF -- "$1" || true)
  [ "$attempts" = 1 ] || fail "$attempts start attempts: systemd restarted a relay that fails for its configuration"
  [ "$(ct systemctl is-active faceio-relay)" = failed ] || fail "the unit is not failed"
  [ "$(unit_prop ExecMainStatus)" = 78 ] || fail "the relay exited $(unit_prop ExecMainStatus), not 78 (EX_CONFIG)"
  [ "$(unit_prop NRestarts)" = 0 ] || fail "systemd restarted it $(unit_prop NRestarts) times"
  # Clears the failure and the start rate limit (StartLimitBurst=), so the test's many
  # starts are not refused later.
  ct systemctl reset-failed faceio-relay
}
