"""The checks a manifest passes before an audit reads an image: the service runs them at
submit (after confining every path to its data roots), `ecif validate` reports them and
`ecif audit` runs them first. One function, so a manifest one of them accepts the others accept,
and a checkpoint of another architecture fails in seconds rather than at the gradients stage."""
from __future__ import annotations

from itertools import islice
from pathlib import Path
from typing import Sequence

from ecif_core.data.manifest import Manifest
from ecif_core.data.formats import read_pair_rows, source_of
from ecif_core.data.sources import EMPTY_SOURCE, check_batchable
from ecif_core.errors import ConfigError
from ecif_core.models.check import MAX_GRADIENT_DIM, check_model_spec

PAIR_FIELDS = ("train", "validation")  # the manifest's pair sources (a file, or webdataset shards)


def check_before_audit(manifest: Manifest, roots: Sequence[Path] | None = None,
                       max_dim: int = MAX_GRADIENT_DIM) -> int:
    """Raise ConfigError naming the field when the audit cannot run; returns the dimension k of
    the projected gradients. Reads at most two rows of each pair file (opened through `roots`
    when given, as a worker opens it) and the checkpoint's header, never an image or a weight:
    - a pair file with no row, or with a single row (no contrastive batch);
    - the model: config or arch, checkpoint keys and block counts, adapter, gradient size."""
    for name in PAIR_FIELDS:
        value = getattr(manifest, name)
        source = None if value is None else source_of(value, name)
        if source is None or source.format == "webdataset":
            continue  # shards are counted and confined at submit; their rows are read by prepare
        rows = _first_rows(source, name, roots, 2)
        if rows == 0:
            raise ConfigError(name, EMPTY_SOURCE)
        if rows < 2:  # a contrastive batch (of training or validation pairs) needs two
            check_batchable(name, rows, rows, ())
    return check_model_spec(manifest, max_dim)


def _first_rows(source, name: str, roots: Sequence[Path] | None, limit: int) -> int:
    """How many rows the source has, counting no further than `limit` (readable or not)."""
    rows = read_pair_rows(source, name, roots)
    try:
        return sum(1 for _ in islice(rows, limit))
    finally:
        rows.close()
