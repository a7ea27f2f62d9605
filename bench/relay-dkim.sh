#!/usr/bin/env bash
# Relay throughput with DKIM signing of every message, against none, in one run: three release
# Switchyards relay smtp-source's messages (From: bench@source.test, from 127.0.0.1, a relay
# network, so every one is signed) to one smtp-sink; one signs with an RSA-2048 key, one with an
# Ed25519 key, one not at all. They take turns, ROUNDS times; each round gives one ratio per key.
#
#   N=5000 SESSIONS=20 SIZE=1024 ROUNDS=5 bench/relay-dkim.sh
set -euo pipefail
N=${N:-5000}
SESSIONS=${SESSIONS:-20}
SIZE=${SIZE:-1024}
ROUNDS=${ROUNDS:-5}
root=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d /tmp/switchyard-bench.XXXXXX)
source "$root/bench/lib.sh"
cleanup() { kill ${plain_pid:-} ${rsa_pid:-} ${ed25519_pid:-} ${sink_pid:-} 2>/dev/null || true; }
trap cleanup EXIT

ensure_postfix_tools
build_switchyard
start_sink

key() {
  "$bin" dkim keygen source.test "$1" --algorithm "$1" --out "$work" >/dev/null 2>&1
  printf '[[dkim]]\ndomain = "source.test"\nselector = "%s"\nprivate_key = "%s/source.test.%s.key"\n' "$1" "$work" "$1"
}
start_switchyard plain 2625 ""
start_switchyard rsa 2626 "$(key rsa)"
start_switchyard ed25519 2627 "$(key ed25519)"

median_of() { printf '%s\n' "$@" | sort -n | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }
rsa_ratios=()
ed_ratios=()
echo "# $(date -u +%Y-%m-%dT%H:%MZ) N=$N sessions=$SESSIONS size=$SIZE B, $(nproc) cores, $ROUNDS rounds"
echo "| round | unsigned, delivered/s | RSA-2048, delivered/s | ratio | Ed25519, delivered/s | ratio |"
echo "| --- | --- | --- | --- | --- | --- |"
for round in $(seq "$ROUNDS"); do
  read -r _ plain <<<"$(run 2625 "$SIZE" switchyard_queue_empty plain)"
  read -r _ rsa <<<"$(run 2626 "$SIZE" switchyard_queue_empty rsa)"
  read -r _ ed <<<"$(run 2627 "$SIZE" switchyard_queue_empty ed25519)"
  rsa_ratio=$(awk -v a="$rsa" -v b="$plain" 'BEGIN { printf "%.0f", 100*a/b }')
  ed_ratio=$(awk -v a="$ed" -v b="$plain" 'BEGIN { printf "%.0f", 100*a/b }')
  rsa_ratios+=("$rsa_ratio")
  ed_ratios+=("$ed_ratio")
  echo "| $round | $plain | $rsa | $rsa_ratio % | $ed | $ed_ratio % |"
done
echo
echo "Signed with RSA-2048: median $(median_of "${rsa_ratios[@]}")% of the unsigned delivered rate (rounds: ${rsa_ratios[*]})."
echo "Signed with Ed25519: median $(median_of "${ed_ratios[@]}")% (rounds: ${ed_ratios[*]})."
echo "Sent: unsigned $(sent_count plain), RSA $(sent_count rsa), Ed25519 $(sent_count ed25519) of $((N * ROUNDS)) each"
# The signing is real: the signed servers logged no signing failure.
! grep -h "cannot sign" "$work/rsa.log" "$work/ed25519.log"
