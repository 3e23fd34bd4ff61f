"""The Zarr layout of one audit (ARCHITECTURE "Storage").

Rows are slots: batch b owns rows [b*B, (b+1)*B), and a shard of S batches owns exactly one
chunk of S*B rows. Different processes writing different shards therefore never share a
chunk. Slots of pairs that are absent (rejected rows, a short last batch) stay zero.
Completion is a per-shard uint8 array with one-element chunks, written after the data, so a
retried shard whose marker is set is skipped and a half-written one is rewritten whole.
A gradients shard of at least 2k rows also writes its k x k partial Fisher sum (`fisher/partial`,
one chunk per shard, float64), so the curvature stage adds S small matrices instead of reading
the N x k rows; a smaller shard's rows are fewer bytes than its sum, and are read instead.
"""
from __future__ import annotations

import json
from typing import Any

import numpy as np
import zarr

from ecif_core.data import storage  # noqa: F401 - fsspec settings for object stores (no stale listings)

STAGE_MARKERS = ("gradients", "scores")
SCORE_FIELDS = ("influence", "influence_pos", "influence_neg", "self_influence", "leverage", "leave_own_out",
                "gram_pos_pos", "gram_pos_neg", "gram_neg_neg", "self_influence_clip", "influence_per_example",
                "influence_per_example_mean", "influence_per_example_min")
# Per-pair numbers of the gradients stage; the reference_* ones are NaN when the audit has no reference model.
TERM_FIELDS = ("pos_terms", "neg_terms", "clip_score", "reference_clip_score", "reference_negclip")
GRADIENT_FIELDS = ("pos", "neg", "clip")  # g_pos, g_neg and the Algorithm 3 test gradient C_n


class AuditStore:
    """Arrays of one audit under a local path or any fsspec URL."""

    def __init__(self, url: str):
        self.url = url
        self.root = zarr.open_group(url, mode="a", zarr_format=3)  # no probes for v2 metadata files
        # Opened arrays by path: each open reads the array's metadata, one request per open in an
        # object store. An instance lives for one stage call; arrays it writes replace their entry.
        self._arrays: dict[str, zarr.Array] = {}

    def array(self, path: str) -> zarr.Array:
        """The array at `path`, opened once per instance."""
        found = self._arrays.get(path)
        if found is None:
            found = self._arrays[path] = self.root[path]
        return found

    def create(self, rows: int, dim: int, shard_rows: int, shards: int, attrs: dict[str, Any]) -> None:
        """Preallocate every array afresh (prepare calls this only before its plan exists, so
        whatever a crashed earlier prepare left here is replaced)."""
        self.root = zarr.open_group(self.url, mode="w", zarr_format=3)
        self._arrays = {}
        for name in GRADIENT_FIELDS:
            self.root.create_array(f"grads/{name}", shape=(rows, dim), chunks=(shard_rows, dim), dtype="float32",
                                   fill_value=0.0, compressors=None)
        for name in TERM_FIELDS:
            self.root.create_array(f"terms/{name}", shape=(rows,), chunks=(shard_rows,), dtype="float32",
                                   fill_value=0.0)
        for name in SCORE_FIELDS:
            self.root.create_array(f"scores/{name}", shape=(rows,), chunks=(shard_rows,), dtype="float64",
                                   fill_value=np.nan)
        # sum over the shard's rows of g_pos g_pos^T (k x k float64 per shard: k^2 x 8 bytes)
        self.root.create_array("fisher/partial", shape=(shards, dim, dim), chunks=(1, dim, dim), dtype="float64",
                               fill_value=0.0, compressors=None)
        for stage in STAGE_MARKERS:
            self.root.create_array(f"done/{stage}", shape=(shards,), chunks=(1,), dtype="uint8", fill_value=0)
        # delta + lambda each scores shard used (one chunk per shard, like the markers)
        self.root.create_array("done/scores_shift", shape=(shards,), chunks=(1,), dtype="float64", fill_value=np.nan)
        self.root.attrs.update({"rows": rows, "dim": dim, "shard_rows": shard_rows, "shards": shards, **attrs})

    @property
    def attrs(self) -> dict[str, Any]:
        return dict(self.root.attrs)

    def is_done(self, stage: str, shard: int) -> bool:
        return bool(self.array(f"done/{stage}")[shard])

    def mark_done(self, stage: str, shard: int) -> None:
        self.array(f"done/{stage}")[shard] = 1

    def done_count(self, stage: str) -> int:
        return int(np.asarray(self.array(f"done/{stage}")[:]).sum())

    def write_rows(self, group: str, start: int, values: dict[str, np.ndarray]) -> None:
        """Write whole shard chunks of several arrays of one group."""
        for name, value in values.items():
            self.array(f"{group}/{name}")[start:start + len(value)] = value

    def has(self, path: str) -> bool:
        """True when the array exists (stores made before an array was added lack it)."""
        if path in self._arrays:
            return True
        try:
            self.array(path)
        except KeyError:
            return False
        return True

    def read_rows(self, path: str, start: int | None = None, stop: int | None = None) -> np.ndarray:
        return np.asarray(self.array(path)[start:stop])

    def write_array(self, path: str, value: np.ndarray, attrs: dict[str, Any] | None = None) -> None:
        """A small whole array (curvature factors, validation gradient), replaced atomically enough
        for our use: readers only look after the stage that writes it has finished."""
        array = self.root.create_array(path, shape=value.shape, dtype=value.dtype, overwrite=True,
                                       chunks=value.shape if value.ndim else None, compressors=None)
        array[...] = value
        if attrs:
            array.attrs.update(json.loads(json.dumps(attrs)))
        self._arrays[path] = array

    def mark_complete(self, path: str) -> None:
        """Set after a whole-array stage wrote its data: its completion marker."""
        self.array(path).attrs["complete"] = True

    def is_complete(self, path: str) -> bool:
        """True only once mark_complete ran; an array that exists but was cut short is not.
        Read afresh (never from this instance's cache): another process may complete it."""
        self._arrays.pop(path, None)
        return self.has(path) and bool(self.array(path).attrs.get("complete", False))
