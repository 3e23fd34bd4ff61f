"""`ecif preview` and `ecif edit` on an embedded audit folder: removal specs, the edited checkpoint
loading with open_clip and auditing again, the audit left untouched, and bad specs naming the field."""
from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import pytest
import torch

from services.cli import main


def _digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != "ecif.db"):
        digest.update(str(path.relative_to(folder)).encode() + path.read_bytes())
    return digest.hexdigest()


def _ranked(audit: Path) -> list[dict]:
    with (audit / "ranked.csv").open() as handle:
        return list(csv.DictReader(handle))


def test_preview_sums_the_stored_influence_of_the_chosen_pairs(embedded_csv, capsys):
    audit = embedded_csv.parent
    assert main(["preview", "--audit-dir", str(audit), "--remove", "top:10:influence"]) == 0
    result = json.loads(capsys.readouterr().out)
    rows = _ranked(audit)
    harmful = sorted(rows, key=lambda r: float(r["influence"]))[:10]  # most negative = most harmful
    assert result["pairs"] == 10
    assert result["predicted_validation_change"] == pytest.approx(sum(float(r["influence"]) for r in harmful), rel=1e-6)
    assert result["predicted_validation_change"] < 0
    assert main(["preview", "--audit-dir", str(audit), "--remove", "bottom:10:influence"]) == 0
    assert json.loads(capsys.readouterr().out)["predicted_validation_change"] > 0


def test_estimated_without_an_estimate_says_why_and_what_to_use(embedded_csv, capsys):
    """The fixture's tiny model cannot count its misaligned pairs (summary.json says why); `estimated` then
    fails in one sentence with that reason (the estimable case: tests/core/test_edit.py)."""
    audit = embedded_csv.parent
    summary = json.loads((audit / "summary.json").read_text())
    assert not summary["estimable"] and summary["reason"]
    assert main(["preview", "--audit-dir", str(audit), "--remove", "estimated"]) == 2
    err = capsys.readouterr().err
    assert "remove:" in err and summary["reason"] in err and "use suspected or top:Q:rank" in err
    assert "Traceback" not in err


def test_edit_writes_a_checkpoint_that_loads_and_audits_again(data_root, embedded_csv, tmp_path, capsys):
    audit = embedded_csv.parent
    before = _digest(audit)
    out = tmp_path / "edited"
    from ecif_core.datasets.digits import class_prompts, label_of_caption

    rows = [json.loads(line) for line in (data_root / "digits" / "test.jsonl").read_text().splitlines()[:12]]
    zero_shot = [{"image": f"digits/{r['image']}", "prompts": class_prompts(), "label": label_of_caption(r["caption"])}
                 for r in rows]
    (data_root / "zero_shot.json").write_text(json.dumps(zero_shot))  # image paths relative to this file
    assert main(["edit", "--audit-dir", str(audit), "--remove", "top:0.1:self_influence", "--out", str(out),
                 "--method", "newton", "--max-iterations", "8", "--zero-shot", str(data_root / "zero_shot.json")]) == 0
    record = json.loads((out / "edit.json").read_text())
    assert _digest(audit) == before  # an edit never modifies the audit
    removed = (out / "removed_ids.txt").read_text().split()
    top = [r["id"] for r in sorted(_ranked(audit), key=lambda r: -float(r["self_influence"]))[:len(removed)]]
    assert sorted(removed) == sorted(top) and len(removed) == round(0.1 * len(_ranked(audit)))
    assert record["result"]["cg_iterations"] >= 1 and record["result"]["parameter_change_norm"] > 0
    validation = record["validation"]
    assert validation["actual_change"] == pytest.approx(validation["loss_after"] - validation["loss_before"])
    from ecif_core.edit.certificate import OK, RETRAIN, contradicts

    certified = record["certificate"]  # the verdict is the rule applied to the validation check's numbers
    assert certified["measured_validation_change"] == validation["actual_change"]
    assert certified["predicted_validation_change"] == validation["predicted_change"]
    result = record["result"]  # lambda starts at 0.1 x the curvature along the removal gradient (x10 per escalation)
    assert result["dampings_tried"][0] == pytest.approx(0.1 * result["removal_curvature"])
    share = result["damping"] / (result["damping"] + result["removal_curvature"])
    assert certified["damping_share"] == pytest.approx(share)
    # this micro model, two epochs from scratch, meets negative curvature: escalated, the step is too short
    shortened = share >= 0.5
    assert certified["verdict"] == (RETRAIN if shortened or contradicts(validation["predicted_change"],
                                                                         validation["actual_change"]) else OK)
    assert f"verdict: {certified['verdict']}: " in capsys.readouterr().err

    # open_clip's own model class loads the edited state dict strictly; only theta changed
    from open_clip.model import CLIP

    config = json.loads((data_root / "cfg.json").read_text())
    edited, original = torch.load(out / "model.pt", weights_only=True), torch.load(data_root / "model.pt", weights_only=True)
    CLIP(**config).load_state_dict(edited, strict=True)
    changed = {k for k in edited if not torch.equal(edited[k], original[k])}
    assert changed and all(k in record["method"]["theta"] for k in changed)
    # the validation loss the record reports is the written checkpoint's (recomputed independently)
    from ecif_core.stages import load_plan
    from ecif_core.edit.validation_check import validation_batches, validation_loss
    from ecif_core.data.manifest import Manifest
    from ecif_core.models.factory import load_model

    manifest_of_audit = Manifest.from_json(load_plan(audit).manifest)
    reloaded = load_model(config=config, checkpoint=out / "model.pt")
    val = validation_batches(audit, manifest_of_audit, reloaded.preprocess, reloaded.tokenizer)
    assert validation_loss(reloaded.model, val)[0] == pytest.approx(validation["loss_after"], rel=1e-5)
    # zero-shot accuracy before / after, recomputed through open_clip's own forward (CLIP.forward)
    original_model = load_model(config=config, checkpoint=data_root / "model.pt")

    def accuracy(loaded) -> float:
        from ecif_core.data.images import load_image

        hits = 0
        with torch.no_grad():
            for example in zero_shot:
                image = loaded.preprocess(load_image(str(data_root / example["image"]))).unsqueeze(0)
                image_features, text_features, _ = loaded.model(image, loaded.tokenizer(example["prompts"]))
                hits += int(int((image_features @ text_features.T).argmax()) == example["label"])
        return hits / len(zero_shot)

    assert record["zero_shot"] == {"examples": 12, "accuracy_before": accuracy(original_model),
                                   "accuracy_after": accuracy(reloaded)}

    # the edited model audits; its sidecar excludes the removed pairs, which the audit lists
    manifest = {"model": {"config": str(data_root / "cfg.json"), "checkpoint": str(out / "model.pt")},
                "train": str(data_root / "digits/train.jsonl"), "options": {"projection": {"k_in": 4, "k_out": 4}}}
    (tmp_path / "m.json").write_text(json.dumps(manifest))
    assert main(["audit", str(tmp_path / "m.json"), "--out", str(tmp_path / "reaudit"), "--quiet"]) == 0
    with (tmp_path / "reaudit" / "rejected.csv").open() as handle:
        excluded = {r["id"] for r in csv.DictReader(handle) if r["reason"].startswith("excluded")}
    assert set(removed) <= excluded


@pytest.mark.parametrize("spec,message", [("top:0.1:nope", "unknown column"), ("top:1.5:influence", "(0, 1]"),
                                          ("ids:missing.txt", "not found"), ("sideways:3", "unknown removal spec"),
                                          ("top:0:clip_score", "integer >= 1"), ("top:nan:rank", "neither a fraction"),
                                          ("top:inf:rank", "neither a fraction"), ("random:0.5:-1", "random seed"),
                                          ("random:0.5:99999999999999999999", "random seed"),
                                          ("top:96:rank", "not below the audit's 96 pairs")])
def test_bad_removal_specs_name_the_field(embedded_csv, tmp_path, capsys, spec, message):
    assert main(["preview", "--audit-dir", str(embedded_csv.parent), "--remove", spec]) == 2
    err = capsys.readouterr().err
    assert "remove:" in err and message in err


def test_ids_not_in_the_audit_are_refused(embedded_csv, tmp_path, capsys):
    (tmp_path / "ids.txt").write_text("no-such-pair\n")
    assert main(["edit", "--audit-dir", str(embedded_csv.parent), "--remove", f"ids:{tmp_path / 'ids.txt'}",
                 "--out", str(tmp_path / "e")]) == 2
    assert "not usable pairs of this audit" in capsys.readouterr().err
    assert not (tmp_path / "e").exists()


@pytest.mark.parametrize("flag,value", [("--damping", "1e308"), ("--damping-per-removal-curvature", "inf"),
                                        ("--max-iterations", "501"), ("--max-seconds", "0")])
def test_edit_settings_out_of_bounds_are_refused_before_any_work(embedded_csv, tmp_path, capsys, flag, value):
    """The CLI's flags and bounds come from the one table (ecif_core.edit.settings); 1e308 made NaN parameters."""
    for flag_, value_ in ((flag, value), ("--damping", "nan"), ("--tolerance", "1")):
        assert main(["edit", "--audit-dir", str(embedded_csv.parent), "--remove", "top:4:rank", "--out",
                     str(tmp_path / "e"), flag_, value_]) == 2
        assert f"{flag_[2:].replace('-', '_')}:" in capsys.readouterr().err
        assert not (tmp_path / "e").exists()


def test_the_old_damping_factor_flag_still_works_with_a_deprecation_warning(capsys):
    """--damping-factor was renamed --damping-per-removal-curvature (the audit's damping factor means
    something else); the old flag is read as the new one, with a warning, and both at once are refused."""
    from ecif_core.errors import ConfigError
    from services.cli import _edit_settings, build_parser

    base = ["edit", "--audit-dir", "a", "--remove", "suspected", "--out", "o"]
    settings = _edit_settings(build_parser().parse_args([*base, "--damping-factor", "0.5"]))
    assert settings.damping_per_removal_curvature == 0.5
    assert "--damping-factor is deprecated" in capsys.readouterr().err
    assert _edit_settings(build_parser().parse_args([*base, "--damping-per-removal-curvature", "0.3"])
                          ).damping_per_removal_curvature == 0.3
    assert "deprecated" not in capsys.readouterr().err
    with pytest.raises(ConfigError) as error:
        _edit_settings(build_parser().parse_args([*base, "--damping-factor", "0.5", "--damping-per-removal-curvature",
                                                  "0.3"]))
    assert error.value.field == "damping_factor"


def test_demote_with_a_keep_list_writes_the_demotion_and_counts_what_was_kept(embedded_csv, tmp_path, capsys):
    """--demote: edit.json says action demote with the set and kept_back; the demoted ids are listed (not
    removed: the sidecar keeps them in training, under `demoted`); the model differs from the removal's."""
    audit = embedded_csv.parent
    rows = _ranked(audit)
    top = [r["id"] for r in sorted(rows, key=lambda r: -float(r["self_influence"]))[:10]]
    with (tmp_path / "keep.csv").open("w", newline="") as handle:  # a review's export: ranked.csv's columns
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(r for r in rows if r["id"] in top[:2])
    common = ["--audit-dir", str(audit), "--keep", str(tmp_path / "keep.csv"), "--max-iterations", "8"]
    assert main(["edit", "--demote", "top:10:self_influence", "--out", str(tmp_path / "d"), *common]) == 0
    captured = capsys.readouterr()
    assert "kept back: 2 pairs" in captured.err
    record = json.loads((tmp_path / "d" / "edit.json").read_text())
    assert record["action"] == "demote" and "remove" not in record
    assert record["demote"] == {"spec": "top:10:self_influence", "pairs": 8, "ids": "demoted_ids.txt", "kept_back": 2}
    assert json.loads(captured.out)["demote"]["kept_back"] == 2
    assert record["result"]["pairs_demoted"] == 8 and "Pos(E) alone" in record["validation"]["form"]
    demoted = (tmp_path / "d" / "demoted_ids.txt").read_text().split()
    assert sorted(demoted) == sorted(top[2:]) and not (tmp_path / "d" / "removed_ids.txt").exists()
    sidecar = json.loads((tmp_path / "d" / "model.pt.json").read_text())
    assert sidecar["demoted"] == sorted(demoted) and not set(demoted) & set(sidecar["excluded"])
    assert main(["edit", "--remove", "top:10:self_influence", "--out", str(tmp_path / "r"), *common]) == 0
    removed = json.loads((tmp_path / "r" / "edit.json").read_text())
    assert removed["action"] == "remove" and removed["remove"]["kept_back"] == 2
    assert sorted((tmp_path / "r" / "removed_ids.txt").read_text().split()) == sorted(demoted)
    a, b = (torch.load(tmp_path / f / "model.pt", weights_only=True)["visual.proj"] for f in ("d", "r"))
    assert not torch.allclose(a, b)


def test_a_tiny_time_budget_stops_the_edit_and_says_so(embedded_csv, tmp_path, capsys):
    out = tmp_path / "e"
    assert main(["edit", "--audit-dir", str(embedded_csv.parent), "--remove", "top:6:rank", "--out", str(out),
                 "--method", "newton", "--max-seconds", "1e-9", "--tolerance", "1e-12"]) == 0
    result = json.loads((out / "edit.json").read_text())["result"]
    assert result["stopped"] == "time budget" and result["cg_iterations"] == 1
    assert result["cg_relative_residual"] > 0 and result["parameter_change_norm"] > 0  # the residual reached, reported
    assert json.loads((out / "edit.json").read_text())["method"]["max_seconds"] == 1e-9
    assert "stopped: time budget, after 1 CG iterations" in capsys.readouterr().err
    # the replay (the default) stops both runs after the same step and says how far it got
    assert main(["edit", "--audit-dir", str(embedded_csv.parent), "--remove", "top:6:rank", "--out", str(tmp_path / "r"),
                 "--max-seconds", "1e-9"]) == 0
    record = json.loads((tmp_path / "r" / "edit.json").read_text())
    result = record["result"]
    assert record["method"]["name"] == "replay" and result["stopped"] == "time budget"
    assert result["steps_done"] == 1 < result["replay_steps"] and result["parameter_change_norm"] > 0
    assert f"stopped: time budget, after 1 of {result['replay_steps']} steps of each run" in capsys.readouterr().err


def test_the_replay_repeats_the_sidecars_recipe_or_asks_for_one(embedded_csv, data_root, tmp_path, capsys):
    """The default edit reads epochs and lr from the checkpoint's training sidecar (edit.json says which);
    flags override them; a checkpoint without a sidecar is refused in one sentence before any work."""
    audit = embedded_csv.parent
    sidecar = json.loads((data_root / "model.pt.json").read_text())
    assert main(["edit", "--audit-dir", str(audit), "--remove", "top:4:rank", "--out", str(tmp_path / "a")]) == 0
    record = json.loads((tmp_path / "a" / "edit.json").read_text())
    assert record["method"]["recipe"]["epochs"] == sidecar["epochs"] and record["method"]["recipe"]["lr"] == sidecar["lr"]
    batches = len({int(r["slot"]) // 8 for r in _ranked(audit)}) if "slot" in _ranked(audit)[0] else None
    assert record["result"]["replay_steps"] == record["result"]["steps_done"]
    assert batches is None or record["result"]["replay_steps"] == sidecar["epochs"] * batches
    assert record["certificate"]["verdict"] in ("ok", "retrain recommended") and "damping" not in record["result"]
    assert main(["edit", "--audit-dir", str(audit), "--remove", "top:4:rank", "--out", str(tmp_path / "b"),
                 "--replay-epochs", "1", "--replay-lr", "0.002"]) == 0
    recipe = json.loads((tmp_path / "b" / "edit.json").read_text())["method"]["recipe"]
    assert (recipe["epochs"], recipe["lr"]) == (1, 0.002)
    capsys.readouterr()
    moved = tmp_path / "moved.pt.json"
    (data_root / "model.pt.json").rename(moved)
    try:
        assert main(["edit", "--audit-dir", str(audit), "--remove", "top:4:rank", "--out", str(tmp_path / "c")]) == 2
    finally:
        moved.rename(data_root / "model.pt.json")
    err = capsys.readouterr().err
    assert "--replay-epochs and --replay-lr" in err and "Traceback" not in err and not (tmp_path / "c").exists()


def test_remove_and_demote_are_one_or_the_other(embedded_csv, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["edit", "--audit-dir", str(embedded_csv.parent), "--remove", "suspected", "--demote", "suspected",
              "--out", str(tmp_path / "e")])
    assert "not allowed with argument" in capsys.readouterr().err
    assert main(["edit", "--audit-dir", str(embedded_csv.parent), "--demote", "top:0.1:nope", "--out",
                 str(tmp_path / "e")]) == 2
    assert "demote:" in capsys.readouterr().err and not (tmp_path / "e").exists()


def test_train_demotes_or_removes_an_audits_set_less_the_keep_list(data_root, embedded_csv, tmp_path, capsys):
    """`ecif train --demote SPEC --audit-dir` reads the spec against the audit's ranking (the edit's own
    parser); a file of ids needs no audit; a spec without one says what to add."""
    audit = embedded_csv.parent
    top = [r["id"] for r in sorted(_ranked(audit), key=lambda r: float(r["rank"]))[:4]]
    (tmp_path / "keep.txt").write_text(f"{top[0]}\n")
    base = ["train", "--data", str(data_root / "digits" / "train.jsonl"), "--model-config", str(data_root / "cfg.json"),
            "--init", str(data_root / "model.pt"), "--epochs", "1", "--batch-size", "8", "--seed", "2"]
    assert main([*base, "--demote", "top:4:rank", "--audit-dir", str(audit), "--keep", str(tmp_path / "keep.txt"),
                 "--out", str(tmp_path / "d.pt")]) == 0
    assert "kept back (on the keep list): 0 of the removed, 1 of the demoted" in capsys.readouterr().err
    sidecar = json.loads((tmp_path / "d.pt.json").read_text())
    assert sidecar["demoted"] == sorted(top[1:]) and sidecar["excluded"] == [] and sidecar["pairs_used"] == 96
    (tmp_path / "ids.txt").write_text("\n".join(top[:2]) + "\n")
    assert main([*base, "--remove", str(tmp_path / "ids.txt"), "--out", str(tmp_path / "r.pt")]) == 0
    assert json.loads((tmp_path / "r.pt.json").read_text())["excluded"] == sorted(top[:2])
    assert main([*base, "--demote", "suspected", "--out", str(tmp_path / "x.pt")]) == 2
    err = capsys.readouterr().err
    assert "demote:" in err and "--audit-dir" in err and not (tmp_path / "x.pt").exists()


def test_the_cg_bar_shows_the_solvers_eta_not_tqdms(capsys):
    """tqdm's estimate assumes all max_iterations run; the solver's eta_s (residual decay, time budget) replaces it."""
    from services.bars import TaskBars

    bars = TaskBars("edit (CG)")
    bars("iteration", 1, 50, residual=0.5, eta_s=75.0)
    bars.close()
    err = capsys.readouterr().err
    assert "<01:15" in err and "residual=0.5" in err and "eta_s" not in err
