#!/usr/bin/env bash
# Tuples PostgreSQL updated per tuple inserted in the bench's database, over 8 s in the middle
# of a 20 s level: how many rows are written twice (a certificate marked issued, an audit row
# sealed by the audit writer) rather than once.
# usage: benches/pg-writes.sh ENGINE CONCURRENCY   (PostgreSQL on 127.0.0.1:5432, user postgres)
# With audit rows sealed at insert the ratio is ~0.5 (each certificate inserted, then updated;
# its audit row inserted once); with every audit row sealed by the writer, ~1.0.
set -euo pipefail
engine=$1 concurrency=$2
url='postgres://postgres@127.0.0.1:5432?sslmode=disable'
report=$(mktemp)
trap 'rm -f "$report"' EXIT
psql_q() { psql -h 127.0.0.1 -U postgres -d postgres -Atc "$1"; }
# Bench databases already there (another bench running) are not this one's.
before=$(psql_q "SELECT coalesce(string_agg(quote_literal(datname), ','), quote_literal('none')) FROM pg_database WHERE datname LIKE 'castellum_drill_%'")
"$engine" bench --duration 20s --idle-connections 0 --concurrency "$concurrency" --postgres "$url" \
    > "$report" 2>&1 &
bench=$!
# The bench's database appears once the engine starts; wait for it to be written to.
db=""
for _ in $(seq 1 60); do
    db=$(psql_q "SELECT datname FROM pg_stat_database WHERE datname LIKE 'castellum_drill_%' AND datname NOT IN ($before) AND tup_inserted > 1000 ORDER BY tup_inserted DESC LIMIT 1")
    [ -n "$db" ] && break
    sleep 0.5
done
[ -n "$db" ] || { echo "no bench database appeared" >&2; kill "$bench"; exit 1; }
sleep 6
q="SELECT tup_inserted || ' ' || tup_updated FROM pg_stat_database WHERE datname = '$db'"
read -r ins0 upd0 <<<"$(psql_q "$q")"
sleep 8
read -r ins1 upd1 <<<"$(psql_q "$q")"
wait "$bench"
python3 -c "i=$ins1-$ins0; u=$upd1-$upd0; print(f'inserted {i}, updated {u}: {u/i:.3f} updated per inserted')"
grep '^| PostgreSQL' "$report"
