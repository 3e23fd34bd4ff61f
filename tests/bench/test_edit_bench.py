"""bench.edit: its metric code against hand-computed values, and the `--quick` core (run_seed) on tiny sizes."""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from bench import edit as bench_edit
from ecif_core.edit.certificate import contradicts
from bench.edit import cosine, parameter_agreement, quick, run_seed, sign_agrees, summarise, targets, tune


def test_sign_agreement_by_hand() -> None:
    assert sign_agrees(0.3, 0.01) and sign_agrees(-2.0, -1e-6)
    assert not sign_agrees(0.3, -0.01) and not sign_agrees(-1e-6, 1e-6)
    assert sign_agrees(0.0, 0.0)            # no change and no change agree
    assert not sign_agrees(0.0, 0.5)        # no change vs a change do not
    assert sign_agrees(1e-4, -1e-4, tolerance=1e-3) and not sign_agrees(1e-2, -1e-4, tolerance=1e-3)


def test_cosine_and_parameter_agreement_by_hand() -> None:
    assert cosine(torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0])) == pytest.approx(1 / math.sqrt(2))
    assert cosine(torch.tensor([1.0, 2.0]), torch.tensor([-2.0, -4.0])) == pytest.approx(-1.0)
    assert math.isnan(cosine(torch.zeros(2), torch.tensor([1.0, 0.0])))
    names = ["a", "b"]
    m1 = {"a": torch.tensor([[1.0, 1.0]]), "b": torch.tensor([2.0])}
    # edited - M1 = (3, 0 | 4); retrained - M1 = (0, 0 | 5): cosine 20 / (5 * 5) = 0.8,
    # |edited - retrained| = |(3, 0, -1)| = sqrt(10), relative to |M1 - retrained| = 5
    edited = {"a": torch.tensor([[4.0, 1.0]]), "b": torch.tensor([6.0])}
    retrained = {"a": torch.tensor([[1.0, 1.0]]), "b": torch.tensor([7.0])}
    got = parameter_agreement(m1, edited, retrained, names)
    assert got["cosine"] == pytest.approx(0.8)
    assert got["relative_error"] == pytest.approx(math.sqrt(10) / 5)
    assert got["edit_norm"] == pytest.approx(5.0) and got["retrain_norm"] == pytest.approx(5.0)
    assert got["norm_ratio"] == pytest.approx(1.0)
    assert parameter_agreement(m1, retrained, retrained, names)["relative_error"] == 0.0
    assert parameter_agreement(m1, m1, retrained, names)["relative_error"] == pytest.approx(1.0)


def _row(acc_e, acc_r, dl_e, dl_r, ratio, acc_m1=0.5):
    return {"done": True, "acc_m1": acc_m1, "acc_edited": acc_e, "acc_retrained": acc_r,
            "acc_gap": abs(acc_e - acc_r), "acc_gap_no_edit": abs(acc_m1 - acc_r), "loss_m1": 1.0,
            "loss_edited": 1.0 + dl_e, "loss_retrained": 1.0 + dl_r, "dloss_edited": dl_e, "dloss_retrained": dl_r,
            "cosine": 0.5, "relative_error": 0.5, "norm_ratio": 1.0, "edit_seconds": ratio, "retrain_seconds": 1.0,
            "time_ratio": ratio, "corrupted_share": 0.2, "pairs": 10, "sign_agrees": sign_agrees(dl_e, dl_r)}


def test_summary_and_targets_by_hand() -> None:
    records = [{"seed": 0, "sets": {"random": _row(0.50, 0.51, 0.1, 0.2, 0.1),
                                    "suspected": _row(0.60, 0.60, -0.1, -0.2, 0.2)}},
               {"seed": 1, "sets": {"random": _row(0.40, 0.40, 0.1, -0.2, 0.3),
                                    "suspected": _row(0.70, 0.72, 0.1, -0.2, 0.6)}}]
    summary = summarise(records, ["random", "suspected"])
    assert summary["per_set"]["random"]["acc_gap"] == pytest.approx((0.005, 0.01 / math.sqrt(2)))  # |0.50-0.51|, 0
    assert summary["per_set"]["random"]["sign_agreement"] == 0.5
    o = summary["overall"]
    assert o["mean_acc_gap_points"] == pytest.approx(100 * (0.01 + 0 + 0 + 0.02) / 4)   # 0.75 points
    assert o["sign_agreement"] == 0.5 and o["max_time_ratio"] == 0.6
    assert o["mean_time_ratio"] == pytest.approx(0.3)
    assert (o["suspected_retrain_improves"], o["suspected_edit_improves_too"]) == (2, 1)
    met = [t["met"] for t in targets(o)]
    assert met == [False, False, False, False]
    easy = summarise([{"seed": 0, "sets": {"suspected": _row(0.5, 0.5, -0.1, -0.2, 0.1)}}], ["suspected"])
    assert [t["met"] for t in targets(easy["overall"])] == [True, True, True, True]
    none_improve = summarise([{"seed": 0, "sets": {"suspected": _row(0.5, 0.5, 0.1, 0.2, 0.1)}}], ["suspected"])
    assert targets(none_improve["overall"])[3]["met"] is None  # retraining never improved: not applicable


def test_prediction_agreement_by_hand() -> None:
    """Sign agreement and Pearson correlation of each prediction with retraining's loss change."""
    def row(preview, group, dl_r):
        return {**_row(0.5, 0.5, -0.1, dl_r, 0.1), "preview_change": preview, "group_predicted_change": group}

    rows = {"a": row(-1.0, -1.0, -2.0), "b": row(1.0, -0.5, 0.0 + 1e-3), "c": row(0.0, 2.0, 2.0)}
    p = summarise([{"seed": 0, "sets": rows}], list(rows))["overall"]["predictions"]
    assert p["preview (sum form)"]["sign_agreement"] == pytest.approx(2 / 3)  # (-,-) and (+,+) agree; (0,+) not
    assert p["edit's prediction (group form)"]["sign_agreement"] == pytest.approx(2 / 3)
    # against numpy's own correlation
    import numpy as np

    want = float(np.corrcoef([-1.0, 1.0, 0.0], [-2.0, 1e-3, 2.0])[0, 1])
    assert p["preview (sum form)"]["pearson"] == pytest.approx(want)
    assert bench_edit.pearson([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]) is None and bench_edit.pearson([1.0], [2.0]) is None


def test_verdict_counts_by_hand() -> None:
    """False alarms are counted among edits that matched retraining (the certificate's rule on the test
    loss against retraining's), catches among those that contradicted it."""
    def judged(dl_e, dl_r, verdict):
        return {**_row(0.5, 0.5, dl_e, dl_r, 0.1), "verdict": verdict,
                "matches_retraining": not contradicts(dl_r, dl_e)}

    rows = {"a": judged(-0.1, -0.2, "ok"), "b": judged(-0.1, -0.2, "retrain recommended"),  # matched: 1 alarm
            "c": judged(0.1, -0.2, "retrain recommended"), "d": judged(-0.01, -0.2, "ok")}   # contradicted: 1 caught
    o = summarise([{"seed": 0, "sets": rows}], list(rows))["overall"]
    assert o["verdict"] == {"sets": 4, "matched_retraining": 2, "false_alarms": 1, "contradicted_retraining": 2,
                            "caught": 1}
    assert targets(o)[3]["value"] == "caught 1 of 2; false alarms 1 of 2" and targets(o)[3]["met"] is False
    assert "predictions" not in o  # rows without previews (recorded before them) are not counted
    clean = {k: rows[k] for k in ("a", "c")}
    assert targets(summarise([{"seed": 0, "sets": clean}], list(clean))["overall"])[3]["met"] is True


def test_quick_core_runs_every_step_on_tiny_sizes(tmp_path: Path) -> None:
    settings = dataclasses.replace(quick(), n_train=96, n_val=48, n_test=48, base_epochs=2, finetune_epochs=1,
                                   sets=["random", "harmful", "suspected"], max_iterations=5)
    threads = torch.get_num_threads()
    try:
        record = run_seed(settings, tmp_path, 0, say_=lambda _: None)
    finally:
        torch.set_num_threads(threads)
    for model in ("m0", "m1"):
        for k in ("zero_shot_accuracy", "retrieval_accuracy"):
            assert 0.0 <= record["models"][model][k] <= 1.0
        assert math.isfinite(record["models"][model]["test_loss"])
    done = [row for row in record["sets"].values() if row.get("done")]
    assert record["sets"]["random"]["done"] and record["sets"]["harmful"]["done"]
    for row in done:
        assert row["pairs"] == round(0.1 * record["ranked_pairs"]) or row["spec"] == "suspected"
        assert -1.0 - 1e-9 <= row["cosine"] <= 1.0 + 1e-9 and row["relative_error"] >= 0
        assert row["acc_gap"] == pytest.approx(abs(row["acc_edited"] - row["acc_retrained"]))
        assert row["dloss_edited"] == pytest.approx(row["loss_edited"] - row["loss_m1"])
        assert row["sign_agrees"] == sign_agrees(row["dloss_edited"], row["dloss_retrained"])
        assert row["time_ratio"] == pytest.approx(row["edit_seconds"] / row["retrain_seconds"])
        assert row["feature_cache"] and 1 <= row["edit"]["cg_iterations"] + 1 <= 6
        assert row["verdict"] in ("ok", "retrain recommended") and math.isfinite(row["preview_change"])
        assert row["matches_retraining"] == (not contradicts(row["dloss_retrained"], row["dloss_edited"]))
    # the cache: a second call reuses every record (no training, no edit) and returns the same numbers
    again = run_seed(settings, tmp_path, 0, say_=lambda _: None)
    assert json.dumps(again["sets"], sort_keys=True) == json.dumps(record["sets"], sort_keys=True)
    # tuning on the seed reuses its retrained models; one candidate is chosen and M1's stationarity measured
    grid = [{"damping": None, "damping_per_removal_curvature": 1.0, "max_iterations": 3}]
    tuning = tune(settings, tmp_path, 0, grid, say_=lambda _: None)
    assert tuning["chosen"] == {**grid[0], "tolerance": settings.tolerance}
    assert tuning["candidates"][0]["rows"].keys() == {k for k, row in record["sets"].items() if row.get("done")}
    assert math.isfinite(tuning["stationarity"]["gradient_norm"]) and tuning["stationarity"]["gradient_norm"] > 0
    results = bench_edit.assemble(settings, [record], "python -m bench.edit --quick", 1.0, 1)
    text = bench_edit.markdown(results)
    assert "Model edit vs retraining" in text and "does not exist yet" in text
    torch.set_num_threads(threads)


def test_the_action_decides_the_retraining_recipe_and_the_record_names() -> None:
    """A demotion is compared with retraining that demotes the same ids (not one that excludes them), and
    its records live beside the removal's."""
    settings = quick()
    removal = bench_edit._ft_config(settings, 0, ["a", "b"])
    assert tuple(removal.exclude) == ("a", "b") and not removal.demote
    demotion = bench_edit._ft_config(settings, 0, ["a", "b"], "demote")
    assert tuple(demotion.demote) == ("a", "b") and not demotion.exclude
    assert bench_edit._retrained_names("remove") == ("retrained.pt", "retrain.json")
    assert bench_edit._retrained_names("demote") == ("retrained-demote.pt", "retrain-demote.json")
    key = quick().edit_key()
    assert bench_edit.edit_tag(key) != bench_edit.edit_tag({**key, "action": "demote"})
