#!/usr/bin/env bash
# Switchyard's own part of scanning, apart from the scanners': release servers that differ only
# in their [[scanner]] entries relay a paced load (the same offered rate for each) to smtp-sink,
# and their CPU per message is read from /proc. The scanners are bench/scanner-stubs.py, which
# answer at once or after DELAY ms and cost next to no CPU themselves:
#   none     no scanner
#   clamd    a clamd stand-in (kept zIDSESSION sessions)
#   rspamd   an rspamd stand-in keeping its connections
#   rspamdC  an rspamd stand-in closing each connection after its answer, as rspamd 3.4 does
#   rspamdS  the same answering one request at a time, SERIAL_MS each (sleeping), as one rspamd
#            worker does: it spreads out the messages a burst of the load brought together
#   noneF    no scanner, while a real rspamd at RSPAMD_PORT (if set) is fed the same rate of
#            someone else's mail: whether a busy scanner on the same cores raises Switchyard's
#            CPU per message by itself
#   rspamdR  the real rspamd at RSPAMD_PORT (if set)
# Every server runs content-filter with the common scanner policy, so only the scanning differs.
#
#   N=1500 SESSIONS=150 ROUNDS=3 DELAY=0 [RSPAMD_PORT=11333] bench/relay-scanner-stubs.sh
set -euo pipefail
N=${N:-1500}
SESSIONS=${SESSIONS:-150}
PACE=${PACE:-1}
SIZE=${SIZE:-1024}
ROUNDS=${ROUNDS:-3}
DELAY=${DELAY:-0}
SERIAL_MS=${SERIAL_MS:-2}
RSPAMD_PORT=${RSPAMD_PORT:-}
root=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d /tmp/switchyard-bench.XXXXXX)
source "$root/bench/lib.sh"
cleanup() { kill $(jobs -p) 2>/dev/null || true; }
trap cleanup EXIT

ensure_postfix_tools
build_switchyard
start_sink
python3 "$root/bench/scanner-stubs.py" serve 2821 2822 "$DELAY" &
python3 "$root/bench/scanner-stubs.py" serve 2823 2824 "$DELAY" close &
python3 "$root/bench/scanner-stubs.py" serve 2825 2826 "$SERIAL_MS" close serial &
sleep 1

servers="none clamd rspamd rspamdC rspamdS"
[ -n "$RSPAMD_PORT" ] && servers+=" noneF rspamdR"
scanner() { printf '[[scanner]]\nname = "%s"\nkind = "%s"\naddress = "127.0.0.1:%s"\n\n' "$1" "$1" "$2"; }
port=2661
for name in $servers; do
  case $name in
    none | noneF) extra="" ;;
    clamd) extra=$(scanner clamav 2821) ;;
    rspamd) extra=$(scanner rspamd 2822) ;;
    rspamdC) extra=$(scanner rspamd 2824) ;;
    rspamdS) extra=$(scanner rspamd 2826) ;;
    rspamdR) extra=$(scanner rspamd "$RSPAMD_PORT") ;;
  esac
  start_switchyard "$name" "$port" "$extra
$(scanner_policy)"
  port=$((port + 1))
done

declare -A cpus=()
echo "# $(date -u +%Y-%m-%dT%H:%MZ) N=$N sessions=$SESSIONS each waiting ${PACE}s between messages, size=$SIZE B, stubs answering after ${DELAY} ms, $ROUNDS rounds"
echo "| round | server | delivered/s | Switchyard CPU µs/msg |"
echo "| --- | --- | --- | --- |"
for round in $(seq "$ROUNDS"); do
  port=2661
  for name in $servers; do
    feeder=
    if [ "$name" = noneF ]; then
      python3 "$root/bench/scanner-stubs.py" feed "$RSPAMD_PORT" "$SESSIONS" &
      feeder=$!
    fi
    read -r delivered cpu <<<"$(measure "$name" "$port")"
    [ -n "$feeder" ] && kill "$feeder"
    cpus[$name]+="$cpu "
    echo "| $round | $name | $delivered | $cpu |"
    port=$((port + 1))
  done
done
echo
median_of() { printf '%s\n' "$@" | sort -n | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }
for name in $servers; do
  # shellcheck disable=SC2086
  echo "$name: median $(median_of ${cpus[$name]}) µs CPU per message; sent $(sent_count "$name") of $((N * ROUNDS))"
done
