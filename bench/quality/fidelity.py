"""Experiment 3: fidelity (linear datamodeling score) of the predicted change of the validation loss.

Oracle (feature_cache): towers frozen at a trained run's model, theta = the two projections fitted
to convergence on the training objective (model theta_hat, audited with the same theta), then
refitted from theta_hat without each of `fidelity_subsets` random subsets of
`fidelity_subset_fraction` of the training pairs (the same seeded partition, removed pairs dropped
from their batches). Actual = change of the mean validation loss per pair; predicted = the sum of
per-pair IS over the subset, or the exact group form (Pos(E) + Neg(E) per batch, through
losses.group_terms; docs/METHOD.md, "A pair's two roles"). LDS = Spearman(predicted, actual) per method.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ecif_core.stages import collect_scores, inverse_for, load_plan, load_slots, open_store
from ecif_core.data.batching import hash_seed, training_batches
from ecif_core.influence.gradients import embed, temperature_scale
from ecif_core.influence.losses import batch_loss, pair_logits
from ecif_core.data.manifest import SIDECAR_SUFFIX, Manifest
from ecif_core.metrics import spearman
from ecif_core.models.factory import load_model, select_theta
from ecif_core.influence.projection import ProjectionSpec, Projector
from ecif_core.models.runtime import flush_denormals

from .feature_cache import PROJECTIONS, FeatureObjective, Fit, choose_l2, fit, projection_weights, tower_features
from .runs import Run, audit, existing_run
from .settings import QualitySettings
from .tensors import Batch, batch_ids, load_batches

SUM_METHODS = {"ecif_is_sum": ("exact", "influence"), "ecif_is_first_order_sum": ("first_order", "influence"),
               "ecif_is_paper_sum": ("paper", "influence"), "pos_only_if_sum": ("exact", "influence_pos")}
LABELS = {"ecif_is_sum": "ECIF IS, exact Neg (sum over the subset)",
          "ecif_is_group": "ECIF IS, exact Neg (group form)",
          "ecif_is_first_order_sum": "IS, first-order Neg (sum)", "ecif_is_paper_sum": "IS, published Neg (sum)",
          "pos_only_if_sum": "Pos-only IF (sum)"}


def fidelity(settings: QualitySettings, runs_dir: Path, say: Callable[[str], None] = print) -> dict:
    run = existing_run(runs_dir, settings.removal_corruption, settings.removal_fraction, settings.fidelity_seed)
    timings: dict[str, float] = {}
    started = time.perf_counter()
    loaded = load_model(config=run.config, checkpoint=run.checkpoint)
    train = load_batches(run.data.train, loaded, settings.batch_size, run.seed, training=True)
    val = load_batches(run.data.validation, loaded, settings.batch_size, run.seed, training=False)
    ids, scale = batch_ids(train), float(temperature_scale(loaded.model))
    objective, val_objective = _objective(loaded.model, train, scale), _objective(loaded.model, val, scale)
    checks = {"objective_vs_forward": _objective_check(loaded.model, train, objective)}
    timings["features"] = time.perf_counter() - started

    started = time.perf_counter()
    anchor = projection_weights(loaded.model)
    l2, base, tries = choose_l2(objective, anchor)
    checkpoint = _write_checkpoint(run, loaded.model, base.weights, l2)
    base_val = float(val_objective(*base.weights)) / val_objective.pairs
    timings["fit_base"] = time.perf_counter() - started
    checks["base_fit"] = {"l2": l2, "max_grad_per_l2_tried": tries, "loss": base.loss, "max_grad": base.max_grad,
                          "iterations": base.iterations, "loss_at_trained_theta": checks["objective_vs_forward"]["cached"]}
    say(f"fidelity: l2 {l2:g}, base fit {base.iterations} L-BFGS iterations, max |grad| {base.max_grad:.1e}, "
        f"cached vs real forward {checks['objective_vs_forward']['relative_difference']:.1e}")
    started = time.perf_counter()
    subsets, actual, floor = _retrain_subsets(settings, run, ids, objective, val_objective, base, anchor, l2, base_val)
    timings["retrain_subsets"] = time.perf_counter() - started
    checks["noise_floor"] = floor
    results = {"actual": actual.tolist(), "base_val_loss": base_val, "projections": {}}
    for k in settings.fidelity_projections:
        started = time.perf_counter()
        results["projections"][str(k)] = _predictions(run, checkpoint, k, ids, subsets, objective, base.weights,
                                                      actual, base_val, loaded.model, settings.fidelity_partners)
        timings[f"audits_k{k}"] = time.perf_counter() - started
        lds = {m: v["spearman"] for m, v in results["projections"][str(k)]["methods"].items()}
        say(f"fidelity k={k}: " + ", ".join(f"{m} {v:.3f}" for m, v in lds.items()))
    results.update(checks=checks, timings=timings, n_pairs=len(ids), subset_size=len(subsets[0]))
    return results


def _objective(model: torch.nn.Module, batches: list[Batch], scale: float) -> FeatureObjective:
    image, text = tower_features(model, batches)
    rows, start = [], 0
    for b in batches:
        rows.append(list(range(start, start + len(b.ids))))
        start += len(b.ids)
    return FeatureObjective(image, text, rows, scale)


@torch.no_grad()
def _objective_check(model: torch.nn.Module, batches: list[Batch], objective: FeatureObjective) -> dict:
    """The cached objective at the trained theta against batch_loss on the real model forward."""
    with flush_denormals():
        real = sum(float(batch_loss(pair_logits(*embed(model, b.images, b.tokens), temperature_scale(model))))
                   for b in batches)
    cached = float(objective(*projection_weights(model)))
    return {"real_forward": real, "cached": cached, "relative_difference": abs(cached - real) / abs(real)}


def _write_checkpoint(run: Run, model: torch.nn.Module, w_hat: tuple[torch.Tensor, torch.Tensor], l2: float) -> Path:
    """The run's model with theta_hat; its sidecar is the run's with weight decay = the oracle's l2."""
    state = model.state_dict()
    state["visual.proj"], state["text_projection"] = w_hat[0].float(), w_hat[1].float()
    path = run.root / "fidelity" / "model.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    sidecar = {**run.sidecar, "weight_decay": l2, "checkpoints": [],
               "note": "bench.quality fidelity oracle: projections refitted with towers frozen, L2 towards the trained ones"}
    Path(str(path) + SIDECAR_SUFFIX).write_text(json.dumps(sidecar, indent=1))
    return path


def _retrain_subsets(settings: QualitySettings, run: Run, ids: list[str], objective: FeatureObjective,
                     val_objective: FeatureObjective, base: Fit, anchor: tuple, l2: float, base_val: float):
    """(removed ids per subset, actual change of the validation loss, convergence noise floor)."""
    rng = np.random.default_rng(hash_seed(settings.fidelity_seed, 11))
    row_of = {i: r for r, i in enumerate(ids)}
    size = int(round(settings.fidelity_subset_fraction * len(ids)))
    subsets, actual, iterations = [], [], []
    for _ in range(settings.fidelity_subsets):
        drop = {ids[i] for i in rng.choice(len(ids), size=size, replace=False)}
        batches, _alone = training_batches(ids, settings.batch_size, run.seed, drop=drop)
        kept = {i for b in batches for i in b}
        subsets.append([i for i in ids if i not in kept])  # the subset plus any pair left alone in its batch
        refit = fit(objective.without([[row_of[i] for i in b] for b in batches]), base.weights, anchor, l2)
        actual.append(float(val_objective(*refit.weights)) / val_objective.pairs - base_val)
        iterations.append(refit.iterations)
    generator = torch.Generator().manual_seed(5)
    perturbed = tuple(w + 1e-3 * w.std() * torch.randn(w.shape, generator=generator, dtype=w.dtype) for w in base.weights)
    again = fit(objective, perturbed, anchor, l2)
    floor = abs(float(val_objective(*again.weights)) / val_objective.pairs - base_val)
    return subsets, np.array(actual), {"refit_from_perturbed_abs_change": floor, "actual_std": float(np.std(actual)),
                                       "refit_iterations_max": max(iterations)}


def _predictions(run: Run, checkpoint: Path, k: int | None, ids: list[str],
                 subsets: list[list[str]], objective: FeatureObjective, w_hat: tuple, actual: np.ndarray,
                 base_val: float, model: torch.nn.Module, partners: list[int] = ()) -> dict:
    """Audits of the oracle's model at projection k (three Neg forms, and the exact one with each
    top-m partners approximation); predicted changes and LDS."""
    columns, folders, seconds = {}, {}, {}
    variants = [(nt, nt, None) for nt in ("exact", "first_order", "paper")]
    variants += [(f"partners{m}", "exact", m) for m in partners]
    for key, neg_term, m in variants:
        options = {"theta": list(PROJECTIONS), "neg_term": neg_term,
                   "projection": None if k is None else {"k_in": k, "k_out": k}}
        if m is not None:
            options["partners"] = m
        result = audit(run, f"fidelity-k{k}-{key}", options, checkpoint=checkpoint)
        pairs, cols = collect_scores(result.folder)
        order = {p.id: r for r, p in enumerate(pairs)}
        columns[key] = {c: np.asarray(cols[c], dtype=np.float64)[[order[i] for i in ids]]
                        for c in ("influence", "influence_pos")}
        folders[key], seconds[key] = result.folder, result.seconds
    row_of = {i: r for r, i in enumerate(ids)}
    methods = dict(SUM_METHODS) | {f"ecif_is_partners{m}_sum": (f"partners{m}", "influence") for m in partners}
    predicted = {m: [float(columns[nt][c][[row_of[i] for i in s]].sum()) for s in subsets]
                 for m, (nt, c) in methods.items()}
    group = _GroupForm(folders["exact"], model, objective, w_hat, ids)
    predicted["ecif_is_group"] = [group.influence(s) for s in subsets]
    return {"methods": lds(predicted, actual), "audit_seconds": seconds, "checks": group.checks(base_val)}


def lds(predicted: dict[str, list[float]], actual: np.ndarray) -> dict[str, dict]:
    """Per method: its label, the linear datamodeling score Spearman(predicted, actual) and the predictions."""
    return {m: {"label": LABELS.get(m, m), "spearman": spearman(v, actual), "predicted": list(v)}
            for m, v in predicted.items()}


class _GroupForm:
    """IS(E) = grad L'^T H^-1 (g_pos(E) + g_neg(E)) with the audit's projection, curvature, damping and
    validation gradient; g(E) from the cached features (the exact group terms per batch)."""

    def __init__(self, audit_dir: Path, model: torch.nn.Module, objective: FeatureObjective, w_hat: tuple,
                 ids: list[str]):
        plan, store = load_plan(audit_dir), open_store(audit_dir)
        self.direction = inverse_for(plan, store).apply(torch.from_numpy(store.validation_gradient()))
        spec = _projection_spec(plan)
        theta = select_theta(model, list(PROJECTIONS))
        if sorted(name for name, _ in theta) != sorted(PROJECTIONS):
            raise ValueError(f"theta must be the two projections, got {[n for n, _ in theta]}")
        self.names = [name for name, _ in theta]  # the audit's order of blocks
        self.projector = Projector.for_theta(theta, spec)
        self.objective, self.w_hat, self.ids = objective, w_hat, ids
        self.position = {i: (b, p) for b, batch in enumerate(objective.batches) for p, i in
                         enumerate(ids[r] for r in batch)}
        self.store, self.plan, self.audit_dir = store, plan, audit_dir

    def gradient(self, members: dict[int, list[int]]) -> torch.Tensor:
        g_img, g_txt = self.objective.group_gradient(members, *self.w_hat)
        by_name = {"visual.proj": g_img, "text_projection": g_txt}
        return self.projector.project([by_name[n].unsqueeze(0).float() for n in self.names])[0].double()

    def influence(self, removed: list[str]) -> float:
        members: dict[int, list[int]] = {}
        for i in removed:
            b, p = self.position[i]
            members.setdefault(b, []).append(p)
        return float(self.gradient(members) @ self.direction)

    def checks(self, base_val: float) -> dict:
        """Cached-feature gradients of Pos(n) + Neg(n) against the audit's stored ones (first batch), and
        the cached validation loss against the audit's."""
        slots = {p.id: slot for slot, p in load_slots(self.audit_dir)}
        first = [self.ids[r] for r in self.objective.batches[0]]
        stored = [self.store.pos_gradients(slots[i], slots[i] + 1)[0]
                  + self.store.neg_gradients(slots[i], slots[i] + 1)[0] for i in first]
        errors = []
        for p, g_stored in enumerate(stored):
            g = self.gradient({0: [p]}).numpy()
            errors.append(float(np.linalg.norm(g - g_stored) / np.linalg.norm(g_stored)))
        audit_val = float(self.store.validation_attrs()["loss"])
        return {"pair_gradient_max_relative_error": max(errors), "val_loss_cached": base_val, "val_loss_audit": audit_val}


def _projection_spec(plan) -> ProjectionSpec:
    return Manifest.from_json(plan.manifest).options.projection_spec()
