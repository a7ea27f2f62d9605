#!/usr/bin/env bash
# Relay throughput with a chain of five plugins active on every stage, against no plugins, in one
# run. Each of the five is plugins/noop, which implements every hook (connect, helo, mail-from,
# rcpt-to, data, route, delivery-result, bounce) and answers "continue", so the figure is the host's
# cost of the plugin machinery: per transaction five instantiations and every hook call.
#
#   N=5000 SESSIONS=20 SIZE=1024 bench/relay-plugins.sh
set -euo pipefail
N=${N:-5000}
SESSIONS=${SESSIONS:-20}
SIZE=${SIZE:-1024}
root=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d /tmp/switchyard-bench.XXXXXX)
source "$root/bench/lib.sh"
cleanup() { kill ${plain_pid:-} ${chain_pid:-} ${sink_pid:-} 2>/dev/null || true; }
trap cleanup EXIT

ensure_postfix_tools
build_switchyard
start_sink

chain=""
for n in 1 2 3 4 5; do
  chain+="[[plugin]]
name = \"noop-$n\"
path = \"$root/target/wasm32-wasip2/plugin/noop.wasm\"

"
done
start_switchyard plain 2625 ""
start_switchyard chain 2626 "$chain"

read -r plain_acc plain_del <<<"$(run 2625 "$SIZE" switchyard_queue_empty plain)"
read -r chain_acc chain_del <<<"$(run 2626 "$SIZE" switchyard_queue_empty chain)"
ratio=$(awk -v a="$chain_del" -v b="$plain_del" 'BEGIN { printf "%.0f", 100*a/b }')
echo "# $(date -u +%Y-%m-%dT%H:%MZ) N=$N sessions=$SESSIONS size=$SIZE B, $(nproc) cores"
echo "| chain | accepted/s | delivered/s |"
echo "| --- | --- | --- |"
echo "| no plugins | $plain_acc | $plain_del |"
echo "| 5 plugins, every hook | $chain_acc | $chain_del |"
echo
echo "With five plugins: ${ratio}% of the plugin-free delivered rate."
echo "Sent: plain $(sent_count plain) / $N, chain $(sent_count chain) / $N"
