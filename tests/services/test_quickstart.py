"""README's quickstart, run as written (issue 26): the blocks between its `quickstart:begin` and
`quickstart:end` markers are read from README.md itself (never a copy), so a change to the manifest,
the commands or the Python example that breaks them fails here.

The workspace is what a curator who fine-tuned with open_clip has: a base model (the reference,
trained on clean digits), a checkpoint fine-tuned from it saved as open_clip's training script saves
it (`{"epoch", "name", "state_dict", "optimizer"}`, DDP's `module.` prefixes), and JSONL pairs with
real images, 20% of the training captions shuffled. Only the files the README's manifest names are
made, at the paths it names.
"""
from __future__ import annotations

import csv
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import one_thread_env

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
N_TRAIN, N_VAL, N_BASE = 320, 100, 600   # digits pairs: audited train, clean validation, the base's own
FRACTION = 0.2                           # shuffled training captions


def quickstart_blocks() -> dict[str, str]:
    """The fenced code blocks of README's quickstart, by language (json, bash, python), as written."""
    text = README.read_text(encoding="utf-8")
    region = re.search(r"<!-- quickstart:begin.*?-->\n(.*?)<!-- quickstart:end -->", text, re.DOTALL)
    assert region, "README lost its quickstart markers"
    blocks = re.findall(r"^```(\w+)\n(.*?)^```$", region.group(1), re.DOTALL | re.MULTILINE)
    languages = [language for language, _ in blocks]
    assert sorted(languages) == ["bash", "json", "python"], f"quickstart blocks changed: {languages}"
    return dict(blocks)


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ECIF_")}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]))
    return one_thread_env(env)


def _open_clip_training_checkpoint(state: dict, epoch: int) -> dict:
    """What open_clip's training script saves (src/open_clip_train/main.py) under DDP."""
    return {"epoch": epoch, "name": "2026_01_01-my-run", "optimizer": {"state": {}, "param_groups": []},
            "state_dict": {f"module.{key}": value for key, value in state.items()}}


def _pair_file(rows_file: Path, target: Path) -> None:
    """The digits rows written at `target`, their image paths relative to `target`'s folder."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with target.open("w", encoding="utf-8") as handle:
        for line in rows_file.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            row["image"] = os.path.relpath(rows_file.parent / row["image"], target.parent)
            handle.write(json.dumps(row) + "\n")


def _zero_shot_accuracy(loaded, pairs_file: Path, truth: dict[str, int]) -> float:
    """Share of the file's images whose class prompt is the nearest: the model learned digits."""
    import torch
    from PIL import Image

    from ecif_core.datasets.digits import class_prompts

    rows = [json.loads(line) for line in pairs_file.read_text().splitlines()]
    with torch.no_grad():
        images = torch.stack([loaded.preprocess(Image.open(pairs_file.parent / r["image"])) for r in rows])
        text = torch.nn.functional.normalize(loaded.model.encode_text(loaded.tokenizer(class_prompts())), dim=-1)
        image = torch.nn.functional.normalize(loaded.model.encode_image(images), dim=-1)
        predicted = (image @ text.T).argmax(dim=1).tolist()
    return sum(p == truth[r["id"]] for p, r in zip(predicted, rows)) / len(rows)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> dict:
    """A folder holding manifest.json (README's block) and every file it names."""
    import torch

    from ecif_core.datasets.digits import build_digits, read_truth
    from ecif_core.demo import tiny_model_config
    from ecif_core.models.factory import load_model
    from ecif_core.train import TrainConfig, train

    blocks = quickstart_blocks()
    manifest = json.loads(blocks["json"])
    folder = tmp_path_factory.mktemp("quickstart").resolve()
    scratch = tmp_path_factory.mktemp("scratch").resolve()
    (folder / "manifest.json").write_text(blocks["json"], encoding="utf-8")

    config = tiny_model_config()
    for model in (manifest["model"], manifest["reference"]):
        assert "config" in model, "the test builds the tiny model from the manifest's `config` file"
        (folder / model["config"]).parent.mkdir(parents=True, exist_ok=True)
        (folder / model["config"]).write_text(json.dumps(config), encoding="utf-8")

    data = build_digits(scratch / "digits", corruption="shuffle", fraction=FRACTION, seed=0,
                        n_train=N_TRAIN, n_val=N_VAL, n_test=N_BASE)
    _pair_file(data.train, folder / manifest["train"])
    _pair_file(data.validation, folder / manifest["validation"])

    # The base: trained on clean digits the audit never sees (the test split), saved as plain weights.
    batch_size = (manifest.get("options") or {}).get("batch_size", 32)
    cfg_path = scratch / "cfg.json"
    cfg_path.write_text(json.dumps(config))
    train(data.test, cfg_path, scratch / "base.pt", TrainConfig(epochs=40, batch_size=batch_size, lr=2e-3, seed=1))
    base_state = load_model(config=config, checkpoint=scratch / "base.pt").model.state_dict()
    (folder / manifest["reference"]["checkpoint"]).parent.mkdir(parents=True, exist_ok=True)
    torch.save(base_state, folder / manifest["reference"]["checkpoint"])

    # The audited model: fine-tuned from the base on the corrupted pairs, saved as open_clip does.
    epochs = 6
    train(data.train, cfg_path, scratch / "finetuned.pt",
          TrainConfig(epochs=epochs, batch_size=batch_size, lr=1e-3, seed=2), init=scratch / "base.pt")
    finetuned = load_model(config=config, checkpoint=scratch / "finetuned.pt")
    checkpoint = folder / manifest["model"]["checkpoint"]
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    torch.save(_open_clip_training_checkpoint(finetuned.model.state_dict(), epochs), checkpoint)

    with open(data.truth, encoding="utf-8") as handle:
        labels = {row["id"]: int(row["label"]) for row in csv.DictReader(handle)}
    corrupted = {key for key, bad in read_truth(data.truth).items() if bad}
    return {"folder": folder, "blocks": blocks, "corrupted": corrupted,
            "train_ids": [json.loads(line)["id"] for line in data.train.read_text().splitlines()],
            "accuracy": _zero_shot_accuracy(finetuned, data.validation, labels)}


def _run_shell_block(block: str, cwd: Path) -> dict[str, list[str]]:
    """Run each `ecif ...` line of the block (comments dropped) as the installed command would;
    returns each verb's arguments and its stdout."""
    runs = {}
    for line in block.splitlines():
        argv = shlex.split(line, comments=True)
        if not argv:
            continue
        assert argv[0] == "ecif", f"the quickstart's shell block runs only ecif commands: {line}"
        result = subprocess.run([sys.executable, "-m", "services.cli", *argv[1:]], cwd=cwd, env=_env(),
                                capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, f"{line}\n{result.stderr}"
        assert "Traceback" not in result.stderr
        runs[argv[1]] = (argv[2:], result.stdout)
    return runs


# Runs the README's Python block as written and reports the names it bound (ranked, flagged).
DRIVER = """
import json, sys
names = {}
exec(compile(sys.stdin.read(), "README.md quickstart", "exec"), names)
print(json.dumps({"ranked": str(names["ranked"]), "flagged": [row["id"] for row in names["flagged"]]}))
"""


def _option(argv: list[str], name: str) -> str:
    """The value of `name` in argv, written `--out DIR` or `--out=DIR`."""
    for i, arg in enumerate(argv):
        if arg == name:
            return argv[i + 1]
        if arg.startswith(f"{name}="):
            return arg.split("=", 1)[1]
    raise AssertionError(f"no {name} in {argv}")


def _auroc(scores: list[float], positives: list[bool]) -> float:
    from ecif_core.metrics import auroc

    return auroc(scores, [int(p) for p in positives])


def test_the_readme_quickstart_audits_an_open_clip_checkpoint_as_written(workspace):
    folder = workspace["folder"]
    assert workspace["accuracy"] > 0.5, f"the fine-tuned model did not learn digits: {workspace['accuracy']}"

    runs = _run_shell_block(workspace["blocks"]["bash"], folder)
    assert list(runs) == ["validate", "audit"]
    report = json.loads(runs["validate"][1])
    assert report["train"]["usable"] == N_TRAIN and report["train"]["images"]["missing"] == 0

    audit_dir = folder / _option(runs["audit"][0], "--out")
    ranked = audit_dir / "ranked.csv"
    with ranked.open(encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert (audit_dir / "report.html").exists()
    assert sorted(r["id"] for r in rows) == sorted(workspace["train_ids"])       # one row per usable pair
    assert [int(r["rank"]) for r in rows] == list(range(1, N_TRAIN + 1))
    assert "suspected" in rows[0] and {r["suspected"] for r in rows} <= {"true", "false"}
    # A correct audit: the shuffled captions rank high, and the flag finds mostly them.
    corrupted = [r["id"] in workspace["corrupted"] for r in rows]
    assert _auroc([-int(r["rank"]) for r in rows], corrupted) > 0.8
    flagged = [r["id"] for r in rows if r["suspected"] == "true"]
    assert flagged and sum(i in workspace["corrupted"] for i in flagged) / len(flagged) > 0.7

    # The Python example as written, in the same folder: the same audit again, the same flags.
    python = subprocess.run([sys.executable, "-c", DRIVER], input=workspace["blocks"]["python"], cwd=folder,
                            env=_env(), capture_output=True, text=True, timeout=900)
    assert python.returncode == 0, python.stderr
    bound = json.loads(python.stdout.splitlines()[-1])
    assert Path(folder / bound["ranked"]).resolve() == ranked.resolve()
    assert bound["flagged"] == flagged
