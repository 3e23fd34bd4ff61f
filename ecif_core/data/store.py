"""The Zarr layout of one audit (ARCHITECTURE "Storage"): the only module that knows its keys.

Rows are slots: batch b owns rows [b*B, (b+1)*B), and a shard of S batches owns exactly one
chunk of S*B rows. Different processes writing different shards therefore never share a
chunk. Slots of pairs that are absent (rejected rows, a short last batch) stay zero.
Completion is a per-shard uint8 array with one-element chunks, written after the data, so a
retried shard whose marker is set is skipped and a half-written one is rewritten whole.
A gradients shard of at least 2k rows also writes its k x k partial Fisher sum (`fisher/partial`,
one chunk per shard, float64), so the curvature stage adds S small matrices instead of reading
the N x k rows; a smaller shard's rows are fewer bytes than its sum, and are read instead.

Every array and marker has a typed accessor below; callers never spell a key. Stores made before
an array existed (grads/clip, fisher/partial, validation/examples, a score or term column) stay
readable: their accessors answer None (or skip the array when writing).
"""
from __future__ import annotations

import json
from typing import Any

import numpy as np
import zarr

from ecif_core.evidence import CORRUPTIONS

from ecif_core.data import storage  # noqa: F401 - fsspec settings for object stores (no stale listings)

STAGE_MARKERS = ("gradients", "scores")
SCORE_FIELDS = ("influence", "influence_pos", "influence_neg", "self_influence", "leverage", "leave_own_out",
                "gram_pos_pos", "gram_pos_neg", "gram_neg_neg", "self_influence_clip", "influence_per_example",
                "influence_per_example_mean", "influence_per_example_min")
# Per-pair numbers of the gradients stage; the reference_* ones are NaN when the audit has no reference model.
TERM_FIELDS = ("pos_terms", "neg_terms", "clip_score", "reference_clip_score", "reference_negclip",
               "dropped_partner_mass")
GRADIENT_FIELDS = ("pos", "neg", "clip")  # g_pos, g_neg and the Algorithm 3 test gradient C_n

# Score columns that stay NaN (their fill value: no chunk is written) in an audit without a validation set
VALIDATION_SCORE_FIELDS = ("influence", "influence_pos", "influence_neg", "influence_per_example",
                           "influence_per_example_mean", "influence_per_example_min")
# The keys (groups and arrays); only this module uses them.
GRADS, TERMS, SCORES, DONE = "grads", "terms", "scores", "done"
POS_GRADIENTS, NEG_GRADIENTS, CLIP_GRADIENTS = (f"{GRADS}/{name}" for name in GRADIENT_FIELDS)
FISHER_PARTIAL = "fisher/partial"
CURVATURE, EIGVALS, EIGVECS = "curvature", "curvature/eigvals", "curvature/eigvecs"
VALIDATION_GRAD, VALIDATION_EXAMPLES = "validation/grad", "validation/examples"
# CLIP cosines of the validation pairs, clean and corrupted, per model (calibration.py's null and alternative)
VALIDATION_COSINES = "validation/cosines"
VALIDATION_FEATURES = "validation/features"  # the validation pairs' tower features, when the store keeps features
# The towers' features of each pair (the projections' inputs; models.features.kept_feature_dims), kept by the
# gradients stage when theta lies within the projections: the edit reads them instead of decoding the images.
FEATURE_TOWERS = ("image", "text")
FEATURES = "features"
# delta + lambda each scores shard used; audits made before the rename (CHANGELOG) hold it under the old key
CURVATURE_SHIFT, OLD_CURVATURE_SHIFT = "done/curvature_shift", "done/scores_shift"


def written_bytes(rows: int, dim: int, shards: int, partial_sums: bool, validation_pairs: int = 0,
                  models: int = 1, feature_width: int = 0) -> int:
    """Bytes (uncompressed) of the chunks a finished audit has written in its store: what `create`
    lays out for `rows` slots, `shards` shards and k = `dim`, less what is never written (the k x k
    partial sums of shards too small for them, score columns a validation set would fill), plus
    the curvature and validation arrays. Equals `AuditStore.written_bytes` of the finished store
    (Zarr skips a chunk equal to its fill value; terms and scores are compressed on disk, so the
    folder is somewhat smaller). `validation_pairs`: those in a validation batch of two or more;
    `models`: 2 with a reference model (its validation cosines are kept too); `feature_width`: the image and
    text feature widths added up, when the store keeps the towers' features (`create`'s feature_dims)."""
    f32, f64 = 4, 8
    scores = len(SCORE_FIELDS) - (0 if validation_pairs else len(VALIDATION_SCORE_FIELDS))
    total = rows * (len(GRADIENT_FIELDS) * dim * f32 + len(TERM_FIELDS) * f32 + scores * f64 + feature_width * f32)
    total += shards * (partial_sums * dim * dim * f64 + len(STAGE_MARKERS) + f64)  # sums, markers, shifts
    total += dim * f64 + dim * dim * f64                                            # eigvals, eigvecs
    if validation_pairs:
        total += validation_pairs * dim * f32 + dim * f64                           # examples, mean
        total += models * (1 + len(CORRUPTIONS)) * validation_pairs * f64              # cosines: clean, corrupted
        total += validation_pairs * feature_width * f32                                # features
    return total


def marker_key(stage: str) -> str:
    """The per-shard completion marker of a sharded stage (one of STAGE_MARKERS)."""
    if stage not in STAGE_MARKERS:
        raise ValueError(f"no per-shard marker for stage {stage!r}")
    return f"{DONE}/{stage}"


class AuditStore:
    """Arrays of one audit under a local path or any fsspec URL."""

    def __init__(self, url: str):
        self.url = url
        self.root = zarr.open_group(url, mode="a", zarr_format=3)  # no probes for v2 metadata files
        # Opened arrays by path: each open reads the array's metadata, one request per open in an
        # object store. An instance lives for one stage call; arrays it writes replace their entry.
        self._arrays: dict[str, zarr.Array] = {}

    # ------------------------------------------------------------------ layout
    def create(self, rows: int, dim: int, shard_rows: int, shards: int, attrs: dict[str, Any],
               feature_dims: tuple[int, int] | None = None) -> None:
        """Preallocate every array afresh (prepare calls this only before its plan exists, so
        whatever a crashed earlier prepare left here is replaced). `feature_dims`: (image, text) widths
        of the towers' features to keep per pair; None keeps none."""
        self.root = zarr.open_group(self.url, mode="w", zarr_format=3)
        self._arrays = {}
        for name in GRADIENT_FIELDS:
            self.root.create_array(f"{GRADS}/{name}", shape=(rows, dim), chunks=(shard_rows, dim), dtype="float32",
                                   fill_value=0.0, compressors=None)
        for name in TERM_FIELDS:
            self.root.create_array(f"{TERMS}/{name}", shape=(rows,), chunks=(shard_rows,), dtype="float32",
                                   fill_value=0.0)
        for name in SCORE_FIELDS:
            self.root.create_array(f"{SCORES}/{name}", shape=(rows,), chunks=(shard_rows,), dtype="float64",
                                   fill_value=np.nan)
        # sum over the shard's rows of g_pos g_pos^T (k x k float64 per shard: k^2 x 8 bytes)
        self.root.create_array(FISHER_PARTIAL, shape=(shards, dim, dim), chunks=(1, dim, dim), dtype="float64",
                               fill_value=0.0, compressors=None)
        for stage in STAGE_MARKERS:
            self.root.create_array(marker_key(stage), shape=(shards,), chunks=(1,), dtype="uint8", fill_value=0)
        for tower, width in zip(FEATURE_TOWERS, feature_dims or ()):
            self.root.create_array(f"{FEATURES}/{tower}", shape=(rows, width), chunks=(shard_rows, width),
                                   dtype="float32", fill_value=0.0, compressors=None)
        # delta + lambda each scores shard used (one chunk per shard, like the markers)
        self.root.create_array(CURVATURE_SHIFT, shape=(shards,), chunks=(1,), dtype="float64", fill_value=np.nan)
        self.root.attrs.update({"rows": rows, "dim": dim, "shard_rows": shard_rows, "shards": shards, **attrs})

    @property
    def attrs(self) -> dict[str, Any]:
        return dict(self.root.attrs)

    # ------------------------------------------------------------------ per-shard markers
    def is_done(self, stage: str, shard: int) -> bool:
        return bool(self._array(marker_key(stage))[shard])

    def mark_done(self, stage: str, shard: int) -> None:
        self._array(marker_key(stage))[shard] = 1

    def done_count(self, stage: str) -> int:
        return int(np.asarray(self._array(marker_key(stage))[:]).sum())

    # ------------------------------------------------------------------ gradients stage
    def gradient_fields(self) -> list[str]:
        """The gradient arrays this store has (stores made before C_n lack grads/clip)."""
        return [name for name in GRADIENT_FIELDS if self._has(f"{GRADS}/{name}")]

    def pos_gradients(self, start: int | None = None, stop: int | None = None) -> np.ndarray:
        """Projected g_pos rows [start, stop) (float32, rows x k)."""
        return self._read(POS_GRADIENTS, start, stop)

    def neg_gradients(self, start: int | None = None, stop: int | None = None) -> np.ndarray:
        """Projected g_neg rows [start, stop)."""
        return self._read(NEG_GRADIENTS, start, stop)

    def clip_gradients(self, start: int | None = None, stop: int | None = None) -> np.ndarray | None:
        """Projected C_n rows [start, stop); None for stores made before grads/clip existed."""
        return self._read(CLIP_GRADIENTS, start, stop) if self._has(CLIP_GRADIENTS) else None

    def write_gradients(self, start: int, values: dict[str, np.ndarray]) -> None:
        """Whole shard chunks of the gradient arrays named in `values` (GRADIENT_FIELDS)."""
        self._write_rows(GRADS, start, values)

    def keeps_features(self) -> bool:
        """The store was laid out to keep the towers' features (theta within the projections, made after they
        were kept); whether every shard wrote them is `features_complete`."""
        return all(self._has(f"{FEATURES}/{tower}") for tower in FEATURE_TOWERS)

    def feature_widths(self) -> tuple[int, int] | None:
        """(image, text) widths of the features the store keeps per pair, as `create` laid them out; None when
        it keeps none."""
        if not self.keeps_features():
            return None
        image, text = (self._array(f"{FEATURES}/{tower}").shape[1] for tower in FEATURE_TOWERS)
        return int(image), int(text)

    def features_complete(self) -> bool:
        """Every shard wrote its features (a shard's chunk is never all zero: it holds at least one batch), so
        a shard written without them, by a worker of an earlier release say, is never read as zeros."""
        shards = int(self.attrs["shards"])
        return self.keeps_features() and all(self._array(f"{FEATURES}/{tower}").nchunks_initialized == shards
                                             for tower in FEATURE_TOWERS)

    def write_features(self, start: int, image: np.ndarray, text: np.ndarray) -> None:
        """Whole shard chunks of the (image, text) features."""
        self._write_rows(FEATURES, start, dict(zip(FEATURE_TOWERS, (image, text))))

    def features(self, start: int | None = None, stop: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(image, text) features of rows [start, stop) (float32; zero where no pair holds the slot)."""
        return self._read(f"{FEATURES}/image", start, stop), self._read(f"{FEATURES}/text", start, stop)

    def term_fields(self) -> list[str]:
        """The term columns this store has."""
        return [name for name in TERM_FIELDS if self._has(f"{TERMS}/{name}")]

    def write_terms(self, start: int, values: dict[str, np.ndarray]) -> None:
        self._write_rows(TERMS, start, values)

    def term_column(self, name: str, start: int | None = None, stop: int | None = None) -> np.ndarray | None:
        """A TERM_FIELDS column's rows; None for a store made before the column existed."""
        return self._read(f"{TERMS}/{name}", start, stop) if self._has(f"{TERMS}/{name}") else None

    def has_fisher_partials(self) -> bool:
        """False for stores made before the per-shard partial Fisher sums existed."""
        return self._has(FISHER_PARTIAL)

    def fisher_partial(self, shard: int) -> np.ndarray:
        """The shard's k x k sum of g_pos g_pos^T (float64)."""
        return self._read(FISHER_PARTIAL, shard, shard + 1)[0]

    def write_fisher_partial(self, shard: int, value: np.ndarray) -> None:
        self._array(FISHER_PARTIAL)[shard] = value

    # ------------------------------------------------------------------ curvature stage
    def write_curvature(self, eigvals: np.ndarray, eigvecs: np.ndarray, attrs: dict[str, Any]) -> None:
        """Both factors, then the completion marker (on eigvals, after both arrays)."""
        self._write_whole(EIGVECS, eigvecs)
        self._write_whole(EIGVALS, eigvals, attrs)
        self._mark_complete(EIGVALS)

    def curvature_complete(self) -> bool:
        return self._is_complete(EIGVALS)

    def curvature(self) -> tuple[np.ndarray, np.ndarray]:
        """(eigvals, eigvecs) as stored."""
        return self._read(EIGVALS), self._read(EIGVECS)

    # ------------------------------------------------------------------ validation stage
    def write_validation(self, examples: np.ndarray, grad: np.ndarray, attrs: dict[str, Any],
                         cosines: dict[str, dict[str, np.ndarray]] | None = None,
                         features: tuple[np.ndarray, np.ndarray, list[int]] | None = None) -> None:
        """Per-example validation gradients, the CLIP cosines of clean and corrupted validation pairs
        per model ({model: {kind: values}}), the towers' (image, text) features of the pairs with the
        sizes of their batches (when the store keeps features), the mean gradient (with `attrs`: pairs,
        loss, evidence), then the marker."""
        self._write_whole(VALIDATION_EXAMPLES, examples)
        if features is not None:
            image, text, sizes = features
            self._write_whole(f"{VALIDATION_FEATURES}/image", image, {"batch_sizes": [int(n) for n in sizes]})
            self._write_whole(f"{VALIDATION_FEATURES}/text", text)
        if cosines:
            models, kinds = sorted(cosines), sorted(next(iter(cosines.values())))
            table = np.stack([np.stack([np.asarray(cosines[m][k], dtype=np.float64) for k in kinds]) for m in models])
            self._write_whole(VALIDATION_COSINES, table, {"models": models, "kinds": kinds})
        self._write_whole(VALIDATION_GRAD, grad, attrs)
        self._mark_complete(VALIDATION_GRAD)

    def validation_complete(self) -> bool:
        return self._is_complete(VALIDATION_GRAD)

    def validation_gradient(self) -> np.ndarray:
        """The mean validation gradient grad L' (projected)."""
        return self._read(VALIDATION_GRAD)

    def validation_examples(self) -> np.ndarray | None:
        """Per-example validation gradients; None for stores made before they were kept."""
        return self._read(VALIDATION_EXAMPLES) if self._has(VALIDATION_EXAMPLES) else None

    def validation_features(self) -> tuple[np.ndarray, np.ndarray, list[int]] | None:
        """(image, text) features of the validation pairs in batch order, and the batches' sizes; None when
        the store keeps no features (or was made before they were kept)."""
        if not (self._has(f"{VALIDATION_FEATURES}/image") and self._has(f"{VALIDATION_FEATURES}/text")):
            return None
        image = self._array(f"{VALIDATION_FEATURES}/image")
        return np.asarray(image[...]), self._read(f"{VALIDATION_FEATURES}/text"), list(image.attrs["batch_sizes"])

    def validation_cosines(self) -> dict[str, dict[str, np.ndarray]] | None:
        """{model: {kind: cosines}} of the validation pairs ("clean" and each corruption); None for
        stores made before they were kept."""
        if not self._has(VALIDATION_COSINES):
            return None
        array = self._array(VALIDATION_COSINES)
        table, models, kinds = np.asarray(array[...]), array.attrs["models"], array.attrs["kinds"]
        return {m: {k: table[i, j] for j, k in enumerate(kinds)} for i, m in enumerate(models)}

    def validation_attrs(self) -> dict[str, Any]:
        """pairs, loss and evidence of the validation stage (read afresh)."""
        self._arrays.pop(VALIDATION_GRAD, None)
        return dict(self._array(VALIDATION_GRAD).attrs)

    # ------------------------------------------------------------------ scores stage
    def score_fields(self) -> list[str]:
        """The score columns this store has."""
        return [name for name in SCORE_FIELDS if self._has(f"{SCORES}/{name}")]

    def write_scores(self, start: int, values: dict[str, np.ndarray]) -> None:
        self._write_rows(SCORES, start, values)

    def score_column(self, name: str, start: int | None = None, stop: int | None = None) -> np.ndarray | None:
        """A SCORE_FIELDS column's rows; None for a store made before the column existed."""
        return self._read(f"{SCORES}/{name}", start, stop) if self._has(f"{SCORES}/{name}") else None

    def _shift_key(self) -> str:
        return OLD_CURVATURE_SHIFT if not self._has(CURVATURE_SHIFT) and self._has(OLD_CURVATURE_SHIFT) \
            else CURVATURE_SHIFT

    def write_curvature_shift(self, shard: int, value: float) -> None:
        """The delta + lambda the shard was scored with (under the old key in audits made before the rename)."""
        self._array(self._shift_key())[shard] = value

    def curvature_shifts(self) -> np.ndarray:
        """delta + lambda per scored shard (NaN where not scored)."""
        return self._read(self._shift_key())

    def written_bytes(self) -> int:
        """Bytes (uncompressed) of the chunks written so far, over every array (`written_bytes` above)."""
        total = 0
        for _, member in self.root.members(max_depth=None):
            if isinstance(member, zarr.Array):
                total += member.nchunks_initialized * int(np.prod(member.chunks)) * member.dtype.itemsize
        return total

    # ------------------------------------------------------------------ generic helpers (keys stay here)
    def _array(self, path: str) -> zarr.Array:
        """The array at `path`, opened once per instance."""
        found = self._arrays.get(path)
        if found is None:
            found = self._arrays[path] = self.root[path]
        return found

    def _write_rows(self, group: str, start: int, values: dict[str, np.ndarray]) -> None:
        """Write whole shard chunks of several arrays of one group."""
        for name, value in values.items():
            self._array(f"{group}/{name}")[start:start + len(value)] = value

    def _has(self, path: str) -> bool:
        """True when the array exists (stores made before an array was added lack it)."""
        if path in self._arrays:
            return True
        try:
            self._array(path)
        except KeyError:
            return False
        return True

    def _read(self, path: str, start: int | None = None, stop: int | None = None) -> np.ndarray:
        return np.asarray(self._array(path)[start:stop])

    def _write_whole(self, path: str, value: np.ndarray, attrs: dict[str, Any] | None = None) -> None:
        """A small whole array (curvature factors, validation gradient), replaced atomically enough
        for our use: readers only look after the stage that writes it has finished."""
        array = self.root.create_array(path, shape=value.shape, dtype=value.dtype, overwrite=True,
                                       chunks=value.shape if value.ndim else None, compressors=None)
        array[...] = value
        if attrs:
            array.attrs.update(json.loads(json.dumps(attrs)))
        self._arrays[path] = array

    def _mark_complete(self, path: str) -> None:
        """Set after a whole-array stage wrote its data: its completion marker."""
        self._array(path).attrs["complete"] = True

    def _is_complete(self, path: str) -> bool:
        """True only once _mark_complete ran; an array that exists but was cut short is not.
        Read afresh (never from this instance's cache): another process may complete it."""
        self._arrays.pop(path, None)
        return self._has(path) and bool(self._array(path).attrs.get("complete", False))
