"""The `ecif` command line. Each verb parses arguments and calls one ecif_core entry point."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # ecif never downloads; avoid the hub's retry loop


def _progress_bar():
    """A tqdm bar per stage: stage name, shards done / total, rate and ETA."""
    from tqdm import tqdm

    bars: dict[str, tqdm] = {}

    def report(stage: str, done: int, total: int) -> None:
        bar = bars.get(stage)
        if bar is None:
            bar = bars[stage] = tqdm(total=total, desc=f"{stage:<10}", unit="shard", file=sys.stderr, leave=True)
        bar.update(done - bar.n)
        if done >= total:
            bar.close()

    return report


def cmd_train(args: argparse.Namespace) -> int:
    from ecif_core.train import TrainConfig, train

    exclude = Path(args.exclude).read_text().split() if args.exclude else ()
    result = train(args.data, args.model_config, args.out,
                   TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                               weight_decay=args.weight_decay, seed=args.seed, exclude=exclude,
                               checkpoints=args.checkpoints),
                   init=args.init,
                   progress=lambda e, n, loss: print(f"epoch {e}/{n} loss/pair {loss:.4f}", file=sys.stderr))
    print(f"wrote {result.checkpoint} and {result.sidecar}")
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    from ecif_core.audit import run_audit

    ranked = run_audit(args.manifest, args.out, progress=None if args.quiet else _progress_bar())
    print(f"wrote {ranked}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from ecif_core.demo import DemoSettings, run_demo

    settings = DemoSettings(seed=args.seed, epochs=args.epochs, n_train=args.n_train)
    result = run_demo(args.out, settings, progress=_progress_bar())
    print(f"\nranked pairs: {result.ranked_csv}")
    print(f"{'method':<34}{'AUROC':>8}{'AP':>8}{'P@50':>8}")
    flags = result.flags
    for method, m in result.report.items():
        print(f"{method:<34}{m['auroc']:>8.3f}{m['ap']:>8.3f}{m['p@50']:>8.3f}")
    print(f"suspected=true: {flags['flagged']:.0f} pairs, precision {flags['precision']:.2f}, "
          f"recall {flags['recall']:.2f}")
    print(f"train {result.train_seconds:.1f}s ({result.epoch_seconds:.2f}s/epoch), audit {result.audit_seconds:.1f}s "
          f"= {result.audit_seconds / result.epoch_seconds:.1f} epochs")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ecif", description="Find misaligned image-text pairs with ECIF.")
    verbs = parser.add_subparsers(dest="verb", required=True)

    p = verbs.add_parser("train", help="deterministic fine-tuning on the ECIF objective")
    p.add_argument("--data", required=True, help="pair file (JSONL or CSV: id,image,caption)")
    p.add_argument("--model-config", required=True, help="open_clip model config JSON")
    p.add_argument("--init", help="checkpoint to start from")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.0, help="delta: L2 coefficient of the objective")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--exclude", help="file of ids to leave out (whitespace separated)")
    p.add_argument("--checkpoints", type=int, default=0, help="also save N intermediate checkpoints")
    p.add_argument("--out", required=True)
    p.set_defaults(run=cmd_train)

    p = verbs.add_parser("audit", help="run a whole audit in this process (no servers)")
    p.add_argument("manifest")
    p.add_argument("--out", required=True, help="audit folder (ranked.csv, rejected.csv, store.zarr)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(run=cmd_audit)

    p = verbs.add_parser("demo", help="digits with 20%% misaligned captions: train, audit, score")
    p.add_argument("--out", default="demo_out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--n-train", type=int, default=None, help="fewer training pairs (faster)")
    p.set_defaults(run=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    from ecif_core.errors import EcifError

    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except EcifError as exc:
        print(f"ecif: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
