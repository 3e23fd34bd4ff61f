"""The audit store's layout has one home (ecif_core/data/store.py): no other module spells a Zarr key,
and folders written before an array existed stay readable through the typed accessors."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import numpy as np

import ecif_core
from ecif_core.data import store as keys
from ecif_core.data.store import AuditStore

ROOT = Path(ecif_core.__file__).parent.parent
SCANNED = ("ecif_core", "services", "workers", "bench", "tests")
# every top-level group of the layout, read from the store's own key constants
GROUPS = sorted({key.split("/")[0] for key in (keys.POS_GRADIENTS, keys.FISHER_PARTIAL, keys.EIGVALS,
                                                 keys.VALIDATION_GRAD, keys.CURVATURE_SHIFT, keys.OLD_CURVATURE_SHIFT,
                                                 keys.marker_key("scores"))} | {keys.TERMS, keys.SCORES, keys.FEATURES})
KEY_LITERAL = re.compile(rf"^({'|'.join(GROUPS)})/")


def key_literals(path: Path) -> list[str]:
    """String constants (f-string parts included) of `path` that start like a Zarr key."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and KEY_LITERAL.match(node.value):
            found.append(f"{path}:{node.lineno}: {node.value!r}")
    return found


def test_no_zarr_key_literal_outside_the_store():
    home = Path(keys.__file__).resolve()
    offenders = [hit for package in SCANNED if (ROOT / package).is_dir()
                 for path in sorted((ROOT / package).rglob("*.py")) if path.resolve() != home
                 for hit in key_literals(path)]
    assert not offenders, "Zarr keys belong in ecif_core/data/store.py (use its accessors):\n" + "\n".join(offenders)


def test_the_scan_sees_a_key_literal(tmp_path):
    """The guard above is real: a module spelling a key is reported, with and without an f-string."""
    probe = tmp_path / "probe.py"
    probe.write_text('A = "grads/pos"\nB = f"done/{1}"\nC = "curvature/eigvals"\nD = "my/path"\n')
    assert sorted(hit.rsplit(": ", 1)[1] for hit in key_literals(probe)) == ["'curvature/eigvals'", "'done/'",
                                                                            "'grads/pos'"]


def test_old_stores_read_through_the_accessors(tmp_path):
    """A folder made before grads/clip, validation/examples and the curvature_shift rename: the
    accessors answer None for the missing arrays and read and write the shift under its old key."""
    url = str(tmp_path / "store.zarr")
    AuditStore(url).create(rows=8, dim=2, shard_rows=4, shards=2, attrs={})
    old = AuditStore(url)
    old.write_validation(np.ones((3, 2)), np.ones(2), {"loss": 0.5})
    del old.root[keys.CLIP_GRADIENTS]
    del old.root[keys.VALIDATION_EXAMPLES]
    del old.root[keys.CURVATURE_SHIFT]
    old.root.create_array(keys.OLD_CURVATURE_SHIFT, shape=(2,), chunks=(1,), dtype="float64", fill_value=np.nan)
    old.root[keys.OLD_CURVATURE_SHIFT][0] = 0.25

    store = AuditStore(url)
    assert store.clip_gradients(0, 4) is None and store.gradient_fields() == ["pos", "neg"]
    assert store.validation_examples() is None and store.validation_attrs()["loss"] == 0.5
    store.write_curvature_shift(1, 0.5)
    np.testing.assert_array_equal(AuditStore(url).curvature_shifts(), [0.25, 0.5])
    assert keys.CURVATURE_SHIFT not in AuditStore(url).root  # an old folder is not given a second copy

    fresh = AuditStore(str(tmp_path / "new.zarr"))
    fresh.create(rows=8, dim=2, shard_rows=4, shards=2, attrs={})
    fresh.write_curvature_shift(0, 0.75)
    assert AuditStore(fresh.url).curvature_shifts()[0] == 0.75 and keys.OLD_CURVATURE_SHIFT not in fresh.root
    np.testing.assert_array_equal(fresh.clip_gradients(0, 4), np.zeros((4, 2), np.float32))
