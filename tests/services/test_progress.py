"""Progress that tells the truth: the in-process audit's bars move within a shard (pairs, rows),
one-step stages show no rate, and the edit and the trace report as they go."""
import itertools
import json
import re

import pytest

import torch

from ecif_core.stages import gradients as gradients_stage
from ecif_core.stages import load_plan, load_slots
from ecif_core.stages.table import BY_NAME, STAGES
from services.cli import main


def _calls_by_stage(calls):
    out = {}
    for stage, done, total in calls:
        out.setdefault(stage, []).append((done, total))
    return out


def test_embedded_audit_reports_pairs_within_each_shard_and_rows_for_prepare(data_root, tmp_path):
    from services.embedded import run_audit

    calls = []
    ranked = run_audit(data_root / "manifest.json", tmp_path / "audit", progress=lambda *a: calls.append(a))
    plan, by_stage = load_plan(ranked.parent), _calls_by_stage(calls)
    assert list(by_stage) == [s.name for s in STAGES]
    for stage, seen in by_stage.items():
        dones = [done for done, _ in seen]
        assert dones == sorted(dones), stage  # never goes back
        assert seen[-1][0] == seen[-1][1], stage  # ends at its total
    assert plan.shards > 1
    gradients = by_stage["gradients"]
    assert len(gradients) > plan.shards  # advances within a shard (per batch), not per finished shard
    assert {total for _, total in gradients} == {plan.pairs_usable}  # every shard's pairs together
    assert gradients[0][0] == 0 and len(gradients) > plan.n_batches  # one advance per batch (and the start)
    boundaries = set(itertools.accumulate(len(load_slots(ranked.parent, s)) for s in range(plan.shards)))
    assert any(done not in boundaries for done, _ in gradients[1:])  # counts inside a shard, not shard ends
    assert by_stage["scores"][-1] == (plan.pairs_usable, plan.pairs_usable)
    rows = len((data_root / "digits" / "train.jsonl").read_text().splitlines())
    assert by_stage["prepare"][-1] == (rows, rows) and by_stage["prepare"][0] == (0, rows)  # rows, not one task
    assert by_stage["validation"][-1][0] == 24  # the validation pairs in batches
    assert by_stage["curvature"][-1] == (plan.shards + 1, plan.shards + 1)  # each shard summed, then eigh


def test_a_resumed_audit_counts_the_shards_finished_before(data_root, tmp_path, monkeypatch):
    """A rerun after Ctrl-C starts the gradients count at the pairs of the shards already done."""
    from services.embedded import run_audit

    accumulate, stopped = gradients_stage._accumulate_shard, []

    def interrupted_at_shard_3(*args, **kwargs):
        if args[5] == 3 and not stopped:
            stopped.append(3)
            raise KeyboardInterrupt
        return accumulate(*args, **kwargs)

    monkeypatch.setattr(gradients_stage, "_accumulate_shard", interrupted_at_shard_3)
    out = tmp_path / "audit"
    with pytest.raises(KeyboardInterrupt):
        run_audit(data_root / "manifest.json", out)
    calls = []
    run_audit(data_root / "manifest.json", out, progress=lambda *a: calls.append(a))
    gradients = _calls_by_stage(calls)["gradients"]
    before = sum(len(load_slots(out, s)) for s in range(3))
    plan = load_plan(out)
    assert gradients[0] == (before, plan.pairs_usable) and gradients[-1] == (plan.pairs_usable, plan.pairs_usable)


def test_cli_bars_count_rows_and_pairs_and_show_no_rate_for_a_one_step_stage(data_root, tmp_path, capsys):
    threads = torch.get_num_threads()
    try:
        assert main(["audit", str(data_root / "manifest.json"), "--out", str(tmp_path / "audit")]) == 0
    finally:
        torch.set_num_threads(threads)
    err = capsys.readouterr().err
    assert "shard/s" not in err and "shards/s" not in err
    lines = {stage.name: [line for line in re.split(r"[\r\n]", err) if line.startswith(stage.name)]
             for stage in STAGES}
    assert all(lines.values()), lines
    for stage in ("curvature", "finalize"):  # one task: steps with elapsed time, no rate
        assert all("/s" not in line and f" {BY_NAME[stage].unit}s [" in line for line in lines[stage]), lines[stage]
    assert re.search(r"\d+/\d+ rows \[\d\d:\d\d<\d\d:\d\d, ", lines["prepare"][-1])
    assert re.search(r"96/96 pairs \[\d\d:\d\d<\d\d:\d\d, [\d.]+ ?\w*pairs?/s\]", lines["gradients"][-1])


def test_stage_bar_format_of_a_status_counting_shards_and_a_total_learnt_late(capsys):
    from services.bars import stage_bars

    report = stage_bars(lambda stage: BY_NAME[stage].unit)
    report("gradients", 1, 2, unit="shard")  # `ecif submit --wait`: the service's status counts shards
    report("validation", 0, None)
    report("validation", 0, 24)
    report("validation", 24, 24)
    err = capsys.readouterr().err
    assert "1/2 shards [" in err and "shard/s" not in err
    assert "24/24 pairs [" in err


def test_edit_reports_each_cg_iteration_with_its_residual(embedded_csv, tmp_path, capsys):
    from ecif_core.edit.from_audit import edit_audit

    seen = []
    record = edit_audit(embedded_csv.parent, "top:4:rank", tmp_path / "e", method="newton",
                        progress=lambda unit, done, total, **detail: seen.append((unit, done, total, detail)))
    assert seen[0][:3] == ("iteration", 0, 50)  # before the removal gradient: the bar's clock starts with the edit
    iterations = seen[1:]
    last_solve = iterations[max(i for i, s in enumerate(iterations) if s[1] == 1):]  # a retry starts again at 1
    assert [s[1] for s in last_solve] == list(range(1, record["result"]["cg_iterations"] + 1))  # once per iteration
    assert all(unit == "iteration" and total == 50 and detail["residual"] > 0 for unit, _, total, detail in iterations)
    assert last_solve[-1][3]["residual"] == record["result"]["cg_relative_residual"]
    assert main(["edit", "--audit-dir", str(embedded_csv.parent), "--remove", "top:4:rank", "--out",
                 str(tmp_path / "cli"), "--method", "newton", "--max-iterations", "5"]) == 0
    err = capsys.readouterr().err
    assert re.search(r"edit \(CG\): +\d+%\|.*\| \d/5 iterations \[\d\d:\d\d<\d\d:\d\d, residual=", err), err


def test_the_replay_reports_each_step_with_an_eta(embedded_csv, tmp_path, capsys):
    from ecif_core.edit.from_audit import edit_audit

    seen = []
    record = edit_audit(embedded_csv.parent, "top:4:rank", tmp_path / "e",
                        progress=lambda unit, done, total, **detail: seen.append((unit, done, total, detail)))
    steps = record["result"]["replay_steps"]
    assert [s[:3] for s in seen] == [("step", k, steps) for k in range(0, steps + 1)]  # 0: the clock starts
    assert all(s[3]["eta_s"] >= 0 for s in seen[1:]) and seen[-1][3]["eta_s"] == 0
    assert main(["edit", "--audit-dir", str(embedded_csv.parent), "--remove", "top:4:rank", "--out",
                 str(tmp_path / "cli")]) == 0
    err = capsys.readouterr().err
    assert re.search(rf"edit \(replay\): 100%\|.*\| {steps}/{steps} steps", err), err


def test_trace_reports_test_examples_then_shards_read(data_root, embedded_csv, tmp_path, capsys):
    from ecif_core.trace.query import examples_from_json, trace

    row = json.loads((data_root / "digits" / "test.jsonl").read_text().splitlines()[0])
    image = str((data_root / "digits" / row["image"]).resolve())
    seen = []
    trace(embedded_csv.parent, examples_from_json([{"image": image, "caption": row["caption"]}] * 2), k=3,
          progress=lambda unit, done, total: seen.append((unit, done, total)))
    shards = load_plan(embedded_csv.parent).shards
    assert seen == [("example", 0, 2), ("example", 1, 2), ("example", 2, 2),
                    *(("shard", s, shards) for s in range(1, shards + 1))]
    assert main(["trace", "--audit-dir", str(embedded_csv.parent), "--image", image, "--caption", row["caption"],
                 "--k", "3"]) == 0
    err = capsys.readouterr().err
    assert "1/1 examples [" in err and f"{shards}/{shards} shards [" in err
