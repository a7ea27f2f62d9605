#!/usr/bin/env bash
# Memory a queued message costs while its delivery is under way, without plugins and with five noop
# plugins (whose held run keeps five instances from SMTP acceptance until the delivery-result hook):
# both servers relay to a smarthost that accepts connections and never greets, so every accepted
# message stays in delivery. Prints each server's anonymous resident memory (RssAnon: the
# plugins' memory images are shared file mappings, counted once per mapping in RssShmem) before and
# after N messages.
#
#   N=300 bench/held-memory.sh
set -euo pipefail
N=${N:-300}
SESSIONS=${SESSIONS:-20}
SINK_PORT=2799
root=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d /tmp/switchyard-held.XXXXXX)
source "$root/bench/lib.sh"
cleanup() { kill ${hole_pid:-} ${plain_pid:-} ${chain_pid:-} 2>/dev/null || true; }
trap cleanup EXIT

ensure_postfix_tools
build_switchyard
python3 -c '
import socket
listener = socket.socket()
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind(("127.0.0.1", '"$SINK_PORT"'))
listener.listen(5000)
held = []
while True:
    held.append(listener.accept()[0])
' &
hole_pid=$!

start_switchyard plain 2625 ""
start_switchyard chain 2626 "$(noop_chain)"
anon_kib() { awk '/RssAnon/ { print $2 }' "/proc/$1/status"; }
for name in plain chain; do
  pid_var=${name}_pid
  port=2625
  [ "$name" = chain ] && port=2626
  before=$(anon_kib "${!pid_var}")
  smtp-source -s "$SESSIONS" -l 1024 -m "$N" -f a@source.test -t b@sink.test "127.0.0.1:$port"
  sleep 2
  after=$(anon_kib "${!pid_var}")
  echo "$name: RssAnon $before KiB before, $after KiB with $N messages in delivery: $(( (after - before) * 1024 / N )) B per message"
done
