#!/usr/bin/env bash
# What the decision trace costs: one release build, two servers with the same chain of five noop
# plugins (every hook of every message called, so every message's trace has its ~35 calls), one
# with `[trace] enabled = false`, one with tracing on (the default). The servers take turns,
# ROUNDS times; each round prints both delivered rates and CPU time per message (from /proc).
# COMPARE=shadow measures shadow mode instead: both servers trace, and in the second each of the
# five plugins has a shadow candidate (another noop), asked on every call.
#
#   N=4000 SESSIONS=20 ROUNDS=6 bench/relay-trace.sh
#   COMPARE=shadow N=4000 SESSIONS=20 ROUNDS=6 bench/relay-trace.sh
set -euo pipefail
N=${N:-4000}
SESSIONS=${SESSIONS:-20}
ROUNDS=${ROUNDS:-6}
SIZE=${SIZE:-1024}
COMPARE=${COMPARE:-trace}
root=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d /tmp/switchyard-trace.XXXXXX)
source "$root/bench/lib.sh"
cleanup() { kill ${off_pid:-} ${on_pid:-} ${sink_pid:-} 2>/dev/null || true; }
trap cleanup EXIT

ensure_postfix_tools
build_switchyard
start_sink
if [ "$COMPARE" = shadow ]; then
  noop="$root/target/wasm32-wasip2/plugin/noop.wasm"
  start_switchyard off 2625 "$(noop_chain)"
  start_switchyard on 2626 "$(noop_chain | sed "s|^path = .*|&\nshadow = \"$noop\"|")"
  labels=("no shadow" "five shadows")
else
  start_switchyard off 2625 "$(noop_chain)
[trace]
enabled = false"
  start_switchyard on 2626 "$(noop_chain)"
  labels=("trace off" "trace on")
fi

echo "# $(date -u +%Y-%m-%dT%H:%MZ) N=$N sessions=$SESSIONS size=$SIZE, five noop plugins, $COMPARE"
echo "| round | ${labels[0]} delivered/s | CPU µs/msg | ${labels[1]} delivered/s | CPU µs/msg | ratio |"
echo "| --- | --- | --- | --- | --- | --- |"
compare_rounds "off 2625" "on 2626"
# The traces written: one smtp, one route and one delivery record per message (after the
# writer's last batch, which it gathers for 250 ms).
sleep 1
echo "trace rows: $(sqlite3 "$work/on-data/queue.db-traces" 'SELECT COUNT(*), SUM(LENGTH(body)) / COUNT(*) FROM traces' 2>/dev/null || echo '?') (count, mean body bytes)"
