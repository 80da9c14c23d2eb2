"""Per-operation cost of a MongoDB server vs collection size (made for FerretDB/SQLite).

For each size N it fills a fresh collection with N job-sized documents (the shape of
the adapter's `jobs` documents: snapshot bytes plus a ring of 64 event slots, about
10 KB), then times, one at a time:

- `update_one({_id}, {$set: ...})` - what every callback, claim and lease does;
- `find_one({_id})` - what loading a job does;
- `find({_id: {$in: 16 ids}})` - what loading a batch of jobs does.

On FerretDB v1.24.2 with the SQLite backend a query by `_id` is pushed down to SQLite,
but an update scans the whole collection, so its cost grows with N.

Usage: python -m bench.ferretdb_scan MONGODB_URI [--sizes 100,1000,5000] [--ops 30]
       [--out result.json]
Writes {"sizes": {N: {"update_ms": ..., ...}}} and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any

from bson import Binary
from pymongo import MongoClient

RING = 64


def job_doc(i: int) -> dict[str, Any]:
    return {
        "_id": f"scan-{i:06d}",
        "kind": 1,
        "state": 2,
        "lab": ['["tenant", "bench"]'],
        "create_ns": time.time_ns(),
        "seq": RING,
        "token_hash": Binary(os.urandom(32)),
        "job": Binary(os.urandom(600)),
        "ring": {
            str(s): {
                "s": s,
                "k": Binary(os.urandom(32)),
                "e": Binary(os.urandom(110)),
                "w": Binary(os.urandom(16)),
            }
            for s in range(RING)
        },
    }


def timed(fn: Any, n: int) -> dict[str, float]:
    times = []
    for i in range(n):
        t = time.perf_counter()
        fn(i)
        times.append((time.perf_counter() - t) * 1000)
    return {
        "mean": round(statistics.fmean(times), 2),
        "median": round(statistics.median(times), 2),
        "max": round(max(times), 2),
    }


def measure(uri: str, sizes: list[int], ops: int) -> dict[str, Any]:
    client: MongoClient[dict[str, Any]] = MongoClient(uri, timeoutMS=120_000)
    db = client["jobwire_scan"]
    out: dict[str, Any] = {"ops_per_size": ops, "sizes": {}}
    try:
        sample = job_doc(0)
        from bson import encode

        out["doc_bytes"] = len(encode(sample))
        for n in sizes:
            coll = db[f"jobs_{n}"]
            coll.drop()
            t = time.perf_counter()
            for start in range(0, n, 500):
                coll.insert_many([job_doc(i) for i in range(start, min(n, start + 500))])
            fill_s = time.perf_counter() - t
            step = max(1, n // ops)
            ids = [f"scan-{(i * step) % n:06d}" for i in range(ops)]

            def update(i: int, coll: Any = coll, ids: list[str] = ids) -> None:
                coll.update_one(
                    {"_id": ids[i]},
                    {"$set": {"seq": RING + 1 + i, "ring.0.s": RING + 1 + i}},
                )

            def find_one(i: int, coll: Any = coll, ids: list[str] = ids) -> None:
                coll.find_one({"_id": ids[i]})

            def find_in(i: int, coll: Any = coll, n: int = n) -> None:
                batch = [f"scan-{(i * 16 + k) % n:06d}" for k in range(16)]
                list(coll.find({"_id": {"$in": batch}}))

            row = {
                "fill_s": round(fill_s, 2),
                "update_one_ms": timed(update, ops),
                "find_one_ms": timed(find_one, max(1, ops // 3)),
                "find_in_16_ms": timed(find_in, 3 if n <= 1000 else 1),
            }
            out["sizes"][str(n)] = row
            print(f"[ferretdb_scan] {n} docs: {row}", file=sys.stderr, flush=True)
            coll.drop()
    finally:
        client.drop_database("jobwire_scan")
        client.close()
    return out


def table(result: dict[str, Any]) -> str:
    lines = [
        "| docs | update_one by _id, ms | find_one by _id, ms | find $in 16 ids, ms |",
        "|---:|---:|---:|---:|",
    ]
    for n, row in result["sizes"].items():
        lines.append(
            f"| {int(n):,} | {row['update_one_ms']['median']:g} | {row['find_one_ms']['median']:g}"
            f" | {row['find_in_16_ms']['median']:g} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.ferretdb_scan", description=__doc__)
    p.add_argument("uri")
    p.add_argument("--sizes", default="100,1000,5000")
    p.add_argument("--ops", type=int, default=30)
    p.add_argument("--out", default="")
    args = p.parse_args()
    result = measure(args.uri, [int(s) for s in args.sizes.split(",")], args.ops)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=2)
    print(table(result))


if __name__ == "__main__":
    main()
