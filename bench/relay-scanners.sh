#!/usr/bin/env bash
# Relay throughput with the content scanners in the path ([[scanner]]: rspamd, clamd, both)
# against without, in one run, and the CPU per message of Switchyard and of each scanner apart,
# from /proc: Switchyard's own cost of scanning is a number of its own, whatever the scanners
# spend. Every server runs content-filter with the common scanner policy (examples/filtering.toml),
# so the chain is the same and only the scanning differs.
#
# rspamd and clamd run as the tests run them (tests/e2e/harness/scanners.rs): in the foreground,
# files in a temporary folder, rspamd with only its normal worker and a short list of domain
# endings, clamd with a one-signature database of our own (nothing can be downloaded here).
#
# Two loads: saturated (SESSIONS sessions sending as fast as each server takes mail), where the
# scanners set the rate; and paced (PACED_SESSIONS sessions each sending one message a second,
# the same offered rate for every server, below what any of them can take). A server's CPU per
# message depends on its rate (group commit and batching amortise less at a lower rate), so
# Switchyard's own cost of scanning is the paced comparison.
#
#   N=2000 SESSIONS=20 SIZE=1024 ROUNDS=3 PACED_SESSIONS=150 PACED_N=1500 bench/relay-scanners.sh
set -euo pipefail
N=${N:-2000}
SESSIONS=${SESSIONS:-20}
SIZE=${SIZE:-1024}
ROUNDS=${ROUNDS:-3}
PACED_SESSIONS=${PACED_SESSIONS:-150}
PACED_N=${PACED_N:-1500}
RSPAMD_PORT=${RSPAMD_PORT:-2811}
CLAMD_PORT=${CLAMD_PORT:-2812}
root=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d /tmp/switchyard-bench.XXXXXX)
source "$root/bench/lib.sh"
cleanup() {
  kill ${none_pid:-} ${rspamd_only_pid:-} ${clamd_only_pid:-} ${both_pid:-} ${sink_pid:-} 2>/dev/null || true
  [ -n "${rspamd_group:-}" ] && kill -TERM -- "-$rspamd_group" 2>/dev/null || true
  [ -n "${clamd_group:-}" ] && kill -TERM -- "-$clamd_group" 2>/dev/null || true
}
trap cleanup EXIT

ensure_postfix_tools
"$root/scripts/ensure-servers"
build_switchyard
start_sink

# rspamd: the normal worker only.
r=$work/rspamd
mkdir -p "$r/db" "$r/run" "$r/log" "$r/tmp" "$r/local.d"
cat > "$r/rspamd.conf" <<CONF
.include "\$CONFDIR/common.conf"
options {
  pidfile = "\$RUNDIR/rspamd.pid";
  .include "\$CONFDIR/options.inc"
  .include(try=true; priority=1,duplicate=merge) "\$LOCAL_CONFDIR/local.d/options.inc"
}
logging {
  type = "file";
  filename = "\$LOGDIR/rspamd.log";
  .include "\$CONFDIR/logging.inc"
}
worker "normal" {
  bind_socket = "127.0.0.1:$RSPAMD_PORT";
  count = 1;
  .include "\$CONFDIR/worker-normal.inc"
}
CONF
printf 'com\norg\nnet\ntest\n' > "$r/tld.dat"
printf 'url_tld = "%s";\ntempdir = "%s";\n' "$r/tld.dat" "$r/tmp" > "$r/local.d/options.inc"
echo 'enabled = false;' > "$r/local.d/fuzzy_check.conf"
setsid rspamd -f -u root -g root -c "$r/rspamd.conf" "--var=LOCAL_CONFDIR=$r" "--var=DBDIR=$r/db" \
  "--var=RUNDIR=$r/run" "--var=LOGDIR=$r/log" >"$r/stdout.log" 2>&1 &
rspamd_group=$!

# clamd: one signature of our own.
c=$work/clamd
mkdir -p "$c/db" "$c/tmp"
printf 'switchyard-test-virus\n' > "$c/virus"
echo "$(md5sum < "$c/virus" | cut -d' ' -f1):$(stat -c %s "$c/virus"):Switchyard.Test.Virus" > "$c/db/test.hdb"
cat > "$c/clamd.conf" <<CONF
Foreground yes
TCPSocket $CLAMD_PORT
TCPAddr 127.0.0.1
DatabaseDirectory $c/db
TemporaryDirectory $c/tmp
PidFile $c/clamd.pid
LogFile $c/clamd.log
MaxThreads 10
SelfCheck 0
CONF
setsid clamd -c "$c/clamd.conf" >"$c/stdout.log" 2>&1 &
clamd_group=$!

for _ in $(seq 600); do
  curl -s -m 2 "http://127.0.0.1:$RSPAMD_PORT/ping" 2>/dev/null | grep -q pong && break; sleep 0.1
done
for _ in $(seq 300); do
  printf 'zPING\0' | timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/$CLAMD_PORT; cat >&3; cat <&3" 2>/dev/null | grep -q PONG && break
  sleep 0.1
done

rspamd_scanner="[[scanner]]
name = \"rspamd\"
kind = \"rspamd\"
address = \"127.0.0.1:$RSPAMD_PORT\"
"
clamd_scanner="[[scanner]]
name = \"clamav\"
kind = \"clamav\"
address = \"127.0.0.1:$CLAMD_PORT\"
"
start_switchyard none 2631 "$(scanner_policy)"
start_switchyard rspamd_only 2632 "$rspamd_scanner
$(scanner_policy)"
start_switchyard clamd_only 2633 "$clamd_scanner
$(scanner_policy)"
start_switchyard both 2634 "$rspamd_scanner
$clamd_scanner
$(scanner_policy)"

group_ticks() {
  local total=0 pid
  for pid in $(pgrep -g "$1"); do
    total=$((total + $(cpu_ticks "$pid" 2>/dev/null || echo 0)))
  done
  echo "$total"
}
per_message() { echo $(( $1 * 1000000 / $(getconf CLK_TCK) / N )); }

median_of() { printf '%s\n' "$@" | sort -n | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }

# rounds LABEL: ROUNDS rounds of every server, a table row each, then the medians.
rounds() {
  local label=$1 round name port delivered cpu r_before c_before r_cpu c_cpu
  declare -A cpus=() rates=()
  echo "# $label: $(date -u +%Y-%m-%dT%H:%MZ) N=$N sessions=$SESSIONS${PACE:+ each waiting ${PACE}s between messages} size=$SIZE B, $(nproc) cores, $ROUNDS rounds"
  echo "| round | server | delivered/s | Switchyard CPU µs/msg | rspamd CPU µs/msg | clamd CPU µs/msg |"
  echo "| --- | --- | --- | --- | --- | --- |"
  for round in $(seq "$ROUNDS"); do
    port=2631
    for name in none rspamd_only clamd_only both; do
      r_before=$(group_ticks "$rspamd_group")
      c_before=$(group_ticks "$clamd_group")
      read -r delivered cpu <<<"$(measure "$name" "$port")"
      r_cpu=$(per_message $(( $(group_ticks "$rspamd_group") - r_before )))
      c_cpu=$(per_message $(( $(group_ticks "$clamd_group") - c_before )))
      cpus[$name]+="$cpu "
      rates[$name]+="$delivered "
      echo "| $round | $name | $delivered | $cpu | $r_cpu | $c_cpu |"
      port=$((port + 1))
    done
  done
  echo
  for name in none rspamd_only clamd_only both; do
    # shellcheck disable=SC2086
    echo "$label, $name: median $(median_of ${rates[$name]}) delivered/s, Switchyard $(median_of ${cpus[$name]}) µs CPU per message"
  done
  echo
}

rounds saturated
N=$PACED_N SESSIONS=$PACED_SESSIONS PACE=1 rounds paced
for name in none rspamd_only clamd_only both; do
  echo "sent by $name: $(sent_count "$name") / $(( (N + PACED_N) * ROUNDS ))"
done
