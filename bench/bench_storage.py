"""Throughput of tapio.storage's durable queue and checkpoints, in one run.

Run: ``.venv/bin/python bench/bench_storage.py [--seconds S] [--dir DIR]``.
For each ``synchronous`` mode, on a fresh file in DIR (default: a temporary
directory, so put it on the disk you care about): single ``put`` of 1 KiB
items, ``put_many`` of 100 such items, ``peek(100)`` + ``ack`` of them,
checkpoint ``put``, and ``aput`` under trio (the worker-thread hop included).
Every write is a committed transaction. Prints one JSON line of rates
(items or calls per second).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sqlite3
import tempfile
import time
from pathlib import Path
from typing import Callable

import trio

from tapio.storage import Storage

ITEM = os.urandom(1024)
BATCH = 100


def rate(fn: Callable[[], int], seconds: float) -> float:
    """Items per second of repeated ``fn()`` (which returns items done) for about ``seconds``."""
    done, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        done += fn()
    return done / elapsed


def bench_mode(directory: Path, synchronous: str, seconds: float) -> dict[str, float]:
    out: dict[str, float] = {}
    with Storage.open(directory / f"bench-{synchronous}.db", synchronous=synchronous) as s:  # type: ignore[arg-type]
        q, cp = s.queue("bench"), s.checkpoints("bench")
        out["put_per_s"] = rate(lambda: (q.put(ITEM), 1)[1], seconds)
        out["put_many_100_items_per_s"] = rate(lambda: len(q.put_many([ITEM] * BATCH)), seconds)

        def drain() -> int:
            items = q.peek(BATCH)
            if not items:
                q.put_many([ITEM] * BATCH)  # keep going if the puts above were few
                return 0
            return q.ack([i for i, _ in items])

        out["peek_ack_100_items_per_s"] = rate(drain, seconds)
        n = iter(range(10**9))
        out["checkpoint_put_per_s"] = rate(lambda: (cp.put("pos", b"%d" % next(n)), 1)[1], seconds)
        out["checkpoint_get_per_s"] = rate(lambda: (cp.get("pos"), 1)[1], seconds / 2)

        async def aput_rate() -> float:
            done, start = 0, time.perf_counter()
            while (elapsed := time.perf_counter() - start) < seconds:
                await q.aput(ITEM)
                done += 1
            return done / elapsed

        out["aput_per_s"] = trio.run(aput_rate)
    return {f"{synchronous}_{k}": round(v) for k, v in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=0.5, help="time per measurement")
    parser.add_argument("--dir", type=Path, default=None, help="where to put the files (default: a temp dir)")
    args = parser.parse_args()
    result: dict[str, object] = {
        "bench": "storage",
        "item_bytes": len(ITEM),
        "sqlite": sqlite3.sqlite_version,
        "python": platform.python_version(),
    }
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        for mode in ("full", "normal"):
            result.update(bench_mode(Path(d), mode, args.seconds))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
