#!/usr/bin/env bash
# Instructions per issuance: the engine's user-space instructions (valgrind's callgrind, which
# counts them whatever the rest of the machine does) over the issuances it made while counting,
# under `castellum bench`'s load. Two runs of one build agree within ~0.3%, where this machine's
# CPU time per issuance moves by ±10% between runs: use it to compare builds for cuts too small
# for the timed bench. Kernel time (syscalls, thread switches, fsync) is not counted.
#
#   benches/instructions.sh ENGINE [CONCURRENCY] [DURATION]
#   benches/instructions.sh ./target/release/castellum 16 15s
#
# The engine runs ~50 times slower under callgrind; the load is the bench's, against 127.0.0.1,
# for DURATION (whole seconds, at least `10s`) after a 1 s warm-up, and stops by itself. The
# window counted starts 5 s after the engine's first access line for `/v1/certificates` (so
# start-up, migrations, key loading, the identity key pool's first fill and the first CRLs are
# not counted) and is dumped 1 s before the level ends. An issuance is a call to `castellum::pki::tbs::prepare` (one per
# certificate built). Needs valgrind (apt-get install valgrind) and python3. The bench driver is
# ./target/release/castellum unless BENCH is set.
set -euo pipefail
ENGINE=$(realpath "$1"); CONCURRENCY=${2:-16}; DURATION=${3:-15s}
BENCH=${BENCH:-./target/release/castellum}
command -v valgrind >/dev/null || { echo "valgrind is not installed (apt-get install valgrind)" >&2; exit 1; }
DIR=$(mktemp -d /tmp/castellum-instructions.XXXX)
cat > "$DIR/engine.sh" <<WRAP
#!/usr/bin/env bash
exec valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file=$DIR/callgrind.out.%p "$ENGINE" "\$@"
WRAP
chmod +x "$DIR/engine.sh"
"$BENCH" bench --engine "$DIR/engine.sh" --out "$DIR" --duration "$DURATION" --concurrency "$CONCURRENCY" \
  --idle-connections 0 > "$DIR/bench.txt" 2>&1 &
bench=$!
log() { cat "$DIR"/bench-*/engine/engine.log 2>/dev/null || true; }
fail() { echo "$1; see $DIR" >&2; kill "$bench" 2>/dev/null || true; exit 1; }
engine=""
for _ in $(seq 1 600); do
  kill -0 "$bench" 2>/dev/null || fail "the bench stopped before its load began"
  engine=$(pgrep -f "valgrind.*$DIR/callgrind.out" | head -1 || true)
  [ -n "$engine" ] && log | grep -q '/v1/certificates' && break
  sleep 0.5
done
[ -n "$engine" ] || fail "the engine did not start"
# Counting starts 5 s into the load (what start-up left running, under valgrind's slowness:
# the identity key pool's fill, the first CRLs, must not be counted) and stops 1 s before the
# level ends.
[ "${DURATION%s}" -ge 10 ] || fail "DURATION must be at least 10s"
sleep 5
callgrind_control --instr=on "$engine" > /dev/null || fail "callgrind_control could not reach the engine"
sleep $(( ${DURATION%s} - 5 ))
callgrind_control --dump=window "$engine" > /dev/null || fail "callgrind_control could not dump the window"
wait "$bench" || { cat "$DIR/bench.txt" >&2; exit 1; }
window=$(ls "$DIR"/callgrind.out.*.1 2>/dev/null | head -1)
[ -n "$window" ] || fail "no dump of the counted window"
python3 - "$window" <<'PY'
import re, sys
names, total, issued, into_prepare = {}, 0, 0, False
for line in open(sys.argv[1], errors="replace"):
    if line.startswith(("summary:", "totals:")) and not total:
        total = int(line.split()[1])
    called = re.match(r"cfn=\((\d+)\)(?: (.*))?", line)
    if called:
        if called.group(2):
            names[called.group(1)] = called.group(2)
        into_prepare = names.get(called.group(1), "").split("'")[0] == "castellum::pki::tbs::prepare"
        continue
    named = re.match(r"fn=\((\d+)\) (.*)", line)
    if named:
        names[named.group(1)] = named.group(2)
    if into_prepare and line.startswith("calls="):
        issued += int(line.split()[0].split("=")[1])
        into_prepare = False
if not issued:
    sys.exit("no issuance was counted")
print(f"{total:,} instructions over {issued:,} issuances: {total // issued:,} per issuance")
PY
grep '^  SQLite' "$DIR/bench.txt" || true
echo "(callgrind's file and the bench's output are in $DIR)"
