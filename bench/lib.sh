# Shared pieces of the relay benchmarks: smtp-sink, a Switchyard under test, and timed
# smtp-source runs. Sourced by the bench scripts; expects N, SESSIONS, root and work to be set.

SINK_PORT=${SINK_PORT:-2700}

now() { date +%s.%N; }

ensure_postfix_tools() {
  if ! command -v smtp-source >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postfix >/dev/null
  fi
}

# build_switchyard: the plugins and a release server, or BIN (a server built before, to compare).
build_switchyard() {
  (cd "$root" && ./scripts/build-plugins >/dev/null)
  if [ -n "${BIN:-}" ]; then
    bin=$BIN
  else
    (cd "$root" && cargo build --release --bin switchyard -q)
    bin="$root/target/release/switchyard"
  fi
}

# Postfix as a plain relay to the sink (its logs go to syslog, which may not run: less work for
# it): loopback only, no DNS, no local delivery, an empty queue.
start_postfix_relay() {
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
}

postfix_queue_empty() { postqueue -p 2>/dev/null | grep -q 'Mail queue is empty'; }

start_sink() {
  smtp-sink -u postfix 127.0.0.1:$SINK_PORT 1000 &
  sink_pid=$!
}

# start_switchyard NAME PORT EXTRA_TOML [TOP_TOML]: a release Switchyard relaying everything to
# the sink; EXTRA_TOML goes at the end (tables), TOP_TOML among the top-level keys.
start_switchyard() {
  local name=$1 port=$2 extra=$3 top=${4:-}
  cat > "$work/$name.toml" <<TOML
hostname = "switchyard.bench.test"
data_dir = "$work/$name-data"
$top

[[listener]]
name = "bench"
address = "127.0.0.1:$port"
greeting_delay = "0s"

[smtp]
max_sessions_per_ip = ${MAX_SESSIONS_PER_IP:-200}

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
  # PACE (seconds): each session waits that long between messages, for a fixed offered rate
  # (about SESSIONS/PACE messages per second) instead of as fast as the server takes them.
  smtp-source -s "$SESSIONS" ${PACE:+-w "$PACE"} -l "$size" -m "$N" -f bench@source.test -t sink@sink.test "127.0.0.1:$port"
  accepted=$(now)
  until "$@"; do sleep 0.05; done
  done=$(now)
  awk -v n="$N" -v s="$start" -v a="$accepted" -v d="$done" 'BEGIN { printf "%.0f %.0f", n/(a-s), n/(d-s) }'
}

cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }

# measure NAME PORT -> prints "delivered_rate cpu_us_per_message": one timed run of N messages of
# SIZE bytes against the server start_switchyard started as NAME, and the CPU time that server
# spent on it (from /proc: it does not depend on what else the machine was doing).
measure() {
  local name=$1 port=$2 pid_var=${1}_pid before delivered
  before=$(cpu_ticks "${!pid_var}")
  read -r _ delivered <<<"$(run "$port" "$SIZE" switchyard_queue_empty "$name")"
  echo "$delivered $(( ($(cpu_ticks "${!pid_var}") - before) * 1000000 / $(getconf CLK_TCK) / N ))"
}

sent_count() { grep -c 'status=sent' "$work/$1.log"; }

# compare_rounds "NAME PORT" "NAME PORT": ROUNDS rounds of both servers in turn, a table row per
# round with each delivered rate and CPU per message, and the second's rate over the first's.
compare_rounds() {
  local round row server delivered cpu rates
  for round in $(seq "$ROUNDS"); do
    row="| $round"
    rates=()
    for server in "$1" "$2"; do
      # shellcheck disable=SC2086
      read -r delivered cpu <<<"$(measure $server)"
      rates+=("$delivered")
      row+=" | $delivered | $cpu"
    done
    echo "$row | $(awk -v a="${rates[0]}" -v b="${rates[1]}" 'BEGIN { printf "%.3f", b/a }') |"
  done
}

# scanner_policy: content-filter with the common policy on the scanners' results (granted
# `scanners`), as the scanner benchmarks run it.
scanner_policy() {
  cat <<TOML
[[plugin]]
name = "content-filter"
path = "$root/target/wasm32-wasip2/plugin/content_filter.wasm"
grants = ["scanners"]
[plugin.config]
rules = [
  { virus = true, action = "reject", reply = "554 5.7.1 Virus found: {virus}" },
  { scanner_error = true, action = "tempfail", reply = "451 4.7.1 Cannot scan the message now" },
  { rspamd_action = "reject", action = "reject", reply = "550 5.7.1 Refused as spam: {rspamd_message}" },
  { rspamd_action = "add header", action = "add-header", name = "X-Spam", value = "Yes" },
]
TOML
}
