"""Removal preview and model edit of a finished audit: what dropping a set of pairs would do, and the
model without them, or with them demoted (ecif_core.edit.solver), written as a checkpoint in the
input's own format and layout (ecif_core.models.layout).

The preview reads stored numbers only (instant): the sum over the set of the per-pair influence
(IS, IS_pos, IS_neg). Pairs of the set that share a batch interact (docs/METHOD.md, "A pair's two roles"),
which the sum ignores; the preview says how many do. The edit recomputes the exact group gradients in
parameter space and reports the group-form, first-order prediction next to the validation loss the
edited model actually has.
"""
from __future__ import annotations

import functools
import json
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from ecif_core.models.cache import model_files
from ecif_core.stages.finalize import Ranking, final_ranking
from ecif_core.stages.plan import image_access, load_plan, load_slots, manifest_of, open_store
from ecif_core.data.images import load_batch, load_image
from ecif_core.data.store import AuditStore
from ecif_core.edit.certificate import certificate
from ecif_core.edit.validation_check import kept_validation_features, validation_batches, validation_loss
from ecif_core.edit.settings import METHODS, EditSettings
from ecif_core.edit.replay import recipe_of, replay_parameters
from ecif_core.edit.solver import CURVATURES, LeaveOutObjective, StreamedBatch, apply_delta, edit_parameters
from ecif_core.errors import ConfigError
from ecif_core.influence.gradients import embed
from ecif_core.models.lora import TRAINING_SIDECAR, save_adapter
from ecif_core.data.manifest import SIDECAR_SUFFIX, Manifest, read_sidecar
from ecif_core.models.factory import ready_model
from ecif_core.models.theta import check_edit_theta
from ecif_core.edit.removal import ACTIONS, Action, Estimate, RemovalSet, id_file, select
from ecif_core.models.layout import write_in_layout
from ecif_core.models.runtime import flush_denormals
from ecif_core.progress import Progress
from ecif_core.data.confine import data_roots
from ecif_core.data.storage import absolute, is_remote, location, resolve_against, write_bytes
from ecif_core.trace.query import TraceExample, examples_from_json
from ecif_core.values import finite_or_null

EDIT_SIDECAR = "edit.json"
REMOVED_IDS = "removed_ids.txt"
SET_IDS = {"remove": REMOVED_IDS, "demote": "demoted_ids.txt"}  # the ids the edit acted on, by action


def removal_set(audit_dir: str | Path, spec: str, base_dir: str | Path | None = None,
                ranking: Ranking | None = None, field: str = "remove", keep: str | Path | None = None) -> RemovalSet:
    """The pairs `spec` names among the audit's ranked pairs (see ecif_core.edit.removal), less the
    ids of the `keep` file (read against `base_dir`); `field`: what errors name (remove, demote)."""
    ranking = ranking or final_ranking(audit_dir, interval=False)
    columns = dict(ranking.columns)
    rank = np.empty(len(ranking.pairs))
    rank[ranking.order] = np.arange(1, len(ranking.pairs) + 1)
    columns["rank"] = rank
    kept = () if keep is None else id_file(str(keep), "keep", base_dir)
    summary = ranking.calibration.summary()
    estimate = Estimate(summary["estimated_misaligned_pairs"], summary["reason"])
    return select(spec, [p.id for p in ranking.pairs], columns, ranking.suspected, base_dir, field=field, keep=kept,
                  estimate=estimate)


def spec_ids(spec: str, field: str = "remove", audit_dir: str | Path | None = None,
             base_dir: str | Path | None = None) -> list[str]:
    """The ids a spec names, for retraining (`ecif train --remove/--demote`): any spec against an
    audit's ranking when `audit_dir` is given, else a file of ids (`ids:PATH`, or the path itself)."""
    if audit_dir is not None:
        return list(removal_set(audit_dir, spec, base_dir, field=field).ids)
    path = spec[len("ids:"):] if spec.startswith("ids:") else spec
    if not spec.startswith("ids:") and not location(path, field).is_file():
        raise ConfigError(field, f"{spec!r} is not a file of ids; a spec such as suspected or top:Q:COLUMN reads an "
                          "audit's ranking: give its folder too (--audit-dir)")
    return id_file(path, field, base_dir)


def preview(audit_dir: str | Path, spec: str, base_dir: str | Path | None = None,
            ranking: Ranking | None = None) -> dict:
    """Predicted change of the mean validation loss if the set is removed, from stored numbers (sum form).
    `ranking`: the audit's final_ranking when the caller previews several sets."""
    ranking = ranking or final_ranking(audit_dir, interval=False)
    chosen = removal_set(audit_dir, spec, base_dir, ranking)
    wanted = set(chosen.ids)
    index = np.array([i for i, p in enumerate(ranking.pairs) if p.id in wanted], dtype=np.int64)
    plan = load_plan(audit_dir)
    batch_of = ranking.slots[index] // plan.batch_size
    _, per_batch = np.unique(batch_of, return_counts=True)
    cols = ranking.columns
    has_validation = not np.isnan(cols["influence"]).all()
    store = open_store(audit_dir)
    validation_loss = (float(store.validation_attrs()["loss"])
                       if has_validation and store.validation_complete() else None)

    def total(name: str) -> float | None:
        return float(cols[name][index].sum()) if has_validation else None

    return {"remove": chosen.spec, "pairs": len(index), "fraction": len(index) / len(ranking.pairs),
            "suspected_in_set": int(ranking.suspected[index].sum()),
            "batches_touched": int(len(per_batch)), "pairs_sharing_a_batch": int(per_batch[per_batch > 1].sum()),
            "validation_loss": validation_loss, "predicted_validation_change": total("influence"),
            "predicted_validation_change_pos": total("influence_pos"),
            "predicted_validation_change_neg": total("influence_neg"),
            "form": "sum of per-pair influence (stored); pairs sharing a batch are not grouped"}


class StoredFeatures:
    """The towers' features the audit's gradients stage kept (store.features), read one shard at a time:
    a shard owns whole batches, and the edit reads the batches in slot order."""

    def __init__(self, store: AuditStore, shard_rows: int):
        self.store, self.shard_rows = store, shard_rows
        self._shard: int | None = None
        self._rows: tuple[np.ndarray, np.ndarray] | None = None

    def of_slots(self, slots: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(image, text) features of one batch's slots, in that order."""
        shard = slots[0] // self.shard_rows
        if shard != self._shard:
            self._rows, self._shard = self.store.features(shard * self.shard_rows, (shard + 1) * self.shard_rows), shard
        local = np.asarray(slots) - shard * self.shard_rows
        return torch.from_numpy(self._rows[0][local]), torch.from_numpy(self._rows[1][local])


def training_batches_of(audit_dir: str | Path, chosen: set[str], preprocess, tokenizer,
                        stored: bool = True) -> list[StreamedBatch]:
    """The audit's fixed partition (its row slots), with the pairs of the set marked; each batch's images
    are read from their source when used (StreamedBatch), never all held at once. `stored`: give each
    batch the towers' features the audit kept, where it kept them (a theta within the projections then
    decodes no training image)."""
    plan = load_plan(audit_dir)
    access = image_access(plan, audit_dir)
    grouped: dict[int, list] = {}
    for slot, pair in load_slots(audit_dir):
        grouped.setdefault(slot // plan.batch_size, []).append((slot, pair))
    store = open_store(audit_dir) if stored else None
    kept = StoredFeatures(store, plan.shard_rows) if store is not None and store.features_complete() else None
    return [StreamedBatch(functools.partial(load_batch, [p for _, p in grouped[b]], preprocess, tokenizer,
                                            access.fetch_dir, access.roots),
                          torch.tensor([p.id in chosen for _, p in grouped[b]]),
                          None if kept is None else functools.partial(kept.of_slots, [s for s, _ in grouped[b]]))
            for b in sorted(grouped)]


def zero_shot_examples(raw: object) -> list[TraceExample]:
    """Zero-shot examples for an edit: [{"image": path, "prompts": [...], "label": i}, ...] (the
    traces' format, prompts required); errors name `zero_shot[i]`."""
    try:
        examples = examples_from_json(raw)
    except ConfigError as exc:
        raise ConfigError(exc.field.replace("tests", "zero_shot", 1), exc.message) from None
    for i, example in enumerate(examples):
        if example.prompts is None:
            raise ConfigError(f"zero_shot[{i}]", "needs prompts and label")
    return examples


@torch.no_grad()
def zero_shot_accuracy(loaded, examples: list[TraceExample], roots: list[Path] | None) -> float:
    """Share of examples whose image is closest (cosine) to the prompt of its label."""
    correct = 0
    with flush_denormals():
        for example in examples:
            image = loaded.preprocess(load_image(example.image, roots)).unsqueeze(0)  # confined when opened
            text, image_emb = embed(loaded.model, image, loaded.tokenizer(example.prompts))
            scores = torch.nn.functional.normalize(image_emb, dim=-1) @ torch.nn.functional.normalize(text, dim=-1).T
            correct += int(int(scores.argmax()) == example.label)
    return correct / len(examples)


def _curvature_description(curvature: str, action: Action) -> str:
    """edit.json's method.curvature: which matrix CG solved with, of which objective."""
    matrix, products = (("exact Hessian", "Hessian-vector products") if curvature == CURVATURES[0]
                        else ("Gauss-Newton matrix", "J^T H_z J products"))
    return f"{matrix} of the objective {'without' if action == 'remove' else 'demoting'} the set ({products})"


def _feature_source(objective: LeaveOutObjective, batches: list[StreamedBatch]) -> str | None:
    """edit.json's method.features_from: where the feature cache came from (None: no feature cache)."""
    if not objective.uses_feature_cache:
        return None
    return "audit store" if batches and batches[0].stored_features is not None else "images"


def _method_description(method: str, curvature: str, action: Action, recipe) -> dict:
    """edit.json's method fields that say how the parameter change was found."""
    if method == "replay":
        return {"replay": f"theta_hat + A(without the set) - A(with it): two runs of the training recipe from the "
                          f"audited model, same batches and order ({'removing' if action == 'remove' else 'demoting'} "
                          "the set in one)", "recipe": asdict(recipe)}
    return {"curvature": _curvature_description(curvature, action), "solver": "truncated conjugate gradients"}


def edit_audit(audit_dir: str | Path, spec: str, out: str | Path, settings: EditSettings | None = None,
               theta: list[str] | None = None, base_dir: str | Path | None = None,
               zero_shot: list[TraceExample] | None = None, progress: Progress | None = None,
               action: Action = "remove", keep: str | Path | None = None, curvature: str = CURVATURES[0],
               method: str = METHODS[0]) -> dict:
    """Write the model without the pairs `spec` names (action "remove"), or with them demoted (their
    own terms dropped, still in-batch negatives: "demote"), into `out`; returns the edit's record (edit.json).

    `theta`: fnmatch patterns of the parameters to edit (default: the audit's theta). `zero_shot`:
    examples whose accuracy is measured before and after the edit. The audit is only read, never changed.
    `progress`: the replay's steps with their ETA (replay.replay_parameters), or the CG solve's iterations
    with their relative residual and ETA (solver.conjugate_gradient).
    `keep`: a file of ids (read against `base_dir`) taken out of the set whatever the spec selects.
    `curvature`: one of solver.CURVATURES: "hessian" (the exact Hessian; Newton's step) or "gauss-newton"
    (positive semi-definite; measured in bench.edit, not yet a CLI or API setting); method newton only.
    `method`: one of settings.METHODS: "replay" (the difference of two short trainings with and without the
    set: ecif_core.edit.replay) or "newton" (one damped Newton step: ecif_core.edit.solver).
    """
    if action not in ACTIONS:
        raise ConfigError("action", f"must be one of {', '.join(ACTIONS)} (got {action!r})")
    if method not in METHODS:
        raise ConfigError("method", f"must be one of {', '.join(METHODS)} (got {method!r})")
    settings = (settings or EditSettings()).validate()
    started = time.perf_counter()
    audit_dir, out = location(audit_dir, "audit"), location(out, "out")
    plan = load_plan(audit_dir)
    manifest = manifest_of(plan)
    chosen = removal_set(audit_dir, spec, base_dir, field=action, keep=keep)
    roots = None if plan.image_roots is None else data_roots(plan.image_roots, plan.allow_hard_links)
    files = model_files(manifest, roots)
    ready = ready_model(manifest.model_arch, files.config, files.checkpoint, adapter=files.adapter,
                        theta=theta or manifest.options.theta)  # exact float32, as the audit's model
    loaded, model, params = ready.loaded, ready.model, ready.theta
    check_edit_theta([name for name, _ in params], manifest.adapter is not None)
    recipe = None
    if method == "replay":  # refused before any image is read when the recipe is unknown
        recipe = recipe_of(read_sidecar(manifest.checkpoint, manifest.adapter), manifest.options.seed,
                           settings.replay_epochs, settings.replay_lr)
    accuracy_before = zero_shot_accuracy(loaded, zero_shot, roots) if zero_shot else None
    seconds = {}
    with flush_denormals():
        batches = training_batches_of(audit_dir, set(chosen.ids), loaded.preprocess, loaded.tokenizer)
        objective = LeaveOutObjective(model, params, batches, manifest.options.weight_decay, action=action,
                                      curvature=curvature)
        seconds["load"] = time.perf_counter() - started
        if recipe is not None:
            result = replay_parameters(objective, recipe, progress, settings.max_seconds)
        else:
            result = edit_parameters(objective, settings, progress)
        started_check = time.perf_counter()
        stationarity = float(objective.full_objective_gradient().norm()) / max(result.removal_gradient_norm, 1e-300)
        seconds["stationarity_check"] = time.perf_counter() - started_check
        record_validation = None
        if manifest.validation is not None:
            val = kept_validation_features(audit_dir) if objective.uses_feature_cache else None
            from_features = val is not None  # no validation image decoded
            if val is None:
                val = validation_batches(audit_dir, manifest, loaded.preprocess, loaded.tokenizer)
            before, grads = validation_loss(model, val, [p for _, p in params], from_features)
            predicted = float(sum((g * result.delta[name].double()).sum() for g, (name, _) in zip(grads, params)))
            apply_delta(params, result.delta)
            after, _ = validation_loss(model, val, from_features=from_features)
            terms = "Pos(E) + Neg(E)" if action == "remove" else "Pos(E) alone: a demotion"
            record_validation = {"loss_before": before, "loss_after": after, "actual_change": after - before,
                                 "predicted_change": predicted, "form": f"group (exact {terms}), first order"}
        else:
            apply_delta(params, result.delta)
    record_zero_shot = None
    if zero_shot:
        record_zero_shot = {"examples": len(zero_shot), "accuracy_before": accuracy_before,
                            "accuracy_after": zero_shot_accuracy(loaded, zero_shot, roots)}
    seconds.update(result.seconds)
    seconds["total"] = time.perf_counter() - started
    record = finite_or_null({  # diagnostics that overflowed are null: edit.json stays strict JSON
        "audit": absolute(audit_dir), "action": action,
        action: {"spec": chosen.spec, "pairs": len(chosen.ids), "ids": SET_IDS[action], "kept_back": chosen.kept_back},
        "base": {"arch": manifest.model_arch, "config": manifest.model_config, "checkpoint": manifest.checkpoint,
                 "adapter": manifest.adapter},
        "method": {"name": method, **(_method_description(method, curvature, action, recipe)),
                   "weight_decay": manifest.options.weight_decay,
                   "theta": [name for name, _ in params], "feature_cache": objective.uses_feature_cache,
                   "features_from": _feature_source(objective, batches),
                   "trunk_cache": objective.uses_trunk_cache,
                   **asdict(settings)},
        "result": {**result.summary(), "seconds": seconds,
                   # |grad J(theta_hat)| / |grad(Pos(E) + Neg(E))|: the edit assumes a trained optimum (~0)
                   "stationarity": stationarity},
        "validation": record_validation,
        "certificate": certificate(result.relative_residual, stationarity, record_validation, result.damping,
                                   result.removal_curvature, method=method),
        "zero_shot": record_zero_shot,
    })
    if is_remote(out):  # written here whole, then uploaded file by file (objects, no renames)
        with tempfile.TemporaryDirectory(prefix="ecif-edit-") as local:
            _write_edited_model(model.to("cpu"), manifest, chosen, Path(local), record, home=out, action=action)
            for path in sorted(p for p in Path(local).rglob("*") if p.is_file()):
                write_bytes(out / path.relative_to(local).as_posix(), path.read_bytes())
    else:
        _write_edited_model(model.to("cpu"), manifest, chosen, out, record, action=action)
    return record


def rehome_sidecar(sidecar: dict, old_home: Path, new_home: Path) -> dict:
    """A copy of a training sidecar for a model written to `new_home`: its paths are relative to the
    sidecar's folder (ecif_core.train), so they are re-expressed from the new folder."""
    import os

    def moved(path: str) -> str:
        if is_remote(path) or is_remote(old_home) or is_remote(new_home):  # no relative path across stores
            return resolve_against(old_home, path)
        return os.path.relpath((old_home / path).resolve(), new_home.resolve())

    out = dict(sidecar)
    if isinstance(out.get("base_checkpoint"), str):
        out["base_checkpoint"] = moved(out["base_checkpoint"])
    out["checkpoints"] = [moved(p) for p in out.get("checkpoints", []) if isinstance(p, str)]
    data = out.get("data")
    if isinstance(data, dict) and isinstance(data.get("path"), str) and data.get("format") != "webdataset":
        out["data"] = {**data, "path": moved(data["path"])}
    return out


def _write_edited_model(model: torch.nn.Module, manifest: Manifest, chosen: RemovalSet, out: Path, record: dict,
                        home: Path | None = None, action: Action = "remove") -> None:
    """The checkpoint in the input's format and layout, its training sidecar (the removed pairs
    excluded, so `ecif audit` of the edited model sees the batches it stands for; demoted pairs
    listed under `demoted`), the edit record and the ids.
    `home`: where these files will live when `out` is only their local staging folder."""
    home = out if home is None else home
    out.mkdir(parents=True, exist_ok=True)
    sidecar = read_sidecar(manifest.checkpoint, manifest.adapter)
    o = manifest.options
    removed = set(chosen.ids) if action == "remove" else set()
    sidecar.update({"batch_size": o.batch_size, "seed": o.seed, "weight_decay": o.weight_decay,
                    "excluded": sorted(set(sidecar.get("excluded", [])) | removed | set(manifest.excluded)),
                    "edited_from": manifest.adapter or manifest.checkpoint})
    if action == "demote":
        sidecar["demoted"] = sorted(set(sidecar.get("demoted", [])) | set(chosen.ids))
    if manifest.ids_digest and "ids_digest" not in sidecar:
        sidecar["ids_digest"] = manifest.ids_digest
    old_home = location(manifest.adapter) if manifest.adapter is not None else location(manifest.checkpoint).parent
    sidecar = rehome_sidecar(sidecar, old_home, home / "adapter" if manifest.adapter is not None else home)
    if manifest.adapter is not None:
        folder = out / "adapter"
        if folder.exists():
            shutil.rmtree(folder)
        save_adapter(model, folder)
        (folder / TRAINING_SIDECAR).write_text(json.dumps(sidecar, indent=1))
        record["checkpoint"] = {"adapter": str(home / "adapter"), "base_checkpoint": manifest.checkpoint}
    else:
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        path = out / ("model.safetensors" if manifest.checkpoint.endswith(".safetensors") else "model.pt")
        write_in_layout(state, manifest.checkpoint, path)
        Path(str(path) + SIDECAR_SUFFIX).write_text(json.dumps(sidecar, indent=1))
        record["checkpoint"] = {"checkpoint": str(home / path.name)}
    (out / SET_IDS[action]).write_text("".join(f"{i}\n" for i in chosen.ids), encoding="utf-8")
    (out / EDIT_SIDECAR).write_text(json.dumps(record, indent=1))
