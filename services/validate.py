"""`ecif validate`: the checks the service runs at submit (ecif_core.preflight), one streaming
pass over each pair source, and whether a sample of its images exists; nothing is decoded.
With `estimate`, also the audit's expected wall time and store size (ecif_core.estimate), which
loads the model and times a few real batches: opt-in, as it costs seconds to minutes where the
checks cost a moment."""
from __future__ import annotations

from pathlib import Path

from ecif_core.data.image_sample import check_image_sample
from ecif_core.data.manifest import load_manifest
from ecif_core.data.sources import check_batchable, validate_source
from ecif_core.errors import ConfigError
from ecif_core.preflight import PAIR_FIELDS, check_before_audit


def validate_manifest(path: str | Path, estimate: bool = False, batches: int | None = None,
                      startup_s: float = 0.0) -> tuple[dict, str | None]:
    """(report, problem): the report of every check that passed, and the one line of the first
    problem found (None: the audit can start). A manifest the service would refuse with 422 is a
    ConfigError raised here with the same words. `estimate`: once every check passed, the report's
    "estimate" (ecif_core.estimate.Estimate.to_json, on `batches` timed batches) for the usable
    pairs counted here; `startup_s`: this process's import of the engine's libraries, which a
    fresh `ecif audit` pays too."""
    manifest = load_manifest(path)
    report: dict = {"manifest": "ok", "gradient_dim": check_before_audit(manifest)}
    problem = None
    for name in PAIR_FIELDS:
        value = getattr(manifest, name)
        if value is None:
            continue
        summary = validate_source(value, name)
        check_batchable(name, summary.rows, summary.usable, summary.reasons)
        sample = check_image_sample(value, name, summary.rows)
        report[name] = {**summary.__dict__, "images": sample.__dict__}
        if problem is None and sample.problem(name):
            problem = str(ConfigError(name, sample.problem(name)))
    if estimate and problem is None:
        from ecif_core.estimate import DEFAULT_BATCHES, estimate_audit

        report["estimate"] = estimate_audit(
            manifest, batches=batches or DEFAULT_BATCHES, pairs=report["train"]["usable"],
            validation_pairs=report["validation"]["usable"] if "validation" in report else 0,
            startup_s=startup_s).to_json()
    return report, problem
