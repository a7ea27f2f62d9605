#!/usr/bin/env bash
# What traffic shaping costs when it does not bind: one release build, two servers relaying to
# the same sink, one without [[shaping]] rules, one with rules configured for every destination
# but generous enough never to hold a message back (a `*` rule with a rate far above what the
# machine sends, the automatic back-off on, idle connections kept, and a few dozen domain rules
# to match against). The servers take turns, ROUNDS times; each round prints both delivered rates
# and CPU time per message (from /proc), and the ratio of the rates.
#
#   N=4000 SESSIONS=20 ROUNDS=6 bench/relay-shaping.sh
set -euo pipefail
N=${N:-4000}
SESSIONS=${SESSIONS:-20}
ROUNDS=${ROUNDS:-6}
SIZE=${SIZE:-1024}
root=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d /tmp/switchyard-shaping.XXXXXX)
source "$root/bench/lib.sh"
cleanup() { kill ${plain_pid:-} ${shaped_pid:-} ${sink_pid:-} 2>/dev/null || true; }
trap cleanup EXIT

ensure_postfix_tools
build_switchyard
start_sink

rules() {
  for n in $(seq 40); do
    printf '[[shaping]]\ndomain = "*.provider%s.test"\nrate = "100/m"\nconnections = 2\n\n' "$n"
  done
  cat <<TOML
[[shaping]]
domain = "*"
connections = 20
rate = "100000/s"
idle_timeout = "5s"
backoff_on = ["421", "4.7.28", "try again later"]
TOML
}
start_switchyard plain 2627 ""
start_switchyard shaped 2628 "$(rules)"

echo "# $(date -u +%Y-%m-%dT%H:%MZ) N=$N sessions=$SESSIONS size=$SIZE, $(nproc) cores, shaping rules that do not bind"
echo "| round | no rules delivered/s | CPU µs/msg | rules delivered/s | CPU µs/msg | ratio |"
echo "| --- | --- | --- | --- | --- | --- |"
compare_rounds "plain 2627" "shaped 2628"
echo "sent: plain $(sent_count plain), shaped $(sent_count shaped) of $((N * ROUNDS)) each"
