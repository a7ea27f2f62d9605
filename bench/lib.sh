# Shared pieces of the relay benchmarks: smtp-sink, a Switchyard under test, and timed
# smtp-source runs. Sourced by the bench scripts; expects N, SESSIONS, root and work to be set.

SINK_PORT=${SINK_PORT:-2700}

now() { date +%s.%N; }

ensure_postfix_tools() {
  if ! command -v smtp-source >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postfix >/dev/null
  fi
}

build_switchyard() {
  (cd "$root" && ./scripts/build-plugins >/dev/null && cargo build --release --bin switchyard -q)
  bin="$root/target/release/switchyard"
}

start_sink() {
  smtp-sink -u postfix 127.0.0.1:$SINK_PORT 1000 &
  sink_pid=$!
}

# start_switchyard NAME PORT EXTRA_TOML: a release Switchyard relaying everything to the sink.
start_switchyard() {
  local name=$1 port=$2 extra=$3
  cat > "$work/$name.toml" <<TOML
hostname = "switchyard.bench.test"
data_dir = "$work/$name-data"

[[listener]]
name = "bench"
address = "127.0.0.1:$port"
greeting_delay = "0s"

[smtp]
max_sessions_per_ip = 200

[delivery]
smarthost = "127.0.0.1:$SINK_PORT"
tls = "none"

$extra
TOML
  "$bin" serve --config "$work/$name.toml" 2>"$work/$name.log" &
  eval "${name}_pid=$!"
  for _ in $(seq 300); do (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null && return; sleep 0.1; done
  echo "switchyard $name did not start:" >&2; cat "$work/$name.log" >&2; return 1
}

# noop_chain [COMPONENT]: the configuration of five copies of plugins/noop (or COMPONENT), which
# implements every hook and answers "continue": the chain the plugin benchmarks measure.
noop_chain() {
  local component=${1:-$root/target/wasm32-wasip2/plugin/noop.wasm}
  for n in 1 2 3 4 5; do
    printf '[[plugin]]\nname = "noop-%s"\npath = "%s"\n\n' "$n" "$component"
  done
}

switchyard_queue_empty() { "$bin" queue list --config "$work/$1.toml" 2>/dev/null | tail -1 | grep -q '^-- 0 message'; }

# run PORT SIZE EMPTY_CHECK... -> prints "accepted_rate delivered_rate"
run() {
  local port=$1 size=$2; shift 2
  local start accepted done
  start=$(now)
  smtp-source -s "$SESSIONS" -l "$size" -m "$N" -f bench@source.test -t sink@sink.test "127.0.0.1:$port"
  accepted=$(now)
  until "$@"; do sleep 0.05; done
  done=$(now)
  awk -v n="$N" -v s="$start" -v a="$accepted" -v d="$done" 'BEGIN { printf "%.0f %.0f", n/(a-s), n/(d-s) }'
}

sent_count() { grep -c 'status=sent' "$work/$1.log"; }
