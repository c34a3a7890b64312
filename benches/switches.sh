#!/usr/bin/env bash
# Thread switches per issuance: the context switches (voluntary and involuntary, summed over the
# engine's threads from /proc/PID/task/*/status) over the certificates it issued in the same
# window (its own /metrics), under `castellum bench`'s load. A thread that sleeps until another
# wakes it switches once per wake-up, so this counts hand-offs between threads; it moves far
# less between runs than CPU time on this shared machine.
#
#   benches/switches.sh ENGINE [CONCURRENCY] [WINDOW_SECONDS]
#   benches/switches.sh ./target/release/castellum 64 5
#
# The load is the bench's, against 127.0.0.1, on SQLite, for WINDOW + 7 s, and stops by itself;
# the window starts 2 s into it. The bench driver is ./target/release/castellum unless BENCH is
# set. Needs curl.
set -euo pipefail
ENGINE=$(realpath "$1"); CONCURRENCY=${2:-64}; WINDOW=${3:-5}
BENCH=${BENCH:-./target/release/castellum}
DIR=$(mktemp -d /tmp/castellum-switches.XXXX)
"$BENCH" bench --engine "$ENGINE" --out "$DIR" --duration "$((WINDOW + 7))s" --concurrency "$CONCURRENCY" \
  --idle-connections 0 > "$DIR/bench.txt" 2>&1 &
bench=$!
fail() { echo "$1; see $DIR" >&2; kill "$bench" 2>/dev/null || true; exit 1; }
for _ in $(seq 1 480); do
  kill -0 "$bench" 2>/dev/null || fail "the bench stopped before its load began"
  grep -qs '/v1/certificates' "$DIR"/bench-*/engine/engine.log && break
  sleep 0.25
done
sleep 2
pid=$(pgrep -f "serve --config $DIR/" | head -1) || true
[ -n "$pid" ] || fail "the engine is not running"
listen=$(sed -n '/^\[http\]/,/^\[/s/^listen = "\(.*\)"/\1/p' "$DIR"/bench-*/engine/keys/castellum.toml)
switches() { cat /proc/"$pid"/task/*/status 2>/dev/null | awk '/ctxt_switches/ { n += $2 } END { print n }'; }
issued() {
  curl -sf "http://$listen/metrics" |
    awk '/^castellum_http_request_duration_seconds_count\{/ && /route="\/v1\/certificates"/ && /status="201"/ { n += $2 } END { printf "%d\n", n }'
}
s1=$(switches); n1=$(issued)
sleep "$WINDOW"
s2=$(switches); n2=$(issued)
wait "$bench" || { cat "$DIR/bench.txt" >&2; exit 1; }
[ "$n2" -gt "$n1" ] || fail "nothing was issued in the window"
python3 -c "print(f'{$s2 - $s1} switches / {$n2 - $n1} issuances = {($s2 - $s1) / ($n2 - $n1):.2f} per issuance (c=$CONCURRENCY, $(basename "$ENGINE"))')"
rm -rf "$DIR"
