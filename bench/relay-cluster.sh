#!/usr/bin/env bash
# Relay throughput of the queue engines, in one run on this machine: Postfix, Switchyard on its
# embedded SQLite queue, Switchyard on PostgreSQL with one node, and three nodes sharing one
# PostgreSQL queue (smtp-source's sessions split evenly over the three). Every relay commits to
# disk before its 250 (Postfix: fsync of the queue file; SQLite: WAL with synchronous=FULL;
# PostgreSQL: synchronous_commit = on, a WAL flush). A run ends when the relay's queue is empty
# again, so the delivered rate counts the whole path.
#
# On a machine with fewer cores than relays, the three-node figure measures the overhead of
# coordination (three processes and the database on the same cores), not scale-out.
#
# Needs root, Debian's postfix package (installed if missing) and the PostgreSQL server of
# scripts/ensure-postgres. It RECONFIGURES THE LOCAL POSTFIX (loopback only, relayhost = the
# sink): run it on a test machine.
#
#   N=5000 SESSIONS=30 SIZES="1024 102400" bench/relay-cluster.sh
set -euo pipefail
N=${N:-5000}
SESSIONS=${SESSIONS:-30}
SIZES=${SIZES:-"1024 102400"}
DATABASE=${DATABASE:-postgres://postgres@127.0.0.1:5432/test}
POSTFIX_PORT=25
SQLITE_PORT=2625
PG_PORT=2626
CLUSTER_PORTS=(2627 2628 2629)

root=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d /tmp/switchyard-bench.XXXXXX)
source "$root/bench/lib.sh"
pids=()
cleanup() {
  kill ${sink_pid:-} "${pids[@]}" 2>/dev/null || true
  postfix stop >/dev/null 2>&1 || true
}
trap cleanup EXIT

ensure_postfix_tools
"$root/scripts/ensure-postgres"
build_switchyard
start_sink

start_postfix_relay

# A PostgreSQL queue of its own per size and setup: a fresh schema.
pg_queue() {
  printf '[queue]\nengine = "postgres"\nurl = "%s"\nschema = "%s"\n' "$DATABASE" "$1"
}
psql_() { psql "$DATABASE" -qAt -c "$1"; }
pg_queue_empty() { [ "$(psql_ "SELECT COUNT(*) FROM $1.messages")" = 0 ]; }

# run_cluster SIZE SCHEMA: smtp-source split over the three nodes; prints "accepted delivered".
run_cluster() {
  local size=$1 schema=$2 start accepted done per=$((N / 3)) sessions=$((SESSIONS / 3))
  local sources=()
  start=$(now)
  for port in "${CLUSTER_PORTS[@]}"; do
    smtp-source -s "$sessions" -l "$size" -m "$per" -f bench@source.test -t sink@sink.test "127.0.0.1:$port" &
    sources+=($!)
  done
  wait "${sources[@]}"
  accepted=$(now)
  until pg_queue_empty "$schema"; do sleep 0.05; done
  done=$(now)
  awk -v n="$((per * 3))" -v s="$start" -v a="$accepted" -v d="$done" 'BEGIN { printf "%.0f %.0f", n/(a-s), n/(d-s) }'
}

start_node() {
  local name=$1 port=$2 extra=$3 top=${4:-}
  start_switchyard "$name" "$port" "$extra" "$top"
  pids+=("$(eval echo "\$${name}_pid")")
}

stop_nodes() {
  kill "${pids[@]}" 2>/dev/null || true
  wait "${pids[@]}" 2>/dev/null || true
  pids=()
}

echo "# $(date -u +%Y-%m-%dT%H:%MZ) N=$N sessions=$SESSIONS $(nproc) cores, Postfix $(postconf -h mail_version), $(psql_ 'SELECT version()' | cut -d' ' -f1-2), fsync=$(psql_ 'SHOW fsync'), synchronous_commit=$(psql_ 'SHOW synchronous_commit')"
printf "| size | Postfix delivered/s | SQLite accepted/s | SQLite delivered/s | PostgreSQL 1 node accepted/s | PostgreSQL 1 node delivered/s | PostgreSQL 3 nodes accepted/s | PostgreSQL 3 nodes delivered/s | 1 node on PostgreSQL vs Postfix |\n"
printf "| --- | --- | --- | --- | --- | --- | --- | --- | --- |\n"
for size in $SIZES; do
  read -r _ pf_del <<<"$(run $POSTFIX_PORT "$size" postfix_queue_empty)"

  start_node sqlite $SQLITE_PORT ""
  read -r sq_acc sq_del <<<"$(run $SQLITE_PORT "$size" switchyard_queue_empty sqlite)"
  stop_nodes

  schema="bench_one_$size"
  psql_ "DROP SCHEMA IF EXISTS $schema CASCADE" 2>/dev/null
  start_node one $PG_PORT "$(pg_queue $schema)" 'node_id = "one"'
  read -r pg_acc pg_del <<<"$(run $PG_PORT "$size" pg_queue_empty $schema)"
  stop_nodes

  schema="bench_three_$size"
  psql_ "DROP SCHEMA IF EXISTS $schema CASCADE" 2>/dev/null
  for n in 0 1 2; do
    start_node "node$n" "${CLUSTER_PORTS[$n]}" "$(pg_queue $schema)" "node_id = \"node-$n\""
  done
  read -r cl_acc cl_del <<<"$(run_cluster "$size" $schema)"
  stop_nodes

  ratio=$(awk -v a="$pg_del" -v b="$pf_del" 'BEGIN { printf "%.2f", a/b }')
  printf "| %s B | %s | %s | %s | %s | %s | %s | %s | %sx |\n" "$size" "$pf_del" "$sq_acc" "$sq_del" "$pg_acc" "$pg_del" "$cl_acc" "$cl_del" "$ratio"
done
echo
for name in sqlite one node0 node1 node2; do
  echo "$name: $(sent_count $name) sent, $(grep -c 'status=deferred' "$work/$name.log" || true) deferred"
done
