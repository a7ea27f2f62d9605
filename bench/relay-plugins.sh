#!/usr/bin/env bash
# Relay throughput with a chain of five plugins active on every stage, against no plugins, in one
# run. Each of the five is plugins/noop, which implements every hook (connect, helo, mail-from,
# rcpt-to, data, route, delivery-result, bounce) and answers "continue", so the figure is the host's
# cost of the plugin machinery: per transaction five instantiations and every hook call.
#
#   N=5000 SESSIONS=20 SIZE=1024 ROUNDS=5 bench/relay-plugins.sh
set -euo pipefail
N=${N:-5000}
SESSIONS=${SESSIONS:-20}
SIZE=${SIZE:-1024}
ROUNDS=${ROUNDS:-5}
root=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d /tmp/switchyard-bench.XXXXXX)
source "$root/bench/lib.sh"
cleanup() { kill ${plain_pid:-} ${chain_pid:-} ${sink_pid:-} 2>/dev/null || true; }
trap cleanup EXIT

ensure_postfix_tools
build_switchyard
start_sink

start_switchyard plain 2625 ""
start_switchyard chain 2626 "$(noop_chain)"

# On a small shared machine one run of each varies by 20 % or more from one minute to the next,
# so the two servers take turns, ROUNDS times, and each round gives one ratio; the median ratio is
# the result. The servers' CPU time per message (from /proc) is printed too: it does not depend
# on what else the machine was doing.
ratios=()
plain_cpus=()
chain_cpus=()
echo "# $(date -u +%Y-%m-%dT%H:%MZ) N=$N sessions=$SESSIONS size=$SIZE B, $(nproc) cores, $ROUNDS rounds"
echo "| round | no plugins, delivered/s | CPU µs/msg | 5 plugins, delivered/s | CPU µs/msg | ratio |"
echo "| --- | --- | --- | --- | --- | --- |"
for round in $(seq "$ROUNDS"); do
  read -r plain_del plain_cpu <<<"$(measure plain 2625)"
  read -r chain_del chain_cpu <<<"$(measure chain 2626)"
  ratio=$(awk -v a="$chain_del" -v b="$plain_del" 'BEGIN { printf "%.0f", 100*a/b }')
  ratios+=("$ratio")
  plain_cpus+=("$plain_cpu")
  chain_cpus+=("$chain_cpu")
  echo "| $round | $plain_del | $plain_cpu | $chain_del | $chain_cpu | $ratio % |"
done
median_of() { printf '%s\n' "$@" | sort -n | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }
median=$(median_of "${ratios[@]}")
echo
echo "With five plugins: median ${median}% of the plugin-free delivered rate (rounds: ${ratios[*]})."
echo "Median CPU per message: no plugins $(median_of "${plain_cpus[@]}") µs, five plugins $(median_of "${chain_cpus[@]}") µs."
echo "Sent: plain $(sent_count plain) / $((N * ROUNDS)), chain $(sent_count chain) / $((N * ROUNDS))"
