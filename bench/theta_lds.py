"""LDS of the audit for each theta, against refits of that same theta (issue 22, item 1; bench/RESULTS.md,
"Theta: LDS").

    OMP_NUM_THREADS=1 python -m bench.theta_lds --theta last-block [--subsets 20] [--l2 1000] [--seed 0]
        [--out bench/out/partners]

bench.quality's fidelity oracle generalised to any theta, on a digits run of bench.theta_quality
(`--seed`, default 0; 20% shuffled, 600 pairs, B = 32). With every weight outside theta frozen (the
trunk below theta run once and cached), theta is fitted on the training objective plus
(l2/2)|theta - theta_trained|^2 (L-BFGS, strong Wolfe, float64) from the trained theta: theta_hat.
The audit of that model (the product's default options with this theta, weight decay = l2)
predicts, for each of `--subsets` random 10% subsets (drawn as bench.quality's fidelity draws them,
from the sorted ids: not the same subsets as its run, the same ones for every theta here), the
change of the mean validation loss as the sum of the subset's `influence`; the actual change refits
theta from theta_hat without the subset (its pairs dropped from their fixed batches). LDS =
Spearman(predicted, actual). The noise floor refits the full objective from a perturbed theta_hat.
l2 is the same for every theta, so that the oracles differ in theta alone; 100 (bench.quality's
choice for the projections) left the last two blocks unconverged after 300 iterations, so 1000.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.theta_quality import THETAS, _run  # noqa: E402
from ecif_core.data.batching import hash_seed, training_batches  # noqa: E402
from ecif_core.data.manifest import SIDECAR_SUFFIX  # noqa: E402
from ecif_core.edit.caches import trunk_outputs  # noqa: E402
from ecif_core.influence.gradients import embed, temperature_scale  # noqa: E402
from ecif_core.influence.losses import batch_loss, pair_logits  # noqa: E402
from ecif_core.metrics import spearman  # noqa: E402
from ecif_core.models.factory import load_model, restrict_grad_to, select_theta  # noqa: E402
from ecif_core.models.runtime import flush_denormals  # noqa: E402


@dataclass
class Oracle:
    """A pair file's objective (sum of batch losses) as a function of theta alone, the trunk cached."""

    model: torch.nn.Module
    params: list[torch.nn.Parameter]
    batches: list                    # bench.quality.tensors.Batch (ids, captions, images, tokens)
    trunk: object
    outputs: list | None

    @classmethod
    def build(cls, model: torch.nn.Module, params: list[torch.nn.Parameter], batches: list) -> "Oracle":
        trunk, outputs = trunk_outputs(model, params, batches)
        return cls(model, params, batches, trunk, outputs)

    def _embeddings(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        b = self.batches[index]
        if self.outputs is None:
            return embed(self.model, b.images, b.tokens)
        with self.trunk.replay_outputs(self.outputs[index]):
            return embed(self.model, b.images, b.tokens)

    def loss(self, drop: frozenset[str] = frozenset()) -> torch.Tensor:
        """Sum over batches of the loss of the pairs not in `drop` (a batch left with fewer than two
        pairs adds nothing, as in training)."""
        total = torch.zeros((), dtype=torch.float64)
        scale = temperature_scale(self.model)
        for index, b in enumerate(self.batches):
            keep = torch.tensor([i not in drop for i in b.ids])
            if int(keep.sum()) < 2:
                continue
            u, v = self._embeddings(index)
            total = total + batch_loss(pair_logits(u[keep], v[keep], scale))
        return total

    def mean_loss(self) -> float:
        with torch.no_grad(), flush_denormals():
            return float(self.loss()) / sum(len(b.ids) for b in self.batches)


def fit(oracle: Oracle, start: list[torch.Tensor], anchor: list[torch.Tensor], l2: float,
        drop: frozenset[str] = frozenset(), max_iter: int = 300, max_grad: float = 1e-4) -> dict:
    """L-BFGS on oracle.loss(drop) + (l2/2)|theta - anchor|^2 from `start`; theta is left at the result."""
    with torch.no_grad():
        for p, s in zip(oracle.params, start):
            p.copy_(s)
    optimizer = torch.optim.LBFGS(oracle.params, lr=1.0, max_iter=max_iter, tolerance_grad=max_grad,
                                  tolerance_change=1e-14, history_size=30, line_search_fn="strong_wolfe")

    def objective() -> torch.Tensor:
        return oracle.loss(drop) + 0.5 * l2 * sum(((p - a) ** 2).sum() for p, a in zip(oracle.params, anchor))

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        value = objective()
        value.backward()
        return value

    started = time.perf_counter()
    with flush_denormals():
        optimizer.step(closure)
        value = objective()
        grads = torch.autograd.grad(value, oracle.params)
    return {"objective": float(value.detach()), "max_grad": max(float(g.abs().max()) for g in grads),
            "iterations": optimizer.state[optimizer._params[0]].get("n_iter", 0),
            "seconds": time.perf_counter() - started}


def subsets_of(ids: list[str], batch_size: int, run_seed: int, count: int, fraction: float = 0.1,
               fidelity_seed: int = 0) -> list[frozenset[str]]:
    """`count` seeded random subsets (bench.quality fidelity's generator), with the pairs each leaves alone."""
    rng = np.random.default_rng(hash_seed(fidelity_seed, 11))
    size = int(round(fraction * len(ids)))
    out = []
    for _ in range(count):
        drop = {ids[i] for i in rng.choice(len(ids), size=size, replace=False)}
        batches, _alone = training_batches(ids, batch_size, run_seed, drop=drop)
        kept = {i for b in batches for i in b}
        out.append(frozenset(i for i in ids if i not in kept))
    return out


def lds_of_theta(run, name: str, subsets: int, l2: float, say=print) -> dict:
    from bench.quality.runs import audit
    from bench.quality.settings import QualitySettings
    from bench.quality.tensors import load_batches

    settings = QualitySettings()
    loaded = load_model(config=run.config, checkpoint=run.checkpoint)
    model = loaded.model.double().eval()
    patterns = THETAS[name](model)
    theta = select_theta(model, patterns)
    restrict_grad_to(model, theta)
    params = [p for _, p in theta]

    def batches(path, training):
        return [type(b)(b.ids, b.captions, b.images.double(), b.tokens)
                for b in load_batches(path, loaded, settings.batch_size, run.seed, training=training)]

    train, val = (Oracle.build(model, params, batches(run.data.train, True)),
                  Oracle.build(model, params, batches(run.data.validation, False)))
    anchor = [p.detach().clone() for p in params]
    trained_val = val.mean_loss()
    base = fit(train, anchor, anchor, l2)
    theta_hat = [p.detach().clone() for p in params]
    base_val = val.mean_loss()
    say(f"{name}: base fit {base['iterations']} iterations, max |grad| {base['max_grad']:.1e}, {base['seconds']:.0f} s, "
        f"validation loss {trained_val:.4f} -> {base_val:.4f}")
    folder = run.root / f"theta-{name}-l2-{l2:g}"
    folder.mkdir(parents=True, exist_ok=True)
    checkpoint = folder / "model.pt"
    torch.save({k: v.float() for k, v in model.state_dict().items()}, checkpoint)
    sidecar = {**run.sidecar, "weight_decay": l2, "checkpoints": [],
               "note": f"bench.theta_lds oracle: theta {name} refitted with the rest frozen, L2 towards the trained one"}
    Path(str(checkpoint) + SIDECAR_SUFFIX).write_text(json.dumps(sidecar, indent=1))
    audited = audit(run, f"theta-{name}-l2-{l2:g}-oracle", {"theta": patterns}, checkpoint=checkpoint)
    influence = {i: float(row["influence"]) for i, row in audited.ranked().items()}
    ids = sorted(i for b in train.batches for i in b.ids)
    predicted, actual, refits = [], [], []
    for k, drop in enumerate(subsets_of(ids, settings.batch_size, run.seed, subsets)):
        refit = fit(train, theta_hat, anchor, l2, drop=drop)
        actual.append(val.mean_loss() - base_val)
        predicted.append(sum(influence[i] for i in drop if i in influence))
        refits.append(refit)
        say(f"{name}: subset {k + 1}: actual {actual[-1]:+.5f} predicted {predicted[-1]:+.5f} "
            f"({refit['iterations']} iterations, max |grad| {refit['max_grad']:.1e}, {refit['seconds']:.0f} s)")
    generator = torch.Generator().manual_seed(5)
    perturbed = [w + 1e-3 * w.std() * torch.randn(w.shape, generator=generator, dtype=w.dtype) for w in theta_hat]
    again = fit(train, perturbed, anchor, l2)
    floor = abs(val.mean_loss() - base_val)
    result = {"theta": name, "patterns": patterns, "l2": l2, "trained_val_loss": trained_val, "base_fit": base,
              "base_val_loss": base_val, "lds": spearman(predicted, actual), "subsets": len(actual),
              "predicted": predicted, "actual": actual, "actual_std": float(np.std(actual)),
              "noise_floor": floor, "noise_refit": again,
              "refit_iterations_max": max(r["iterations"] for r in refits),
              "refit_max_grad_max": max(r["max_grad"] for r in refits),
              "refit_seconds_mean": float(np.mean([r["seconds"] for r in refits])), "audit_seconds": audited.seconds}
    say(f"{name}: LDS {result['lds']:.3f} over {len(actual)} subsets (actual sd {result['actual_std']:.4f}, "
        f"noise floor {floor:.1e})")
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--theta", choices=list(THETAS), required=True)
    parser.add_argument("--subsets", type=int, default=20)
    parser.add_argument("--l2", type=float, default=1000.0)
    parser.add_argument("--seed", type=int, default=0, help="which bench.theta_quality run (default 0)")
    parser.add_argument("--out", default="bench/out/partners")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.out).resolve()
    result = lds_of_theta(_run(out, args.seed), args.theta, args.subsets, args.l2)
    result["command"] = "python -m bench.theta_lds " + " ".join(argv or [])
    suffix = "" if args.seed == 0 else f"-s{args.seed}"
    (out / f"theta-lds-{args.theta}-l2-{args.l2:g}{suffix}.json").write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
