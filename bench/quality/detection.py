"""Experiment 1: detection of corrupted captions by every ranking, per corruption, fraction and seed.

Per run: digits with the corruption -> tiny CLIP (`ecif train`'s trainer, intermediate checkpoints
for TracIn) -> audits (exact Neg always; first-order and published Neg at the fractions in
`neg_variant_fractions`) -> baselines (TracIn over the checkpoints, negCLIPLoss) -> metrics
against the truth (scoring) and the clean test metrics of the model (the removal baseline).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ecif_core.stages import collect_scores
from ecif_core.models.factory import load_model
from ecif_core.influence.projection import ProjectionSpec
from ecif_core.train import TrainConfig

from . import baselines, scoring
from .evaluation import clean_test_metrics
from .runs import Run, audit, build_and_train, run_name, snapshot_checkpoints
from .settings import QualitySettings
from .tensors import Batch, load_batches


@dataclass(frozen=True)
class Method:
    label: str
    column: str
    sign: float   # suspicion = sign * column: higher = more likely corrupted


METHODS: dict[str, Method] = {
    "ecif_self_is": Method("ECIF self-IS, exact Neg (default ranking)", "self_influence", 1.0),
    "ecif_is": Method("ECIF IS, exact Neg (most negative first)", "influence", -1.0),
    "ecif_is_first_order": Method("IS, first-order Neg", "influence_first_order", -1.0),
    "ecif_is_paper": Method("IS, published Neg", "influence_paper", -1.0),
    "pos_only_if": Method("Pos-only classical IF (influence_pos)", "influence_pos", -1.0),
    "ecif_self_is_first_order": Method("self-IS, first-order Neg", "self_influence_first_order", 1.0),
    "ecif_self_is_paper": Method("self-IS, published Neg", "self_influence_paper", 1.0),
    "ecif_self_is_ensemble": Method("ECIF self-IS, mean rank over the saved checkpoints", "self_influence_ensemble", 1.0),
    "ecif_self_is_exact_grad": Method("ECIF self-IS, exact gradients (no projection)", "self_influence_exact_grad", 1.0),
    "ecif_is_exact_grad": Method("ECIF IS, exact gradients (most negative first)", "influence_exact_grad", -1.0),
    "tracin_self": Method("self-TracIn (sum_c w_c abs(g_pos)^2)", "self_tracin", 1.0),
    "tracin_is": Method("TracIn on validation loss (lowest first)", "tracin", -1.0),
    "clip_score": Method("CLIPScore (lowest first)", "clip_score", -1.0),
    "neg_clip_loss": Method("negCLIPLoss (lowest first)", "neg_clip_loss", -1.0),
    "own_loss": Method("own loss Pos(n) (highest first)", "pos_terms", 1.0),
}


def suspicion(columns: dict[str, np.ndarray], method: str) -> np.ndarray | None:
    """The method's score, higher = more suspicious; None when its column was not computed."""
    m = METHODS[method]
    return None if m.column not in columns else m.sign * np.asarray(columns[m.column], dtype=np.float64)


def detection_key(settings: QualitySettings) -> dict:
    """The settings a detection record depends on (a record with another key is not reused)."""
    skip = ("corruptions", "fractions", "seeds", "cost_default_theta")
    return {k: v for k, v in settings.to_json().items()
            if k not in skip and not k.startswith(("removal_", "fidelity_"))}


def detect(settings: QualitySettings, runs_dir: Path, corruption: str, fraction: float, seed: int,
           say: Callable[[str], None] = print, resume: bool = False, time_default_theta: bool = False) -> dict:
    """One detection run; writes record.json and scores.npz into its folder and returns the record."""
    root = runs_dir / run_name(corruption, fraction, seed)
    record_path = root / "record.json"
    if resume and record_path.is_file():
        record = json.loads(record_path.read_text())
        if record.get("key") == detection_key(settings) and (not time_default_theta or "default_theta" in record):
            say(f"{root.name}: reusing {record_path}")
            return record
    timings: dict[str, float] = {}
    run = build_and_train(root, settings, corruption, fraction, seed)
    timings["build"], timings["train"] = run.build_seconds, run.train_seconds
    columns, ids, audits = _audit_columns(run, settings, fraction, timings)
    columns.update(_lever_columns(run, settings, ids, timings, fraction))
    columns.update(_baseline_columns(run, settings, ids, timings))
    methods = {name: s for name in METHODS if (s := suspicion(columns, name)) is not None}
    labels = scoring.truth_labels(run.data.truth, ids)
    reports, roc = {}, {}
    for name, score in methods.items():
        if np.all(np.isfinite(score)):
            reports[name] = scoring.evaluate({name: score}, labels, settings.ks)[name]
            roc[name] = scoring.tpr_at(score, labels).round(5).tolist()
        else:
            reports[name] = {"non_finite": int(np.sum(~np.isfinite(score)))}
    record = {"key": detection_key(settings), "corruption": corruption, "fraction": fraction, "seed": seed,
              "n_pairs": len(ids), "n_corrupted": int(labels.sum()), "reports": reports, "roc": roc,
              "clean": columns.pop("_clean"), "timings": timings, "audit_stages": audits["exact"].stages,
              "audit_over_train": timings["audit"] / timings["train"],
              "tracin_weights": columns.pop("_tracin_weights"), "logit_scale": columns.pop("_logit_scale")}
    if time_default_theta:
        record["default_theta"] = _default_theta_cost(run, settings, ids, labels)
    np.savez(root / "scores.npz", ids=np.array(ids), **{k: v for k, v in columns.items()})
    for path in snapshot_checkpoints(run):
        if path != run.checkpoint:
            path.unlink(missing_ok=True)  # 13 MB each; TracIn has used them
    record_path.write_text(json.dumps(record, indent=1))
    auroc = {m: reports[m].get("auroc", float("nan")) for m in ("ecif_self_is", "clip_score")}
    say(f"{root.name}: " + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items())
        + f"; AUROC self-IS {auroc['ecif_self_is']:.3f}, CLIPScore {auroc['clip_score']:.3f}")
    return record


def _audit_columns(run: Run, settings: QualitySettings, fraction: float, timings: dict) -> tuple[dict, list[str], dict]:
    """Score columns of the exact audit (and of the Neg variants at their fractions), in slot order."""
    variants = ["exact"] + (["first_order", "paper"] if settings.runs_neg_variants(fraction) else [])
    columns, audits, ids = {}, {}, None
    for neg_term in variants:
        result = audit(run, neg_term, settings.audit_options(neg_term))
        audits[neg_term] = result
        timings["audit" if neg_term == "exact" else f"audit_{neg_term}"] = result.seconds
        pairs, cols = collect_scores(result.folder)
        if ids is None:
            ids = [p.id for p in pairs]
            columns = {k: np.asarray(cols[k], dtype=np.float64) for k in
                       ("influence", "influence_pos", "influence_neg", "self_influence", "clip_score", "pos_terms")}
        else:
            order = {p.id: i for i, p in enumerate(pairs)}
            index = np.array([order[i] for i in ids])
            columns[f"influence_{neg_term}"] = np.asarray(cols["influence"], dtype=np.float64)[index]
            columns[f"self_influence_{neg_term}"] = np.asarray(cols["self_influence"], dtype=np.float64)[index]
    return columns, ids, audits


def _lever_columns(run: Run, settings: QualitySettings, ids: list[str], timings: dict, fraction: float) -> dict:
    """The issue's levers: ECIF on every saved checkpoint (mean of the self-IS rank fractions, each
    checkpoint with its own curvature and damping), and exact gradients of theta."""
    out: dict[str, np.ndarray] = {}
    sidecar = run.sidecar  # snapshots have no sidecar of their own: pass the partition explicitly
    fixed = {k: sidecar[k] for k in ("batch_size", "seed", "weight_decay")}
    if settings.checkpoint_ensemble:
        started, ranks = time.perf_counter(), []
        for checkpoint in snapshot_checkpoints(run):
            options = {**settings.audit_options("exact"), **fixed}
            result = audit(run, f"epoch-{checkpoint.stem}", options, checkpoint=checkpoint)
            pairs, cols = collect_scores(result.folder)
            values = _aligned(np.asarray(cols["self_influence"], dtype=np.float64), [p.id for p in pairs], ids)
            ranks.append(np.argsort(np.argsort(values, kind="stable"), kind="stable") / (len(values) - 1))
        out["self_influence_ensemble"] = np.mean(ranks, axis=0)
        timings["audit_checkpoints"] = time.perf_counter() - started
    if any(abs(fraction - f) < 1e-9 for f in settings.exact_gradient_fractions):
        result = audit(run, "exact-gradients", settings.audit_options("exact", projection=None))
        timings["audit_exact_gradients"] = result.seconds
        pairs, cols = collect_scores(result.folder)
        order = [p.id for p in pairs]
        out["self_influence_exact_grad"] = _aligned(np.asarray(cols["self_influence"], dtype=np.float64), order, ids)
        out["influence_exact_grad"] = _aligned(np.asarray(cols["influence"], dtype=np.float64), order, ids)
    return out


def _aligned(values: np.ndarray, from_ids: list[str], to_ids: list[str]) -> np.ndarray:
    order = {i: k for k, i in enumerate(from_ids)}
    return np.asarray(values)[np.array([order[i] for i in to_ids])]


def _baseline_columns(run: Run, settings: QualitySettings, ids: list[str], timings: dict) -> dict:
    """TracIn, negCLIPLoss and the clean test metrics (loads the split tensors once)."""
    started = time.perf_counter()
    loaded = load_model(config=run.config, checkpoint=run.checkpoint)
    train = load_batches(run.data.train, loaded, settings.batch_size, run.seed, training=True)
    val = load_batches(run.data.validation, loaded, settings.batch_size, run.seed, training=False)
    test = load_batches(run.data.test, loaded, settings.batch_size, run.seed, training=False)
    timings["load_tensors"] = time.perf_counter() - started
    out = _tracin_columns(run, settings, ids, train, val, timings)
    started = time.perf_counter()
    text, image = baselines.embed_batches(loaded.model, train)
    tau = baselines.model_tau(loaded.model)
    scores = baselines.neg_clip_loss(image @ text.T, tau, settings.batch_size, settings.neg_clip_repeats, run.seed)
    out["neg_clip_loss"] = _aligned(scores, [i for b in train for i in b.ids], ids)
    timings["neg_clip_loss"] = time.perf_counter() - started
    started = time.perf_counter()
    out["_clean"] = clean_test_metrics(loaded, test)
    out["_logit_scale"] = float(loaded.model.logit_scale.detach().exp())
    timings["evaluate"] = time.perf_counter() - started
    return out


def _tracin_columns(run: Run, settings: QualitySettings, ids: list[str], train: list[Batch], val: list[Batch],
                    timings: dict) -> dict:
    started = time.perf_counter()
    checkpoints = snapshot_checkpoints(run)
    weights = baselines.checkpoint_weights(settings.epochs, settings.checkpoints, len(train), settings.lr,
                                           TrainConfig().warmup_steps)
    spec = ProjectionSpec(settings.projection, settings.projection, 0)
    result = baselines.tracin_scores(run.config, checkpoints, weights, settings.theta, spec, train, val)
    timings["tracin"] = time.perf_counter() - started
    return {"tracin": _aligned(result.tracin, result.ids, ids), "self_tracin": _aligned(result.self_tracin, result.ids, ids),
            "_tracin_weights": weights}


def _default_theta_cost(run: Run, settings: QualitySettings, ids: list[str], labels: np.ndarray) -> dict:
    """Cost (and detection) of one audit with theta blocks:2 (last 2 blocks + projections; the default before issue 22)."""
    result = audit(run, "default-theta", settings.audit_options("exact", default_theta=True))
    pairs, cols = collect_scores(result.folder)
    score = _aligned(np.asarray(cols["self_influence"], dtype=np.float64), [p.id for p in pairs], ids)
    return {"audit_seconds": result.seconds, "stages": result.stages,
            "self_is": scoring.evaluate({"s": score}, labels, settings.ks)["s"]}


def summarise(records: list[dict], settings: QualitySettings) -> dict:
    """Per corruption and fraction: per method and metric [mean, sd] over the grid's seeds, the mean
    ROC curve (TPR on scoring.FPR_GRID) and the seeds used."""
    out: dict = {}
    for corruption in settings.corruptions:
        for fraction in settings.fractions:
            runs = [r for r in records if r["corruption"] == corruption and abs(r["fraction"] - fraction) < 1e-9
                    and r["seed"] in settings.seeds]
            if not runs:
                continue
            cell: dict = {"seeds": [r["seed"] for r in runs], "methods": {}, "roc": {}}
            for method in METHODS:
                reports = [r["reports"][method] for r in runs if "auroc" in r["reports"].get(method, {})]
                if reports:
                    cell["methods"][method] = {k: scoring.mean_sd([rep[k] for rep in reports]) for k in reports[0]}
                    cell["methods"][method]["runs"] = len(reports)
                curves = [r["roc"][method] for r in runs if method in r.get("roc", {})]
                if curves:
                    cell["roc"][method] = np.mean(curves, axis=0).round(5).tolist()
            out.setdefault(corruption, {})[str(fraction)] = cell
    return out


def cost_summary(records: list[dict]) -> dict:
    """Audit / retraining wall time (same run) and the other stages, mean and sd over runs."""
    keys = sorted({k for r in records for k in r["timings"]})
    out = {"audit_over_train": scoring.mean_sd([r["audit_over_train"] for r in records]),
           "seconds": {k: scoring.mean_sd([r["timings"][k] for r in records if k in r["timings"]]) for k in keys},
           "runs": len(records)}
    with_default = [r for r in records if "default_theta" in r]
    if with_default:
        r = with_default[0]
        out["default_theta"] = {"run": run_name(r["corruption"], r["fraction"], r["seed"]),
                                "audit_seconds": r["default_theta"]["audit_seconds"],
                                "train_seconds": r["timings"]["train"],
                                "audit_over_train": r["default_theta"]["audit_seconds"] / r["timings"]["train"],
                                "projections_audit_seconds": r["timings"]["audit"],
                                "self_is": r["default_theta"]["self_is"],
                                "self_is_projections_theta": r["reports"]["ecif_self_is"]}
    return out
