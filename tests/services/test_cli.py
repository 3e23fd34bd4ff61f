"""The `ecif` verbs end to end: demo at reduced size, train + audit, clear errors."""
import csv
import json

from services.cli import main


def test_demo_runs_end_to_end_at_reduced_size(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "demo"), "--n-train", "96", "--epochs", "2"]) == 0
    out = capsys.readouterr().out
    assert "clip_score (lowest first)" in out and "AUROC" in out and "epochs" in out and "suspected=true" in out
    with (tmp_path / "demo" / "audit" / "ranked.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 96 and rows[0]["rank"] == "1"
    assert (tmp_path / "demo" / "data" / "truth.csv").exists()
    # the audit never sees the ground truth: its manifest names only the pair files
    manifest = json.loads((tmp_path / "demo" / "manifest.json").read_text())
    assert "truth" not in json.dumps(manifest)


def test_train_then_audit_and_error_names_the_field(tmp_path, capsys):
    from ecif_core.datasets.digits import build_digits
    from tests.core.helpers import MICRO_CONFIG

    data = build_digits(tmp_path / "d", fraction=0.2, seed=3, n_train=32, n_val=8, n_test=8)
    (tmp_path / "cfg.json").write_text(json.dumps(MICRO_CONFIG))
    (tmp_path / "exclude.txt").write_text("")
    assert main(["train", "--data", str(data.train), "--model-config", str(tmp_path / "cfg.json"), "--epochs", "1",
                 "--batch-size", "8", "--lr", "1e-3", "--weight-decay", "0.01", "--seed", "1",
                 "--exclude", str(tmp_path / "exclude.txt"), "--out", str(tmp_path / "m.pt")]) == 0
    manifest = {"model": {"checkpoint": "m.pt"}, "train": "d/train.jsonl",
                "options": {"projection": {"k_in": 2, "k_out": 2}}}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    assert main(["audit", str(tmp_path / "manifest.json"), "--out", str(tmp_path / "a"), "--quiet"]) == 0
    assert (tmp_path / "a" / "ranked.csv").exists()
    (tmp_path / "bad.json").write_text(json.dumps({**manifest, "options": {"damping": "high"}}))
    assert main(["audit", str(tmp_path / "bad.json"), "--out", str(tmp_path / "b")]) == 2
    assert "options.damping" in capsys.readouterr().err
