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
# for DURATION after a 1 s warm-up, and stops by itself. Counting starts 5 s after the engine
# answers: start-up, migrations, key loading and the identity key pool's first fill are not
# counted. An issuance is a call to `castellum::pki::tbs::prepare` (one per certificate built).
# Needs valgrind (apt-get install valgrind) and python3. The bench driver is
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
engine=""
for _ in $(seq 1 600); do
  engine=$(pgrep -f "valgrind.*$DIR/callgrind.out" | head -1 || true)
  [ -n "$engine" ] && grep -qs '/readyz' "$DIR"/bench-*/engine/engine.log && break
  sleep 0.5
done
[ -n "$engine" ] || { echo "the engine did not start; see $DIR" >&2; kill "$bench" 2>/dev/null; exit 1; }
# The first seconds after start-up still fill the identity key pool, slowly under valgrind.
sleep 5
callgrind_control --instr=on "$engine" > /dev/null
wait "$bench" || { cat "$DIR/bench.txt" >&2; exit 1; }
python3 - "$DIR"/callgrind.out.* <<'PY'
import re, sys
names, total, issued, into_prepare = {}, 0, 0, False
for line in open(sys.argv[1], errors="replace"):
    if line.startswith(("summary:", "totals:")) and not total:
        total = int(line.split()[1])
    called = re.match(r"cfn=\((\d+)\)(?: (.*))?", line)
    if called:
        if called.group(2):
            names[called.group(1)] = called.group(2)
        into_prepare = "castellum::pki::tbs::prepare" in names.get(called.group(1), "")
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
