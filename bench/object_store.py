"""The demo audit with its folder on a local S3 server against on the local disk.

    python -m bench.object_store [--workdir bench/out/object_store] [--repeats 3]

Builds the demo data (digits, 1200 pairs, 20% shuffled captions) and trains the demo's tiny
CLIP once in WORKDIR, starts a moto S3 server on 127.0.0.1 (its own process, as the tests do),
then runs the embedded audit (`ecif audit`, in-process) on the same manifest with `--out` a
local folder and `--out s3://bucket/audit`, alternating, REPEATS times each. Prints the wall
times, the S3 / disk ratio of their medians, the bytes the audit wrote per pair (objects
under the audit's prefix; the local folder without its SQLite file) and the HTTP requests
the S3 run made per pair (the server's request log). The inputs stay on the local disk in
both runs, so the figure is the cost of the store alone. One torch thread; the S3 server
shares the machine's cores with the audit.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from bench.service import manifest, prepare_workdir
from tests.s3 import S3Server, object_bytes


def _local_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and p.name != "ecif.db")


def _requests(log: Path) -> int:
    """Lines of the server's access log ("GET /bucket/key HTTP/1.1" 200 -)."""
    return sum(1 for line in log.read_text(errors="replace").splitlines() if '" 20' in line or '" 40' in line)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("bench/out/object_store"))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(1)
    from services.embedded import run_audit

    workdir = prepare_workdir(args.workdir.resolve())
    manifest_path = manifest(workdir, "manifest-store.json", {})
    pairs = sum(1 for _ in (workdir / "data" / "train.jsonl").open())
    server, log = S3Server(), Path(tempfile.mkdtemp(prefix="ecif-s3-bench-")) / "moto.log"
    server.start(log)
    os.environ.update(server.env())
    times: dict[str, list[float]] = {"disk": [], "s3": []}
    written: dict[str, int] = {}
    requests: list[int] = []
    try:
        bucket = server.new_bucket("bench")
        for repeat in range(args.repeats):
            for store in ("disk", "s3") if repeat % 2 == 0 else ("s3", "disk"):
                out = f"s3://{bucket}/audit-{repeat}" if store == "s3" else str(workdir / f"audit-{repeat}")
                if store == "disk":
                    shutil.rmtree(out, ignore_errors=True)
                before = _requests(log)
                started = time.perf_counter()
                run_audit(manifest_path, out)
                times[store].append(time.perf_counter() - started)
                if store == "s3":
                    requests.append(_requests(log) - before)
                    written["s3"] = object_bytes(out)
                else:
                    written["disk"] = _local_bytes(Path(out))
                print(f"run {repeat} {store}: {times[store][-1]:.2f} s", flush=True)
    finally:
        server.stop()
    disk, s3 = statistics.median(times["disk"]), statistics.median(times["s3"])
    result = {"pairs": pairs, "seconds": times, "median_disk_s": disk, "median_s3_s": s3, "ratio_s3_over_disk": s3 / disk,
              "bytes_per_pair": {k: v / pairs for k, v in written.items()},
              "s3_requests_per_pair": statistics.median(requests) / pairs}
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
