"""The settings of a model edit (ecif_core.edit.solver) in one table: each one's default, bounds and
meaning. The API's request schema (and so its OpenAPI), the CLI's flags, `EditSettings.validate`
and the service's pipeline all read EDIT_SETTINGS; no bound is restated elsewhere.

No torch here: the CLI builds its flags from this table without importing the maths.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Mapping

from ecif_core.errors import ConfigError

MAX_DAMPING = 1e12  # the audit's options have the same bound on damping (manifest.BOUNDS)
MAX_SECONDS = 7 * 24 * 3600.0  # a week: a budget is a cap on one request, not a schedule
# How the edit finds its parameter change (`method`, beside the numeric settings below): the difference of two
# short trainings with and without the set (edit.replay; the default, measured closer to retraining a
# fine-tune: bench/RESULTS.md) or one damped Newton step of the leave-out objective (edit.solver; the one that
# equals retraining on a quadratic).
METHODS = ("replay", "newton")
MAX_REPLAY_EPOCHS = 100  # each epoch of the replay is two passes over the training pairs


@dataclass(frozen=True)
class SettingSpec:
    """One edit setting: its default, its bounds and what it means. The API schema (and so its
    OpenAPI), the CLI flags and `EditSettings.validate` are all read from EDIT_SETTINGS."""

    name: str
    kind: type                      # int or float
    default: float | int | None
    low: float | int
    high: float | int
    meaning: str
    low_open: bool = False          # the bound itself is excluded
    high_open: bool = False
    nullable: bool = False          # None is a value (it means "chosen from the data")
    old_name: str | None = None     # the name before a rename (CHANGELOG.md): still read, deprecated

    def interval(self) -> str:
        return f"{'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"

    def check(self, value: object) -> None:
        """Raise ConfigError naming the setting unless `value` is a finite number of its kind in its bounds."""
        if value is None and self.nullable:
            return
        kinds = (int,) if self.kind is int else (int, float)
        if isinstance(value, bool) or not isinstance(value, kinds):
            raise ConfigError(self.name, f"must be {'an integer' if self.kind is int else 'a number'} "
                              f"in {self.interval()}{' or null' if self.nullable else ''}")
        if not math.isfinite(value):
            raise ConfigError(self.name, "must be a finite number")
        below = value <= self.low if self.low_open else value < self.low
        above = value >= self.high if self.high_open else value > self.high
        if below or above:
            raise ConfigError(self.name, f"must be in {self.interval()} (got {value:g})")


# The one table of the edit's settings (bounds: each caps the time or the numbers one request can ask for).
EDIT_SETTINGS: tuple[SettingSpec, ...] = (
    # The replay edit (ecif_core.edit.replay, method "replay"): the training recipe it repeats.
    SettingSpec("replay_epochs", int, None, 1, MAX_REPLAY_EPOCHS, nullable=True,
                meaning="method replay: passes over the training pairs per run (two runs: with and without the set); "
                        "null: the epochs of the checkpoint's training sidecar"),
    SettingSpec("replay_lr", float, None, 0, 1, low_open=True, nullable=True,
                meaning="method replay: the AdamW learning rate (the trainer's warm-up and cosine decay); null: the "
                        "lr of the checkpoint's training sidecar"),
    # Method newton (ecif_core.edit.solver): the damped Newton step.
    SettingSpec("damping", float, None, 0, MAX_DAMPING, nullable=True,
                meaning="lambda added to the Hessian; null: damping_per_removal_curvature x the curvature along "
                        "the removal gradient"),
    # 0.1 was chosen on bench.edit's tuning seed (0.01 met negative curvature in every set). Not the audit's
    # options.damping_per_mean_eigenvalue: that one multiplies the mean eigenvalue of the projected Fisher.
    SettingSpec("damping_per_removal_curvature", float, 0.1, 0, MAX_DAMPING, old_name="damping_factor",
                meaning="lambda as a multiple of the curvature along the removal gradient (when damping is null)"),
    SettingSpec("max_iterations", int, 50, 1, 500,
                meaning="conjugate-gradient iterations (one Hessian-vector pass over the training pairs each)"),
    SettingSpec("tolerance", float, 1e-4, 0, 1, low_open=True, high_open=True,
                meaning="CG stops when |residual| <= tolerance x |removal gradient|"),
    SettingSpec("max_seconds", float, None, 0, MAX_SECONDS, low_open=True, nullable=True,
                meaning="time budget of the solve in seconds (the replay's runs, or the set's gradient and CG; loading "
                        "and the validation check come on top): the replay stops both runs after the same step, CG "
                        "after at least one iteration, and the edit uses what was reached (edit.json: stopped "
                        "\"time budget\"); null: no budget"),
)
SETTING = {spec.name: spec for spec in EDIT_SETTINGS}


def renamed_settings(values: Mapping[str, object], deprecated: bool = True) -> dict[str, object]:
    """`values` with each setting's old name (SettingSpec.old_name) read as its name; None under an
    old name is absent; giving both names is refused. `deprecated`: warn (a person typed it)."""
    out = dict(values)
    for spec in EDIT_SETTINGS:
        if spec.old_name is None or spec.old_name not in out:
            continue
        value = out.pop(spec.old_name)
        if value is None:
            continue
        if out.get(spec.name) is not None:
            raise ConfigError(spec.old_name, f"is the deprecated name of {spec.name}; give only {spec.name}")
        if deprecated:
            warnings.warn(f"{spec.old_name} is deprecated and will be removed: use {spec.name} (same value and "
                          "meaning)", FutureWarning, stacklevel=3)
        out[spec.name] = value
    return out


@dataclass
class EditSettings:
    """How the inverse curvature is applied (defaults and bounds: EDIT_SETTINGS); stored in the edit's sidecar."""

    damping: float | None = SETTING["damping"].default
    damping_per_removal_curvature: float = SETTING["damping_per_removal_curvature"].default
    replay_epochs: int | None = SETTING["replay_epochs"].default
    replay_lr: float | None = SETTING["replay_lr"].default
    max_iterations: int = SETTING["max_iterations"].default
    tolerance: float = SETTING["tolerance"].default
    max_seconds: float | None = SETTING["max_seconds"].default

    def validate(self) -> "EditSettings":
        for spec in EDIT_SETTINGS:
            spec.check(getattr(self, spec.name))
        return self

    @classmethod
    def from_mapping(cls, values: Mapping[str, object], deprecated: bool = True) -> "EditSettings":
        """The settings a mapping holds (a request, a stored record), the others at their defaults; validated.
        Old names are read too (`deprecated`: with a warning; False for records stored before a rename)."""
        values = renamed_settings(values, deprecated)
        return cls(**{spec.name: values[spec.name] for spec in EDIT_SETTINGS if spec.name in values}).validate()

    def as_dict(self) -> dict:
        return {spec.name: getattr(self, spec.name) for spec in EDIT_SETTINGS}
