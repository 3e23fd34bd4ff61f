"""One action on one list of one cell: retrain without it, retrain demoting it, edit without it or edit
demoting it; then the clean test metrics of the model that results (bench.fix.evaluate).

Per cell there are more records beside the lists: `original` (the audited fine-tune itself) and `noise`,
`noise-2`, ... (the same fine-tune retrained with other seeds, nothing removed: the retrain-vs-retrain noise
every gap is read against, and the retraining's cost on the whole set).

Each record is written to OUT/fix/<cell>/<list>--<action>.json when it finishes, with the settings it
depends on; a rerun returns it without recomputing (resumable). Models are deleted once evaluated.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from bench.quality.finetune.cells import CellSpec, train_config
from bench.quality.finetune.evaluate import truth_labels
from ecif_core.calibration import forget_remembered_fits
from ecif_core.edit.from_audit import edit_audit, preview, removal_set
from ecif_core.edit.settings import EditSettings
from ecif_core.errors import ConfigError
from ecif_core.stages.finalize import Ranking, final_ranking
from ecif_core.models.factory import LoadedModel, load_model
from ecif_core.train import train

from .evaluate import clean_metrics, held_out_change, test_split
from .settings import LISTS, NOISE_SEED_OFFSET, FixSettings



def reference_names(settings: FixSettings) -> list[str]:
    """The per-cell records beside the (list, action) ones: the original and each noise retraining."""
    return ["original"] + [f"noise-{k}" if k > 1 else "noise" for k in range(1, settings.noise_repeats + 1)]


def cell_folder(out: Path, cell: CellSpec) -> Path:
    return Path(out) / "cells" / cell.name


def records_folder(out: Path, settings: FixSettings) -> Path:
    """OUT/fix, or OUT/fix-<tag> for a variant run on the same cells (another edit theta or curvature)."""
    return Path(out) / (f"fix-{settings.tag}" if settings.tag else "fix")


def record_path(out: Path, settings: FixSettings, cell: CellSpec, name: str, action: str = "") -> Path:
    return records_folder(out, settings) / cell.name / (f"{name}--{action.replace(':', '-')}.json" if action else f"{name}.json")


def cached(settings: FixSettings, path: Path) -> dict | None:
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    return record if record.get("key") == settings.action_key() else None


def _write(settings: FixSettings, path: Path, cell: CellSpec, record: dict) -> dict:
    record = {"key": settings.action_key(), "spec_of_cell": dataclasses.asdict(cell), **record}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, path)
    return record


# A list whose template names {n} or {m} is sized by the product's own `suspected` or `estimated` set.
SIZED_BY = {"n": "suspected", "m": "estimated"}


def list_spec(audit: Path, name: str, seed: int, ranking: Ranking | None = None) -> str | None:
    """The removal spec of a list for this audit, or None when it names no pair (nothing flagged, or the audit
    could not estimate its misaligned share). `ranking`: the audit's final_ranking, when the caller has it."""
    template = LISTS[name]
    sizes = {}
    for key, spec in SIZED_BY.items():
        if "{" + key + "}" in template or template == spec:
            try:
                sizes[key] = len(removal_set(audit, spec, ranking=ranking).ids)
            except ConfigError:  # selects no pair, or no estimate
                return None
    return template.format(seed=seed, **sizes)


def _model_name(cell: CellSpec) -> str:
    """The fine-tune's file (or adapter folder) name, as bench.quality's cells write it."""
    return "lora" if cell.tuning == "lora" else "model.pt"


def _load(cell: CellSpec, config: Path, base: Path, path: Path) -> LoadedModel:
    if cell.tuning == "lora":
        return load_model(config=config, checkpoint=base, adapter=path)
    return load_model(config=config, checkpoint=path)


def _evaluate(settings: FixSettings, out: Path, cell: CellSpec, loaded: LoadedModel) -> dict[str, float]:
    split, vocab = test_split(settings.finetune, cell, cell_folder(out, cell))
    return clean_metrics(loaded, split, vocab, settings.finetune.batch_size)


def reference_record(settings: FixSettings, out: Path, cell: CellSpec, name: str, config: Path, base: Path) -> dict:
    """`original`: the audited fine-tune's metrics; `noise[-k]`: a retraining with seed + k x 1000 (nothing removed)."""
    path = record_path(out, settings, cell, name)
    if (record := cached(settings, path)) is not None:
        return record
    folder = cell_folder(out, cell)
    model_path = folder / _model_name(cell)
    if name == "original":
        return _write(settings, path, cell, {"cell": cell.name, "name": name,
                                       "metrics": _evaluate(settings, out, cell, _load(cell, config, base, model_path))})
    repeat = int(name.partition("-")[2] or 1)
    cfg = dataclasses.replace(train_config(settings.finetune, cell, 0), seed=cell.seed + repeat * NOISE_SEED_OFFSET)
    scratch = path.parent / f"scratch-{name}"
    trained_path = scratch / model_path.name
    started = time.perf_counter()
    train(folder / "data" / "train.jsonl", config, trained_path, cfg, init=base)
    seconds = time.perf_counter() - started
    metrics = _evaluate(settings, out, cell, _load(cell, config, base, trained_path))
    shutil.rmtree(scratch, ignore_errors=True)
    return _write(settings, path, cell, {"cell": cell.name, "name": name, "seed": cfg.seed, "seconds": seconds,
                                   "metrics": metrics})


def act(settings: FixSettings, out: Path, cell: CellSpec, name: str, action: str, config: Path, base: Path) -> dict:
    """The record of one (list, action) on a finished cell (from its file when done before)."""
    path = record_path(out, settings, cell, name, action)
    folder = cell_folder(out, cell)
    audit = folder / "audit"
    if (record := cached(settings, path)) is not None:
        if "preview_change" not in record and record.get("spec"):  # a record from before the preview was kept
            record["preview_change"] = preview(audit, record["spec"])["predicted_validation_change"]
            record = _write(settings, path, cell, {k: v for k, v in record.items() if k not in ("key", "spec_of_cell")})
        return record
    ranking = final_ranking(audit)  # once: the list's size, its ids and its preview all read it
    spec = list_spec(audit, name, cell.seed, ranking)
    head: dict[str, Any] = {"cell": cell.name, "list": name, "action": action, "spec": spec}
    if spec is None:
        return _write(settings, path, cell, {**head, "skipped": "the list names no pair on this audit"})
    ids = list(removal_set(audit, spec, ranking=ranking).ids)
    labels = truth_labels(folder / "truth.csv", ids)
    # the report's removal preview of this list (stored numbers, instant), to check against what the action did
    head.update(pairs=len(ids), corrupted_share=float(labels.mean()),
                preview_change=preview(audit, spec, ranking=ranking)["predicted_validation_change"])
    how, verb = action.split(":")
    scratch = path.parent / f"scratch-{name}-{how}-{verb}"
    shutil.rmtree(scratch, ignore_errors=True)
    forget_remembered_fits()  # the final_ranking above is not the action's: it pays its own fit, as a fresh run does
    started = time.perf_counter()
    extra: dict[str, Any] = {}
    if how == "retrain":
        model_name = _model_name(cell)
        cfg = dataclasses.replace(train_config(settings.finetune, cell, 0),
                                  **({"exclude": tuple(ids)} if verb == "remove" else {"demote": tuple(ids)}))
        train(folder / "data" / "train.jsonl", config, scratch / model_name, cfg, init=base)
        seconds = time.perf_counter() - started
        loaded = _load(cell, config, base, scratch / model_name)
    else:
        edit = edit_audit(audit, spec, scratch, EditSettings(), theta=settings.edit_theta, action=verb,
                          curvature=settings.edit_curvature, method=settings.edit_method)
        seconds = time.perf_counter() - started
        written = edit["checkpoint"]
        loaded = (load_model(config=config, checkpoint=base, adapter=written["adapter"]) if "adapter" in written
                  else load_model(config=config, checkpoint=written["checkpoint"]))
        result = edit["result"]
        extra = {"verdict": edit["certificate"]["verdict"], "theta": edit["method"]["theta"],
                 "edit": {k: result.get(k) for k in ("method", "damping", "cg_iterations", "cg_relative_residual",
                                                     "negative_curvature", "steps_done", "parameter_change_norm",
                                                     "stationarity")},
                 "validation": edit["validation"]}
        split, _ = test_split(settings.finetune, cell, folder)
        extra["held_out"] = held_out_change(_load(cell, config, base, folder / _model_name(cell)), loaded, split,
                                            settings.finetune.batch_size)
    metrics = _evaluate(settings, out, cell, loaded)
    shutil.rmtree(scratch, ignore_errors=True)
    return _write(settings, path, cell, {**head, "seconds": seconds, "metrics": metrics, **extra})
