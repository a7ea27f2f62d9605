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
SINK_PORT=2700
SWITCHYARD_PORT=2625
POSTFIX_PORT=25

root=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d /tmp/switchyard-bench.XXXXXX)
cleanup() {
  [ -n "${switchyard_pid:-}" ] && kill "$switchyard_pid" 2>/dev/null || true
  [ -n "${sink_pid:-}" ] && kill "$sink_pid" 2>/dev/null || true
  postfix stop >/dev/null 2>&1 || true
}
trap cleanup EXIT

if ! command -v smtp-source >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postfix >/dev/null
fi
(cd "$root" && cargo build --release --bin switchyard -q)
bin="$root/target/release/switchyard"

now() { date +%s.%N; }

# The receiving end for every run.
smtp-sink -u postfix 127.0.0.1:$SINK_PORT 1000 &
sink_pid=$!

# Postfix as a plain relay to the sink (its logs go to syslog, which may not run: less work for it): loopback only, no DNS, no local delivery.
postfix stop >/dev/null 2>&1 || true
postconf -e \
  "inet_interfaces = 127.0.0.1" "inet_protocols = ipv4" "myhostname = postfix.bench.test" \
  "mydestination =" "mynetworks = 127.0.0.0/8" "relayhost = [127.0.0.1]:$SINK_PORT" \
  "smtpd_relay_restrictions = permit_mynetworks, reject" "smtp_tls_security_level = none" \
  "smtpd_tls_security_level = none" "smtpd_peername_lookup = no" "default_process_limit = 100" \
  "message_size_limit = 20480000"
postconf -X maillog_file
postfix start
postsuper -d ALL >/dev/null 2>&1 || true

cat > "$work/switchyard.toml" <<TOML
hostname = "switchyard.bench.test"
data_dir = "$work/switchyard-data"

[[listener]]
name = "bench"
address = "127.0.0.1:$SWITCHYARD_PORT"
greeting_delay = "0s"

[smtp]
max_sessions_per_ip = 200

[delivery]
smarthost = "127.0.0.1:$SINK_PORT"
tls = "none"
TOML
"$bin" serve --config "$work/switchyard.toml" 2>"$work/switchyard.log" &
switchyard_pid=$!
for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/$SWITCHYARD_PORT) 2>/dev/null && break; sleep 0.1; done

switchyard_queue_empty() { "$bin" queue list --config "$work/switchyard.toml" 2>/dev/null | tail -1 | grep -q '^-- 0 message'; }
postfix_queue_empty() { postqueue -p 2>/dev/null | grep -q 'Mail queue is empty'; }
sink_queue_empty() { true; }

# run NAME PORT SIZE EMPTY_CHECK -> prints "accepted_rate delivered_rate"
run() {
  local name=$1 port=$2 size=$3 empty=$4
  local start accepted done
  start=$(now)
  smtp-source -s "$SESSIONS" -l "$size" -m "$N" -f bench@source.test -t sink@sink.test "127.0.0.1:$port"
  accepted=$(now)
  until $empty; do sleep 0.05; done
  done=$(now)
  awk -v n="$N" -v s="$start" -v a="$accepted" -v d="$done" 'BEGIN { printf "%.0f %.0f", n/(a-s), n/(d-s) }'
}

echo "# $(date -u +%Y-%m-%dT%H:%MZ) N=$N sessions=$SESSIONS $(nproc) cores, Postfix $(postconf -h mail_version)"
printf "| size | smtp-source → smtp-sink | Postfix accepted/s | Postfix delivered/s | Switchyard accepted/s | Switchyard delivered/s | delivered ratio |\n"
printf "| --- | --- | --- | --- | --- | --- | --- |\n"
for size in $SIZES; do
  read -r direct _ <<<"$(run direct $SINK_PORT "$size" sink_queue_empty)"
  read -r pf_acc pf_del <<<"$(run postfix $POSTFIX_PORT "$size" postfix_queue_empty)"
  read -r sy_acc sy_del <<<"$(run switchyard $SWITCHYARD_PORT "$size" switchyard_queue_empty)"
  ratio=$(awk -v a="$sy_del" -v b="$pf_del" 'BEGIN { printf "%.2f", a/b }')
  printf "| %s B | %s | %s | %s | %s | %s | %sx |\n" "$size" "$direct" "$pf_acc" "$pf_del" "$sy_acc" "$sy_del" "$ratio"
done
# Sanity check: every message Switchyard accepted was sent (not deferred or bounced).
echo
echo "Switchyard log: $(grep -c 'status=sent' "$work/switchyard.log") sent, $(grep -c 'status=deferred' "$work/switchyard.log") deferred, $(grep -c 'status=bounced' "$work/switchyard.log") bounced, of $(( N * $(wc -w <<<"$SIZES") )) messages"
