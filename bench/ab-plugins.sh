#!/usr/bin/env bash
# Compares two builds of Switchyard with the same chain of five noop plugins under the same load:
# the two servers take turns, ROUNDS times, and each round prints both servers' delivered rate and
# CPU time per message (from /proc). On a shared machine the CPU per message of two builds measured
# minutes apart differs by 10 % or more; measured in alternating rounds it shows changes of a few
# percent. Each build may use its own noop component (NOOP_A, NOOP_B: an SDK change is in the
# plugin, not in the host). CHAIN=none compares the two builds without plugins (the SMTP, queue and
# delivery path alone); SIZE sets the message size in bytes (1024).
#
#   cp target/release/switchyard /tmp/before   # ... change, rebuild ...
#   N=4000 ROUNDS=8 bench/ab-plugins.sh /tmp/before target/release/switchyard
#   CHAIN=none SIZE=102400 N=3000 bench/ab-plugins.sh /tmp/before target/release/switchyard
set -euo pipefail
N=${N:-4000}
SESSIONS=${SESSIONS:-20}
ROUNDS=${ROUNDS:-8}
SIZE=${SIZE:-1024}
CHAIN=${CHAIN:-noop}
root=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d /tmp/switchyard-ab.XXXXXX)
source "$root/bench/lib.sh"
cleanup() { kill ${a_pid:-} ${b_pid:-} ${sink_pid:-} 2>/dev/null || true; }
trap cleanup EXIT
[ $# -eq 2 ] || { echo "usage: $0 BINARY_A BINARY_B" >&2; exit 2; }

ensure_postfix_tools
start_sink
chain() { [ "$CHAIN" = none ] || noop_chain "$1"; }
bin=$1 start_switchyard a 2625 "$(chain "${NOOP_A:-}")"
bin=$2 start_switchyard b 2626 "$(chain "${NOOP_B:-}")"
bin=$2

echo "# $(date -u +%Y-%m-%dT%H:%MZ) N=$N sessions=$SESSIONS size=$SIZE chain=$CHAIN, A=$1, B=$2"
echo "| round | A delivered/s | A CPU µs/msg | B delivered/s | B CPU µs/msg |"
echo "| --- | --- | --- | --- | --- |"
for round in $(seq "$ROUNDS"); do
  row="| $round"
  for server in "a 2625" "b 2626"; do
    read -r delivered cpu <<<"$(measure $server)"
    row+=" | $delivered | $cpu"
  done
  echo "$row |"
done
