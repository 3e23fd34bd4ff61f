"""Peak memory of validating a manifest whose training source has 1,000,000 Parquet rows.

    python -m bench.validate_memory [--rows 1000000] [--workdir bench/out/validate]

Writes a DataComp-style Parquet file (uid, filepath, text; row groups of 50,000) and a
manifest next to a tiny model, then runs `ecif validate` in a fresh process and reports its
peak resident memory (ru_maxrss of the child) and wall time. No image is opened in this pass
(validate looks up whether the images of 200 rows exist; the model is built on the meta device).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq


def write_rows(path: Path, rows: int, group: int = 50_000) -> None:
    writer = None
    for start in range(0, rows, group):
        ids = range(start, min(rows, start + group))
        table = pa.table({"uid": [f"{i:012x}" for i in ids], "filepath": [f"images/{i % 1000}.png" for i in ids],
                          "text": [f"a photo of the digit {i % 10} number {i}" for i in ids]})
        writer = writer or pq.ParquetWriter(path, table.schema)
        writer.write_table(table)
    writer.close()


# VmHWM (peak RSS of this process image) rather than ru_maxrss: the latter survives fork and
# exec, so a child of a large parent would report the parent's size.
PEAK_RSS = ("import runpy, sys\n"
            "sys.argv = ['ecif', 'validate', sys.argv[1]]\n"
            "try:\n    runpy.run_module('services.cli', run_name='__main__')\n"
            "finally:\n    hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]\n"
            "    print('peak_rss_kib', hwm, file=sys.stderr)\n")


def measure(rows: int, workdir: Path) -> dict:
    """Write the source and manifest, validate in a fresh process, return rows, peak RSS, time."""
    workdir.mkdir(parents=True, exist_ok=True)
    write_rows(workdir / "train.parquet", rows)
    from ecif_core.demo import tiny_model_config

    import torch
    from PIL import Image

    from ecif_core.models.factory import load_model

    # validate runs the service's submit checks: the checkpoint's header must fit the config, and
    # the images of a sample of rows must exist (the rows name 1000 files)
    torch.save(load_model(config=tiny_model_config()).model.state_dict(), workdir / "model.pt")
    (workdir / "cfg.json").write_text(json.dumps(tiny_model_config()))
    (workdir / "images").mkdir(exist_ok=True)
    for i in range(1000):
        Image.new("RGB", (4, 4)).save(workdir / "images" / f"{i}.png")
    (workdir / "manifest.json").write_text(json.dumps({"model": {"config": "cfg.json", "checkpoint": "model.pt"},
                                                       "train": "train.parquet"}))
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", PEAK_RSS, str(workdir / "manifest.json")],
                            capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-3000:])
    peak_kib = int(result.stderr.rsplit("peak_rss_kib", 1)[1].split()[0])
    summary = json.loads(result.stdout)["train"]
    return {"rows": summary["rows"], "usable": summary["usable"], "peak_rss_mib": round(peak_kib / 1024, 1),
            "seconds": round(seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--workdir", default="bench/out/validate")
    args = parser.parse_args()
    print(json.dumps(measure(args.rows, Path(args.workdir).resolve()), indent=1))


if __name__ == "__main__":
    main()
