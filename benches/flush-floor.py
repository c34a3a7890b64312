#!/usr/bin/env python3
"""The floor of one durable commit on this machine's disk, without castellum.

One client at a time waits for two durable commits per issuance on SQLite (the write-ahead
record before the signature, the certificate before the answer), so the c=1 throughput of
write-ahead issuance cannot exceed 1 / (2 x this floor), whatever the engine does.

    benches/flush-floor.py [DIRECTORY] [COMMITS]
    benches/flush-floor.py drill-reports 2000

Measured in DIRECTORY (default: the current one; use the file system the database is on), each
case COMMITS times (default 2,000), one after the other, as one client does:

- `pwrite+fsync`: 6 pages of 4 KB written over the same place of a file, then `fsync` (what
  SQLite's WAL does at a commit: about 6 frames, then one sync);
- `sqlite WAL FULL`: a one-row insert committed by Python's sqlite3 module (WAL,
  `synchronous = FULL`, as castellum opens its SQLite database).

Prints the median, p90 and mean of each, and the c=1 bound they imply. Nothing is left behind.
"""
import os
import sqlite3
import statistics
import sys
import tempfile
import time

directory = sys.argv[1] if len(sys.argv) > 1 else "."
commits = int(sys.argv[2]) if len(sys.argv) > 2 else 2000


def report(name, samples):
    samples.sort()
    median = samples[len(samples) // 2]
    p90 = samples[int(len(samples) * 0.9)]
    mean = statistics.fmean(samples)
    print(
        f"{name:>16}: median {median * 1e6:6.0f} us, p90 {p90 * 1e6:6.0f} us, mean {mean * 1e6:6.0f} us"
        f" -> two per issuance: at most {1 / (2 * median):,.0f} issuances/s at c=1"
    )


with tempfile.TemporaryDirectory(dir=directory, prefix="flush-floor.") as scratch:
    path = os.path.join(scratch, "pages")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    page = os.urandom(4096)
    os.pwrite(fd, page * 64, 0)
    os.fsync(fd)
    samples = []
    for i in range(commits):
        started = time.perf_counter()
        os.pwrite(fd, page * 6, (i % 10) * 6 * 4096)
        os.fsync(fd)
        samples.append(time.perf_counter() - started)
    os.close(fd)
    report("pwrite+fsync", samples)

    db = sqlite3.connect(os.path.join(scratch, "floor.db"), isolation_level=None)
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("PRAGMA synchronous = FULL")
    db.execute("CREATE TABLE t (serial TEXT PRIMARY KEY, body BLOB NOT NULL)")
    samples = []
    for i in range(commits):
        started = time.perf_counter()
        db.execute("BEGIN IMMEDIATE")
        db.execute("INSERT INTO t VALUES (?, ?)", (f"{i:040x}", page[:1000]))
        db.execute("COMMIT")
        samples.append(time.perf_counter() - started)
    db.close()
    report("sqlite WAL FULL", samples)
