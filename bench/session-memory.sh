#!/usr/bin/env bash
# Memory per SMTP session: SESSIONS sessions opened by a client on loopback and held at one
# point (after EHLO; after MAIL and RCPT; inside DATA with a first line sent), a fresh release
# server for each point, without plugins and with the example chain (examples/switchyard.toml's
# five plugins), and Postfix (POSTFIX=, empty, leaves it out) the same way. The server's
# resident, anonymous and proportional memory (VmRSS, RssAnon from
# /proc/PID/status, Pss from smaps_rollup) before the sessions open and once they are all held,
# divided by SESSIONS.
#
# A fresh server per point: in one process, later points would read lower, as the allocator
# reuses what earlier sessions freed.
#
#   SESSIONS=800 bench/session-memory.sh
set -euo pipefail
SESSIONS=${SESSIONS:-800}
SINK_PORT=${SINK_PORT:-2798}
PORT=${PORT:-2651}
root=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d /tmp/switchyard-session-memory.XXXXXX)
N=0
source "$root/bench/lib.sh"
cleanup() { kill ${server_pid:-} 2>/dev/null || true; }
trap cleanup EXIT
ulimit -n "$(ulimit -Hn)"

build_switchyard

# example_chain: the example configuration's [[plugin]] tables, their paths made absolute.
example_chain() {
  awk '/^\[\[plugin\]\]/ { on = 1 } /^\[/ && !/^\[\[plugin\]\]/ && !/^\[plugin\./ { on = 0 } on' \
    "$root/examples/switchyard.toml" | sed "s#\"\.\./#\"$root/#"
}

kib() { awk -v key="$1:" '$1 == key { print $2 }' "/proc/$2/status"; }
# Proportional set size: a page shared by several mappings (a plugin's memory image, mapped
# into every slot that runs it) counted once in all, not once per mapping as in VmRSS.
pss() { awk '$1 == "Pss:" { print $2 }' "/proc/$1/smaps_rollup"; }

# hold.py PORT SESSIONS POINT: opens the sessions, brings each to POINT, prints "held" and
# holds them until its standard input closes.
cat > "$work/hold.py" <<'PY'
import asyncio, sys
port, count, point = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
async def reply(reader):
    while True:
        line = await asyncio.wait_for(reader.readline(), 30)
        if not line or line[3:4] != b"-":
            return line
async def session(n):
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 30)
    await reply(reader)
    writer.write(b"EHLO client%d.bench.test\r\n" % n); await reply(reader)
    if point in ("rcpt", "data"):
        writer.write(b"MAIL FROM:<s%d@source.test>\r\n" % n); await reply(reader)
        writer.write(b"RCPT TO:<r%d@sink.test>\r\n" % n); await reply(reader)
    if point == "data":
        writer.write(b"DATA\r\n"); await reply(reader)
        writer.write(b"Subject: held\r\n")
        await writer.drain()
    return writer
async def main():
    writers = []
    for start in range(0, count, 100):
        writers += await asyncio.gather(*(session(n) for n in range(start, min(count, start + 100))))
    print("held", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
asyncio.run(main())
PY

# memory PID...: the processes' VmRSS, RssAnon and Pss summed, in KiB.
memory() {
  local rss=0 anon=0 prop=0 pid
  for pid in "$@"; do
    rss=$((rss + $(kib VmRSS "$pid"))); anon=$((anon + $(kib RssAnon "$pid"))); prop=$((prop + $(pss "$pid")))
  done
  echo "$rss $anon $prop"
}

# Postfix's processes (master, and the smtpd serving each session), by their executables.
postfix_pids() {
  local pid
  for pid in $(pgrep -f '^(/usr/lib/postfix/sbin/|smtpd|qmgr|pickup|anvil|tlsmgr)' || true); do
    case $(readlink "/proc/$pid/exe" 2>/dev/null) in /usr/lib/postfix/sbin/*) echo "$pid" ;; esac
  done
}

# row SERVER POINT PORT PIDS_COMMAND: holds SESSIONS sessions at POINT against the server on
# PORT and prints the table row; PIDS_COMMAND lists the server's processes.
row() {
  local server=$1 point=$2 port=$3 pids=$4 before after
  sleep 1
  before=$(memory $($pids))
  coproc HOLD { python3 "$work/hold.py" "$port" "$SESSIONS" "$point"; }
  read -r held <&"${HOLD[0]}" || true
  if [ "${held:-}" != held ]; then echo "the client could not hold $SESSIONS sessions at $point on $server" >&2; exit 1; fi
  sleep 1
  after=$(memory $($pids))
  eval "exec ${HOLD[1]}>&-"
  wait "$HOLD_PID" 2>/dev/null || true
  # shellcheck disable=SC2086
  awk -v s="$server" -v p="$point" -v n="$SESSIONS" -v b="$before" -v a="$after" 'BEGIN {
    split(b, x, " "); split(a, y, " ")
    printf "| %s | %s | %.1f | %.1f | %.1f | %.0f |\n", s, p, (y[1] - x[1]) * 1.024 / n,
      (y[2] - x[2]) * 1.024 / n, (y[3] - x[3]) * 1.024 / n, n * 1048576 / (y[3] - x[3])
  }'
}

switchyard_pid() { echo "$server_pid"; }

echo "# $(date -u +%Y-%m-%dT%H:%MZ) $SESSIONS sessions, a fresh server per point"
echo "| server | point | resident KB/session | anonymous KB/session | proportional KB/session | sessions per GiB (proportional) |"
echo "| --- | --- | --- | --- | --- | --- |"
for chain in none example; do
  for point in ehlo rcpt data; do
    extra=""
    [ "$chain" = example ] && extra=$(example_chain)
    rm -rf "$work/server-data"
    MAX_SESSIONS_PER_IP=$((SESSIONS + 10)) start_switchyard server "$PORT" "$extra"
    row "switchyard, $chain" "$point" "$PORT" switchyard_pid
    kill "$server_pid"; wait "$server_pid" 2>/dev/null || true
  done
done
if [ -n "${POSTFIX-1}" ]; then
  # Postfix as the other benchmarks run it, allowed a process per session; a fresh start per
  # point. Its per-session cost is an smtpd process each.
  ensure_postfix_tools
  for point in ehlo rcpt data; do
    start_postfix_relay
    postconf -e "default_process_limit = $((SESSIONS + 50))" "smtpd_client_connection_count_limit = 0"
    postfix reload >/dev/null 2>&1
    row postfix "$point" 25 postfix_pids
    postfix stop >/dev/null 2>&1 || true
  done
fi
