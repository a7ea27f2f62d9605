#!/usr/bin/env bash
# Relay throughput, Switchyard beside Postfix in one run on this machine.
#
# Postfix's smtp-source sends N messages over SESSIONS concurrent sessions to the relay under test;
# the relay forwards them to Postfix's smtp-sink. Both relays commit to disk before their 250
# (Switchyard: SQLite WAL with synchronous=FULL; Postfix: fsync of the queue file). A run ends when
# the relay's queue is empty again, so the delivered rate counts the whole path.
#
# Needs root and Debian's postfix package (installed if missing). It RECONFIGURES THE LOCAL POSTFIX
# (loopback only, relayhost = the sink): run it on a test machine.
#
#   N=5000 SESSIONS=20 SIZES="1024 102400" bench/relay-vs-postfix.sh
set -euo pipefail
N=${N:-5000}
SESSIONS=${SESSIONS:-20}
SIZES=${SIZES:-"1024 102400"}
SWITCHYARD_PORT=2625
POSTFIX_PORT=25

root=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d /tmp/switchyard-bench.XXXXXX)
source "$root/bench/lib.sh"
cleanup() {
  kill ${switchyard_pid:-} ${sink_pid:-} 2>/dev/null || true
  postfix stop >/dev/null 2>&1 || true
}
trap cleanup EXIT

ensure_postfix_tools
build_switchyard
start_sink

start_postfix_relay

start_switchyard switchyard $SWITCHYARD_PORT ""
direct_done() { true; }

echo "# $(date -u +%Y-%m-%dT%H:%MZ) N=$N sessions=$SESSIONS $(nproc) cores, Postfix $(postconf -h mail_version)"
printf "| size | smtp-source → smtp-sink | Postfix accepted/s | Postfix delivered/s | Switchyard accepted/s | Switchyard delivered/s | delivered ratio |\n"
printf "| --- | --- | --- | --- | --- | --- | --- |\n"
for size in $SIZES; do
  read -r direct _ <<<"$(run $SINK_PORT "$size" direct_done)"
  read -r pf_acc pf_del <<<"$(run $POSTFIX_PORT "$size" postfix_queue_empty)"
  read -r sy_acc sy_del <<<"$(run $SWITCHYARD_PORT "$size" switchyard_queue_empty switchyard)"
  ratio=$(awk -v a="$sy_del" -v b="$pf_del" 'BEGIN { printf "%.2f", a/b }')
  printf "| %s B | %s | %s | %s | %s | %s | %sx |\n" "$size" "$direct" "$pf_acc" "$pf_del" "$sy_acc" "$sy_del" "$ratio"
done
# Sanity check: every message Switchyard accepted was sent (not deferred or bounced).
echo
echo "Switchyard log: $(sent_count switchyard) sent, $(grep -c 'status=deferred' "$work/switchyard.log") deferred, $(grep -c 'status=bounced' "$work/switchyard.log") bounced, of $(( N * $(wc -w <<<"$SIZES") )) messages"
