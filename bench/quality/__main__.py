"""`python -m bench.quality`: every experiment of the quality benchmark, then results.json, RESULTS.md, plots.

    python -m bench.quality                      # full run (about 19 min on 2 cores, 2 worker processes)
    python -m bench.quality --quick              # reduced version of each experiment (about 20 s)
    python -m bench.quality --resume             # reuse finished detection runs of the same settings
    python -m bench.quality --regime all         # the fine-tuning benchmark instead (bench/quality/finetune)

Independent runs go to `--workers` processes with `--threads` torch threads each (see pipeline).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from . import plots, report  # noqa: E402
from .pipeline import run_all, say  # noqa: E402
from .settings import QualitySettings, quick  # noqa: E402


LIST_OR_NONE = ("neg_variant_fractions",)
HELP = {"theta": "audit theta patterns (default: the two projections; give the flag alone for the audit's default)",
        "projection": "k_in = k_out of the audit's projection, or none (exact gradients)",
        "neg_variant_fractions": "fractions at which the first-order and published Neg audits run (default: all)",
        "fidelity_projections": "projection sizes of the fidelity audits (none = exact gradients)",
        "fidelity_partners": "also run the exact-Neg fidelity audit with options.partners = m, for each m"}


def parse_args(argv: list[str] | None = None) -> tuple[QualitySettings, argparse.Namespace]:
    parser = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="reduced sizes (the test suite's end-to-end run)")
    parser.add_argument("--out", default="bench/out/quality")
    parser.add_argument("--workers", type=int, default=None, help="processes (default 2, --quick 1)")
    parser.add_argument("--resume", action="store_true", help="reuse detection runs already in OUT/runs")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1)")
    defaults = QualitySettings()
    for name, value in defaults.to_json().items():
        flag, help_ = "--" + name.replace("_", "-"), HELP.get(name)
        if isinstance(value, bool):
            parser.add_argument(flag, type=lambda s: s.lower() in ("1", "true", "yes"), default=argparse.SUPPRESS,
                                metavar="BOOL", help=help_)
        elif isinstance(value, list) or name in LIST_OR_NONE:
            parser.add_argument(flag, type=_item_type(name), nargs="*", default=argparse.SUPPRESS, help=help_)
        else:
            parser.add_argument(flag, type=_item_type(name), default=argparse.SUPPRESS, help=help_)
    args = parser.parse_args(argv)
    settings = quick() if args.quick else QualitySettings()
    for name in defaults.to_json():
        if hasattr(args, name):  # given on the command line (None allowed: --projection none)
            value = getattr(args, name)
            setattr(settings, name, None if name == "theta" and not value else value)
    if args.workers is None:
        args.workers = 1 if args.quick else 2
    return settings, args


def _item_type(name: str) -> Callable[[str], Any]:
    if name in ("projection", "fidelity_projections"):
        return lambda s: None if s.lower() in ("none", "null") else int(s)
    if name in ("corruptions", "theta", "removal_methods", "removal_corruption"):
        return str
    if name in ("fractions", "neg_variant_fractions", "exact_gradient_fractions", "removal_percents", "removal_fraction", "lr", "weight_decay",
                "fidelity_subset_fraction"):
        return float
    return int


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a == "--regime" or a.startswith("--regime=") for a in argv):  # the fine-tuning benchmark
        from .finetune.runner import main as finetune_main

        finetune_main(argv)
        return
    settings, args = parse_args(argv)
    out = Path(args.out).resolve()  # manifests hold absolute paths (relative ones resolve against the manifest)
    out.mkdir(parents=True, exist_ok=True)
    results = run_all(settings, out, args.workers, args.resume, args.threads)
    results["command"] = " ".join(["python -m bench.quality", *argv])

    results["plots"] = plots.make_all(results, out)
    results["targets"] = report.targets(results)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "RESULTS.md").write_text(report.markdown(results))
    say(f"done in {results['stage_seconds']['total']:.0f}s: {out / 'RESULTS.md'}, {out / 'results.json'}, "
        f"{len(results['plots'])} plots")


if __name__ == "__main__":
    main()
