#!/usr/bin/env bash
# Instructions per message through a chain of five noop plugins (one relayed message's plugin work:
# five instances, every session and delivery hook, the teardown), counted by valgrind's callgrind.
# Unlike a time, the count is the same from one run to the next and from a busy minute to a quiet
# one, so it shows what a change to the plugin runtime saves on a shared, noisy machine.
#
#   N=400 TOP=25 bench/instructions.sh
#   BENCH=/tmp/hook_call-before N=400 bench/instructions.sh   # a binary kept from another build
#   HOOK_CALL_TRACE=1 N=400 bench/instructions.sh             # with the decision trace collected
#
# It runs `hook_call` in its counting mode (HOOK_CALL_MESSAGES) twice under callgrind, with 0 and
# with N messages, and divides the difference by N, so that start-up (loading the plugins, taking
# their snapshots) drops out. Then it lists the TOP functions by instructions per message
# (exclusive counts). Only user-space instructions are counted: the kernel's share (the system
# calls that reset pool slots, for one) is not in the figure.
set -euo pipefail
N=${N:-400}
TOP=${TOP:-25}
root=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d /tmp/switchyard-instructions.XXXXXX)
trap 'rm -rf "$work"' EXIT

if ! command -v valgrind >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq valgrind >/dev/null
fi
cd "$root"
./scripts/build-plugins >/dev/null
# BENCH=PATH counts a `hook_call` binary built earlier (say, of the commit before a change).
bench=${BENCH:-}
[ -n "$bench" ] || bench=$(cargo bench --bench hook_call --no-run --message-format=json 2>/dev/null | python3 -c '
import json, sys
for line in sys.stdin:
    item = json.loads(line)
    if item.get("reason") == "compiler-artifact" and "bench" in item["target"]["kind"]:
        print(item["executable"])')
# Fill the compilation cache first, or the first counted run compiles the plugin and the second
# does not, and the difference is meaningless. Under valgrind too: it shows the program another
# CPU, so cranelift's settings, and with them the cache key, differ from a run without it. (This
# is for `hook_call` binaries built before 2026-12-07, which used wasmtime's disk cache; later
# ones keep no cache and compile in every run, with 0 messages as with N, so it cancels out.)
HOOK_CALL_MESSAGES=0 "$bench" --bench
HOOK_CALL_MESSAGES=0 valgrind --tool=none "$bench" --bench 2>/dev/null

for count in 0 "$N"; do
  HOOK_CALL_MESSAGES=$count valgrind --tool=callgrind --callgrind-out-file="$work/count.$count" \
    "$bench" --bench 2>"$work/valgrind.$count.log" \
    || { cat "$work/valgrind.$count.log" >&2; exit 1; }
done

python3 - "$work/count.0" "$work/count.$N" "$N" "$TOP" <<'PY'
import collections, re, subprocess, sys

def per_function(path):
    out = subprocess.run(
        ["callgrind_annotate", "--threshold=100", "--tree=none", "--auto=no", path],
        capture_output=True, text=True, check=True).stdout
    counts, total = collections.Counter(), None
    for line in out.splitlines():
        m = re.match(r"\s*([\d,]+)\s+(?:\(\s*[\d.]+%\)\s+)?(.*)", line)
        if not m:
            continue
        value, name = int(m.group(1).replace(",", "")), m.group(2)
        if "PROGRAM TOTALS" in name:
            total = value
        else:
            # "file:function [object]" -> "function"
            name = re.sub(r"\s\[[^\]]*\]$", "", name)
            if name.startswith("???"):
                name = "(compiled wasm: the plugins' code and wasmtime's trampolines)"
            elif ":" in name:
                name = name.split(":", 1)[1]
            counts[name] += value
    return total, counts

base_total, base = per_function(sys.argv[1])
run_total, run = per_function(sys.argv[2])
n, top = int(sys.argv[3]), int(sys.argv[4])
print(f"{(run_total - base_total) / n:,.0f} instructions per message through five plugins "
      f"(N={n}; {base_total:,} without messages, {run_total:,} with)")
print()
print("| instructions per message | function |")
print("| ---: | --- |")
rows = sorted(((run[k] - base[k]) / n, k) for k in set(run) | set(base))
for value, name in reversed(rows[-top:]):
    print(f"| {value:,.0f} | `{name[:120]}` |")
PY
