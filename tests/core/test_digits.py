"""The digits image-text set: layout, exact corruption counts and kinds, determinism, validation."""
from __future__ import annotations

import csv
import inspect
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ecif_core.datasets import CLOSE_CLASS, DigitsDataset, build_digits, class_prompts, label_of_caption, read_truth

N_TRAIN = 300  # small splits keep the number of PNG files (and pytest's tmp cleanup) small
SMALL = {"n_train": N_TRAIN, "n_val": 20, "n_test": 20}


def _rows(path: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _truth(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def shuffled(tmp_path_factory: pytest.TempPathFactory) -> DigitsDataset:
    return build_digits(tmp_path_factory.mktemp("shuffle"), corruption="shuffle", fraction=0.2, seed=3, n_train=N_TRAIN,
                        n_val=100, n_test=97)


def test_files_exist_and_rows_parse(shuffled: DigitsDataset) -> None:
    assert shuffled.train == shuffled.root / "train.jsonl" and shuffled.truth == shuffled.root / "truth.csv"
    sizes = {}
    for name, path in (("train", shuffled.train), ("val", shuffled.validation), ("test", shuffled.test)):
        rows = _rows(path)
        sizes[name] = len(rows)
        for row in rows:
            assert list(row) == ["id", "image", "caption"]
            assert row["image"] == f"images/{row['id']}.png"
            assert (path.parent / row["image"]).is_file()
            assert 0 <= label_of_caption(row["caption"]) <= 9
    assert sizes == {"train": N_TRAIN, "val": 100, "test": 97}
    with open(shuffled.truth, encoding="utf-8") as handle:
        assert handle.readline().strip() == "id,split,label,caption_label,corrupted"


def test_default_split_sizes() -> None:
    defaults = {k: v.default for k, v in inspect.signature(build_digits).parameters.items()}
    assert (defaults["n_train"], defaults["n_val"], defaults["n_test"]) == (None, 300, 297)


def test_train_defaults_to_every_remaining_row(tmp_path: Path) -> None:
    data = build_digits(tmp_path, n_val=850, n_test=850, image_size=8)  # 1797 - 1700 = 97 train rows
    assert len(_rows(data.train)) == 97
    assert sum(read_truth(data.truth).values()) == round(0.2 * 97)


def test_ids_unique_and_disjoint_across_splits(shuffled: DigitsDataset) -> None:
    ids = [row["id"] for path in (shuffled.train, shuffled.validation, shuffled.test) for row in _rows(path)]
    assert len(ids) == len(set(ids))
    truth_ids = [row["id"] for row in _truth(shuffled.truth)]
    assert sorted(truth_ids) == sorted(ids)


def test_split_is_roughly_stratified(shuffled: DigitsDataset) -> None:
    from sklearn.datasets import load_digits

    shares = np.bincount(load_digits().target, minlength=10) / 1797
    for split in ("train", "val", "test"):
        counts = np.bincount([int(r["label"]) for r in _truth(shuffled.truth) if r["split"] == split], minlength=10)
        assert np.all(np.abs(counts - shares * counts.sum()) <= 2), (split, counts)


def test_shuffle_corrupts_exactly_the_fraction_with_other_class_captions(shuffled: DigitsDataset) -> None:
    truth = {row["id"]: row for row in _truth(shuffled.truth)}
    captions = {row["id"]: row["caption"] for row in _rows(shuffled.train)}
    corrupted = read_truth(shuffled.truth)
    assert set(corrupted) == set(captions)
    assert sum(corrupted.values()) == round(0.2 * N_TRAIN)
    for image_id, caption in captions.items():
        named, label = label_of_caption(caption), int(truth[image_id]["label"])
        assert named == int(truth[image_id]["caption_label"])
        assert (named != label) == corrupted[image_id]


def test_validation_and_test_captions_are_clean(shuffled: DigitsDataset) -> None:
    truth = {row["id"]: row for row in _truth(shuffled.truth)}
    for path in (shuffled.validation, shuffled.test):
        for row in _rows(path):
            assert label_of_caption(row["caption"]) == int(truth[row["id"]]["label"])
            assert truth[row["id"]]["corrupted"] == "0"


def test_swap_only_touches_named_classes_and_maps_a_to_b(tmp_path: Path) -> None:
    pairs = ((1, 7), (3, 8))
    data = build_digits(tmp_path, corruption="swap", fraction=0.1, seed=1, class_pairs=pairs, image_size=8, **SMALL)
    partner = {1: 7, 7: 1, 3: 8, 8: 3}
    bad = [r for r in _truth(data.truth) if r["corrupted"] == "1"]
    assert len(bad) == round(0.1 * N_TRAIN)
    assert all(r["split"] == "train" for r in bad)
    for row in bad:
        assert partner[int(row["label"])] == int(row["caption_label"])


def test_swap_fraction_beyond_the_named_classes_raises(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="fraction"):
        build_digits(tmp_path, corruption="swap", fraction=0.5, class_pairs=((1, 7),), image_size=8, **SMALL)


def test_close_follows_the_confusion_map(tmp_path: Path) -> None:
    data = build_digits(tmp_path, corruption="close", fraction=0.3, seed=2, image_size=8, **SMALL)
    truth = _truth(data.truth)
    bad = [r for r in truth if r["corrupted"] == "1"]
    assert len(bad) == round(0.3 * N_TRAIN)
    assert CLOSE_CLASS == (6, 7, 7, 8, 9, 6, 5, 1, 3, 4)
    for row in bad:
        assert int(row["caption_label"]) == CLOSE_CLASS[int(row["label"])]
    captions = {r["id"]: r["caption"] for r in _rows(data.train)}
    for row in truth:
        if row["split"] == "train":
            assert label_of_caption(captions[row["id"]]) == int(row["caption_label"])


def test_no_corruption_leaves_every_caption_clean(tmp_path: Path) -> None:
    data = build_digits(tmp_path, corruption=None, image_size=8, **SMALL)
    assert not any(read_truth(data.truth).values())
    assert all(r["label"] == r["caption_label"] for r in _truth(data.truth))


def test_same_arguments_give_identical_bytes(tmp_path: Path) -> None:
    first = build_digits(tmp_path / "a", seed=5, image_size=16, n_train=200, n_val=20, n_test=20)
    second = build_digits(tmp_path / "b", seed=5, image_size=16, n_train=200, n_val=20, n_test=20)
    for name in ("train.jsonl", "val.jsonl", "test.jsonl", "truth.csv"):
        assert (first.root / name).read_bytes() == (second.root / name).read_bytes(), name
    for row in _rows(first.train)[:20]:
        assert (first.root / row["image"]).read_bytes() == (second.root / row["image"]).read_bytes()
    other = build_digits(tmp_path / "c", seed=6, image_size=16, n_train=200, n_val=20, n_test=20)
    assert other.train.read_bytes() != first.train.read_bytes()


def test_images_decode_at_the_requested_size(tmp_path: Path) -> None:
    data = build_digits(tmp_path, n_train=50, n_val=5, n_test=5, image_size=24, fraction=0.1)
    for row in _rows(data.train)[:10] + _rows(data.test):
        with Image.open(data.root / row["image"]) as image:
            image.load()
            assert image.size == (24, 24)
            pixels = np.asarray(image)
            assert pixels.max() > 100  # a visible digit, not a blank frame


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"corruption": "flip"}, "corruption"),
        ({"fraction": 1.0}, "fraction"),
        ({"fraction": -0.1}, "fraction"),
        ({"fraction": float("nan")}, "fraction"),
        ({"image_size": 0}, "image_size"),
        ({"n_train": 0}, "n_train"),
        ({"n_train": 5000}, "n_train"),
        ({"n_val": -1}, "n_val"),
        ({"n_val": 1000, "n_test": 797}, "n_val"),
        ({"class_pairs": ((1, 1),)}, "class_pairs"),
        ({"class_pairs": ((1, 7), (7, 2))}, "class_pairs"),
        ({"corruption": "shuffle", "fraction": 0.001, "n_train": 1000}, "fraction"),  # one pair cannot be deranged
    ],
)
def test_bad_arguments_raise_value_error_naming_the_argument(tmp_path: Path, kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        build_digits(tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()  # checked before anything is written


def test_prompts_and_caption_parsing() -> None:
    prompts = class_prompts()
    assert len(prompts) == 10 and prompts[0] == "a photo of the digit zero"
    assert [label_of_caption(p) for p in prompts] == list(range(10))
    assert label_of_caption("the number 7") == 7
    with pytest.raises(ValueError, match="caption"):
        label_of_caption("a photo of a cat")
    with pytest.raises(ValueError, match="caption"):
        label_of_caption("one or two")


@pytest.mark.parametrize("seed", range(4))
def test_shuffle_with_few_corrupted_pairs_still_changes_every_class(tmp_path: Path, seed: int) -> None:
    # 2 and 3 corrupted pairs: the draw must avoid sets where one class holds more than half.
    for fraction, expected in ((0.07, 2), (0.1, 3)):
        data = build_digits(tmp_path / str(fraction), fraction=fraction, seed=seed, n_train=30, n_val=5, n_test=5, image_size=8)
        bad = [r for r in _truth(data.truth) if r["corrupted"] == "1"]
        assert len(bad) == expected
        assert all(r["label"] != r["caption_label"] for r in bad)
