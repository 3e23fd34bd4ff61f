"""The staged audit: outputs, bad rows, idempotent shards, crash recovery, re-scoring."""
import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from PIL import Image

from ecif_core import stages as audit
from ecif_core.stages.curvature import curvature, fisher_from_partials
from ecif_core.stages.finalize import finalize
from ecif_core.stages.gradients import _batches_of_shard, shard_gradients
from ecif_core.stages.prepare import prepare
from ecif_core.stages.scores import shard_scores
from ecif_core.stages import curvature as curvature_stage
from ecif_core.data import images as images_module
from ecif_core.data import store as keys
from ecif_core.datasets.digits import build_digits
from ecif_core.trace.query import trace_relative_is
from ecif_core.errors import ConfigError, InconsistentAudit, NotReady
from ecif_core.data.manifest import load_manifest
from ecif_core.data.batching import hash_seed
from ecif_core.ranked import RANKED_COLUMNS
from ecif_core.train import TrainConfig, train
from services.embedded import run_audit
from tests.core.helpers import MICRO_CONFIG

# theta blocks:2 (the last two blocks + the projections, the default before issue 22): these audits run the
# paths through blocks end to end; the services' tests and the demo run the default (the projections).
OPTIONS = {"projection": {"k_in": 4, "k_out": 4}, "shard_batches": 2, "theta": ["blocks:2"]}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """Digits (64 train pairs, 25% shuffled), a micro CLIP trained 2 epochs, a manifest."""
    root = tmp_path_factory.mktemp("audit")
    data = build_digits(root / "data", fraction=0.25, seed=1, n_train=64, n_val=24, n_test=16)
    (root / "cfg.json").write_text(json.dumps(MICRO_CONFIG))
    train(data.train, root / "cfg.json", root / "model.pt",
          TrainConfig(epochs=2, batch_size=8, lr=1e-3, weight_decay=1e-2, seed=1))
    _write_manifest(root, "manifest.json", OPTIONS)
    return root


def _write_manifest(root: Path, name: str, options: dict, train: str = "data/train.jsonl",
                    validation: str | None = "data/val.jsonl") -> Path:
    manifest = {"model": {"config": "cfg.json", "checkpoint": "model.pt"}, "train": train, "options": options}
    if validation:
        manifest["validation"] = validation
    (root / name).write_text(json.dumps(manifest))
    return root / name


def _rows(path: Path) -> list[dict]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def finished(workspace) -> Path:
    out = workspace / "run"
    run_audit(workspace / "manifest.json", out)
    return out


def test_ranked_csv_has_every_pair_once_in_rank_order(finished, workspace):
    rows = _rows(finished / "ranked.csv")
    assert list(rows[0]) == list(RANKED_COLUMNS)
    assert [int(r["rank"]) for r in rows] == list(range(1, 65))
    assert len({r["id"] for r in rows}) == 64
    suspicion = [float(r["suspicion"]) for r in rows]
    assert suspicion == sorted(suspicion, reverse=True)  # default rank_by = evidence, whose score is the suspicion
    # No reference model here (trained from scratch): suspicion = robust z of -clip_score_loo, recomputed
    loo = np.array([float(r["clip_score_loo"]) for r in rows])
    median = np.median(-loo)
    expected = (-loo - median) / (1.4826 * np.median(np.abs(-loo - median)))
    np.testing.assert_allclose(suspicion, expected, rtol=1e-9, atol=1e-9)
    assert [r["suspected"] == "true" for r in rows] == [z > 3.0 for z in suspicion]  # the flag's statistic
    assert all(r["influence"] and r["influence_pos"] and r["influence_neg"] for r in rows)
    for r in rows:
        assert float(r["influence"]) == pytest.approx(float(r["influence_pos"]) + float(r["influence_neg"]), rel=1e-6, abs=1e-12)
        assert -1.0 <= float(r["clip_score"]) <= 1.0
        assert r["suspected"] in ("true", "false")


def test_partition_comes_from_the_sidecar(finished):
    plan = audit.load_plan(finished)
    # each shard reads only its own lines, and together they are every pair exactly once
    per_shard = [audit.load_slots(finished, s) for s in range(plan.shards)]
    assert [sp for part in per_shard for sp in part] == audit.load_slots(finished)
    assert all(slot // plan.shard_rows == s for s, part in enumerate(per_shard) for slot, _ in part)
    assert plan.batch_size == 8 and plan.manifest["options"]["seed"] == 1
    assert plan.manifest["options"]["weight_decay"] == pytest.approx(1e-2)


def test_finished_shards_are_skipped_and_a_half_written_shard_is_redone(finished, workspace, tmp_path):
    assert shard_gradients(finished, 0) is False  # a redelivered task does nothing
    copy = tmp_path / "copy"
    shutil.copytree(finished, copy)
    _redo_half_written_shard(copy, finished)


def _redo_half_written_shard(copy: Path, finished: Path) -> None:
    """Simulate a worker killed mid-shard (garbage in shard 1's chunk, no completion marker); the shard
    is redone and the gradients equal the uninterrupted audit's."""
    store = audit.open_store(copy)
    rows = audit.load_plan(copy).shard_rows
    store.root[keys.marker_key("gradients")][1] = 0
    store.root[keys.POS_GRADIENTS][rows:2 * rows] = np.full((rows, store.attrs["dim"]), 7.0, np.float32)
    assert shard_gradients(copy, 1) is True
    np.testing.assert_array_equal(store.pos_gradients(), audit.open_store(finished).pos_gradients())


def test_an_audit_prepared_under_the_old_default_theta_resumes_with_its_own(finished, tmp_path):
    """Before issue 22 a null theta meant the last two blocks + the projections; an audit prepared then
    holds `theta: null` in plan.json. Its stages read the parameters it was prepared with (plan.blocks),
    not today's default (the projections, another gradient size): a redone shard equals the original."""
    copy = tmp_path / "old"
    shutil.copytree(finished, copy)
    plan_file = copy / "plan.json"
    plan = json.loads(plan_file.read_text())
    plan["manifest"]["options"]["theta"] = None
    plan_file.write_text(json.dumps(plan))
    names = [block["name"] for block in plan["blocks"]]
    assert any("resblocks" in name for name in names)
    assert audit.manifest_of(audit.load_plan(copy)).options.theta == names
    _redo_half_written_shard(copy, finished)


def test_rescoring_with_new_damping_reuses_gradients(finished, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(finished, copy)
    before = audit.open_store(copy).score_column("influence")
    grads = audit.open_store(copy).neg_gradients()
    for shard in range(audit.load_plan(copy).shards):
        shard_scores(copy, shard, damping=1e3)
    after = audit.open_store(copy).score_column("influence")
    valid = ~np.isnan(before)
    assert np.abs(after[valid]).sum() < np.abs(before[valid]).sum()
    np.testing.assert_array_equal(grads, audit.open_store(copy).neg_gradients())


def test_bad_rows_are_rejected_with_reasons_and_the_rest_is_audited(workspace, tmp_path, monkeypatch):
    monkeypatch.setattr(images_module, "MAX_IMAGE_PIXELS", 250 * 250)
    lines = (workspace / "data" / "train.jsonl").read_text().splitlines()[:40]
    (workspace / "data" / "broken.png").write_bytes(b"not a png at all")
    good = (workspace / "data" / json.loads(lines[0])["image"]).read_bytes()
    (workspace / "data" / "cut.png").write_bytes(good[: len(good) // 2])
    Image.new("L", (300, 300)).save(workspace / "data" / "huge.png")  # over the (lowered) pixel limit
    extra = [{"id": "no-image", "image": "images/missing.png", "caption": "a photo of the digit one"},
             {"id": "empty-caption", "image": json.loads(lines[0])["image"], "caption": "  "},
             {"id": "number-caption", "image": json.loads(lines[0])["image"], "caption": 7},
             {"id": "long-caption", "image": json.loads(lines[0])["image"], "caption": "seven " * 400},
             {"id": "corrupt", "image": "broken.png", "caption": "a photo of the digit two"},
             {"id": "truncated", "image": "cut.png", "caption": "a photo of the digit two"},
             {"id": "too-large", "image": "huge.png", "caption": "a photo of the digit two"}]
    (workspace / "data" / "bad.jsonl").write_text("\n".join(lines + [json.dumps(e) for e in extra])
                                                  + "\n{oops\n[1, 2]\n")
    # The model was trained on this very file (the trainer rejects the same rows).
    train(workspace / "data" / "bad.jsonl", workspace / "cfg.json", workspace / "bad_model.pt",
          TrainConfig(epochs=1, batch_size=8, lr=1e-3, weight_decay=1e-2, seed=1))
    manifest = {"model": {"config": "cfg.json", "checkpoint": "bad_model.pt"}, "train": "data/bad.jsonl",
                "options": OPTIONS}
    (workspace / "bad.json").write_text(json.dumps(manifest))
    ranked = run_audit(workspace / "bad.json", tmp_path / "bad")
    rejected = {r["id"]: r["reason"] for r in _rows(tmp_path / "bad" / "rejected.csv")}
    assert rejected["no-image"].startswith("image not found")
    assert rejected["empty-caption"] == "caption is empty or not text"
    assert rejected["corrupt"].startswith("image cannot be decoded")
    assert rejected["truncated"].startswith("image cannot be decoded")
    assert rejected["too-large"] == "image too large (300x300 pixels; limit 62500)"
    assert rejected["number-caption"] == "caption is empty or not text"
    assert rejected["long-caption"] == "caption longer than 2000 characters"
    assert any("invalid JSON" in reason for reason in rejected.values())
    assert any(reason == "row is not a JSON object" for reason in rejected.values())
    rows = _rows(ranked)
    assert len(rows) == 40 and not set(rejected) & {r["id"] for r in rows}
    assert all(r["influence"] == "" for r in rows)  # no validation set: self-influence only


def test_every_row_rejected_fails_with_the_reason(workspace, tmp_path):
    # three rows (a file of one row is refused before the audit, by the submit checks), no image found
    (workspace / "data" / "allbad.jsonl").write_text("".join(
        json.dumps({"id": f"x{i}", "image": f"nope{i}.png", "caption": "a"}) + "\n" for i in range(3)))
    shutil.copy(workspace / "model.pt", workspace / "no_sidecar.pt")  # a checkpoint from elsewhere
    manifest = workspace / "allbad.json"
    manifest.write_text(json.dumps({"model": {"config": "cfg.json", "checkpoint": "no_sidecar.pt"},
                                    "train": "data/allbad.jsonl", "options": {**OPTIONS, "batch_size": 8}}))
    with pytest.raises(ConfigError, match="no usable rows.*image not found"):
        run_audit(manifest, tmp_path / "allbad")


@pytest.mark.parametrize("options,field", [({"bogus": 1}, "options.bogus"), ({"batch_size": "32"}, "options.batch_size"),
                                           ({"neg_term": "published"}, "options.neg_term"),
                                           ({"projection": {"k": 3}}, "options.projection.k"),
                                           ({"memory_limit": "lots"}, "options.memory_limit"),
                                           ({"memory_limit": 0}, "options.memory_limit"),
                                           ({"partners": 0}, "options.partners"),
                                           ({"partners": 2.5}, "options.partners")])
def test_manifest_errors_name_the_field(workspace, options, field):
    with pytest.raises(ConfigError) as error:
        load_manifest(_write_manifest(workspace, "m.json", options))
    assert error.value.field == field


def test_first_order_and_paper_neg_terms_run_and_differ(workspace, tmp_path, finished):
    exact = {r["id"]: float(r["influence_neg"]) for r in _rows(finished / "ranked.csv")}
    manifest = _write_manifest(workspace, "fo.json", {**OPTIONS, "neg_term": "first_order"})
    first_order = {r["id"]: float(r["influence_neg"]) for r in _rows(run_audit(manifest, tmp_path / "fo"))}
    assert first_order.keys() == exact.keys() and first_order != exact


def test_partitions_average_gradients_over_rebatchings(workspace, tmp_path, finished):
    """partitions=2: each pair's stored gradient is the mean over the training batch and one re-batching."""
    import torch

    from ecif_core.data.batching import rebatch_within
    from ecif_core.influence.gradients import per_pair_gradients
    from ecif_core.data.images import load_batch

    manifest = _write_manifest(workspace, "r2.json", {**OPTIONS, "partitions": 2}, validation=None)
    run_audit(manifest, tmp_path / "r2")
    plan = audit.load_plan(tmp_path / "r2")
    loaded, params, projector = audit.ModelCache().get(load_manifest(manifest))
    batches = list(_batches_of_shard(plan, audit.load_slots(tmp_path / "r2"), 0))
    members = [sp for b in batches for sp in b]
    other = rebatch_within(members, plan.batch_size, seed=hash_seed(1, 1, 0))
    slot, pair = batches[0][0]
    grads = []
    for batch in (batches[0], next(b for b in other if (slot, pair) in b)):
        images, tokens = load_batch([p for _, p in batch], loaded.preprocess, loaded.tokenizer)
        result = per_pair_gradients(loaded.model, params, projector, images, tokens)
        grads.append(result.pos[[s for s, _ in batch].index(slot)])
    stored = torch.from_numpy(audit.open_store(tmp_path / "r2").pos_gradients(slot, slot + 1)[0])
    torch.testing.assert_close(stored, (grads[0] + grads[1]) / 2, rtol=1e-4, atol=1e-6)
    single = torch.from_numpy(audit.open_store(finished).pos_gradients(slot, slot + 1)[0])
    assert not torch.allclose(stored, single)


def test_trace_relative_is_matches_direct_projection(finished):
    """relative-IS from stored numbers equals |projection of C onto span{H^-1 g_pos, H^-1 g_neg}|."""
    import torch

    plan, store = audit.load_plan(finished), audit.open_store(finished)
    test_grad = torch.from_numpy(store.validation_gradient())
    got = trace_relative_is(finished, test_grad)
    inverse = audit.inverse_for(plan, store)
    for slot, _ in audit.load_slots(finished)[:5]:
        d_pos = inverse.apply(torch.from_numpy(store.pos_gradients(slot, slot + 1)))[0]
        d_neg = inverse.apply(torch.from_numpy(store.neg_gradients(slot, slot + 1)))[0]
        basis = torch.stack([d_pos, d_neg], dim=1)
        coef = torch.linalg.lstsq(basis, test_grad.double().unsqueeze(1)).solution
        assert got[slot] == pytest.approx(float((basis @ coef).norm()), rel=1e-5)


def _gradients_for(args: tuple[str, list[int]]) -> None:
    """Worker body for the concurrency test (module level so a spawned process can import it)."""
    import torch

    torch.set_num_threads(1)
    audit_dir, shards = args
    models = audit.ModelCache()
    for shard in shards:
        shard_gradients(audit_dir, shard, models)


@pytest.mark.slow
def test_two_processes_writing_different_shards_match_a_sequential_run(workspace, finished, tmp_path):
    import multiprocessing

    manifest = load_manifest(workspace / "manifest.json")
    prepare(manifest, tmp_path / "par")
    shards = audit.load_plan(tmp_path / "par").shards
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        pool.map(_gradients_for, [(str(tmp_path / "par"), list(range(0, shards, 2))),
                                  (str(tmp_path / "par"), list(range(1, shards, 2)))])
    store = audit.open_store(tmp_path / "par")
    assert store.done_count("gradients") == shards
    for read in (lambda s: s.pos_gradients(), lambda s: s.neg_gradients(), lambda s: s.term_column("clip_score")):
        np.testing.assert_array_equal(read(store), read(audit.open_store(finished)))


def test_manifest_rules_checkpoint_rank_by_and_sidecar_partition(workspace):
    base = {"model": {"config": "cfg.json", "checkpoint": "model.pt"}, "train": "data/train.jsonl"}
    cases = [({**base, "model": {"config": "cfg.json"}}, "model.checkpoint"),
             ({**base, "model": {"checkpoint": "missing.pt"}}, "model.checkpoint"),
             ({**base, "options": {"rank_by": "influence"}}, "options.rank_by"),
             ({**base, "options": {"batch_size": 16}}, "options.batch_size"),
             ({**base, "model": {**base["model"], "arch": "RN50"}}, "model")]
    for manifest, field in cases:
        with pytest.raises(ConfigError) as error:
            load_manifest(manifest, base_dir=workspace)
        assert error.value.field == field


def test_changed_manifest_on_an_existing_audit_folder_is_refused(workspace, finished, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(finished, copy)
    changed = _write_manifest(workspace, "changed.json", {**OPTIONS, "neg_term": "first_order"})
    with pytest.raises(ConfigError) as error:
        run_audit(changed, copy)
    assert error.value.field == "options.neg_term"


def test_the_audit_damping_factor_option_is_read_under_its_new_name(workspace, finished, tmp_path):
    """options.damping_factor is now damping_per_mean_eigenvalue (the edit's factor multiplies something
    else): a manifest may still use the old name (deprecated), and an audit folder written before the
    rename still opens and is not taken for a changed manifest."""
    old = _write_manifest(workspace, "old-name.json", {**OPTIONS, "damping_factor": 0.3})
    with pytest.warns(FutureWarning, match="options.damping_factor is deprecated.*damping_per_mean_eigenvalue"):
        assert load_manifest(old).options.damping_per_mean_eigenvalue == 0.3
    both = _write_manifest(workspace, "both-names.json", {**OPTIONS, "damping_factor": 0.3,
                                                          "damping_per_mean_eigenvalue": 0.3})
    with pytest.raises(ConfigError) as error:
        load_manifest(both)
    assert error.value.field == "options.damping_factor"
    copy = tmp_path / "before-rename"
    shutil.copytree(finished, copy)
    plan = json.loads((copy / "plan.json").read_text())
    options = plan["manifest"]["options"]
    options["damping_factor"] = options.pop("damping_per_mean_eigenvalue")
    (copy / "plan.json").write_text(json.dumps(plan))
    assert audit.manifest_of(audit.load_plan(copy)).options.damping_per_mean_eigenvalue == 0.1
    prepare(load_manifest(workspace / "manifest.json"), copy)  # the same manifest: accepted, not "changed"


def test_stages_refuse_incomplete_inputs(workspace, finished, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(finished, copy)
    store = audit.open_store(copy)
    store.root[keys.marker_key("scores")][0] = 0
    with pytest.raises(NotReady, match="not scored"):
        finalize(copy)
    shard_scores(copy, 0, damping=5.0)  # one shard re-scored with another damping
    with pytest.raises(InconsistentAudit, match="different curvature shifts"):
        finalize(copy)
    store.root[keys.VALIDATION_GRAD].attrs["complete"] = False  # a validation stage cut short
    with pytest.raises(NotReady, match="validation stage"):
        shard_scores(copy, 1, damping=5.0)


def test_audit_uses_the_training_partition_with_excluded_and_lone_pairs(workspace, tmp_path):
    """Independent check: batches in the audit = seeded partition of every id minus removals."""
    from ecif_core.data.batching import partition
    from ecif_core.data.sources import read_pairs

    _, _, ids = read_pairs(workspace / "data" / "train.jsonl")
    full = partition(ids, 8, 1)
    excluded = full[0][:7]  # leaves full[0][7] alone in its batch
    train(workspace / "data" / "train.jsonl", workspace / "cfg.json", workspace / "excl.pt",
          TrainConfig(epochs=1, batch_size=8, lr=1e-3, weight_decay=1e-2, seed=1, exclude=excluded))
    (workspace / "excl.json").write_text(json.dumps({"model": {"config": "cfg.json", "checkpoint": "excl.pt"},
                                                     "train": "data/train.jsonl", "options": OPTIONS}))
    ranked = run_audit(workspace / "excl.json", tmp_path / "excl")
    rejected = {r["id"]: r["reason"] for r in _rows(tmp_path / "excl" / "rejected.csv")}
    assert all(rejected[i].startswith("excluded from training") for i in excluded)
    assert rejected[full[0][7]].startswith("alone in its batch")
    batches = {}
    for line in (tmp_path / "excl" / "pairs.jsonl").read_text().splitlines():
        row = json.loads(line)
        batches.setdefault(row["batch"], []).append(row["id"])
    assert list(batches.values()) == full[1:]
    assert len(_rows(ranked)) == 64 - 8


def test_ranked_row_matches_independent_recomputation(workspace, finished):
    """One CSV row's self_influence from scratch: its batch by partition(), its gradients by
    one-at-a-time autograd, H by a direct solve over all stored g_pos."""
    import torch

    from ecif_core.data.batching import partition
    from ecif_core.data.images import load_batch
    from ecif_core.data.sources import read_pairs
    from ecif_core.influence.gradients import embed
    from ecif_core.influence.losses import contrastive_terms, pair_logits

    row = _rows(finished / "ranked.csv")[5]
    pairs, _, ids = read_pairs(workspace / "data" / "train.jsonl")
    batch = next(b for b in partition(ids, 8, 1) if row["id"] in b)
    by_id = {p.id: p for p in pairs}
    loaded, params, projector = audit.ModelCache().get(load_manifest(workspace / "manifest.json"))
    images, tokens = load_batch([by_id[i] for i in batch], loaded.preprocess, loaded.tokenizer)
    u, v = embed(loaded.model, images, tokens)
    pos, neg = contrastive_terms(pair_logits(u, v, loaded.model.logit_scale.exp().detach()))
    n = batch.index(row["id"])
    project = lambda gs: projector.project([g.unsqueeze(0) for g in gs])[0].double()
    g_pos = project(torch.autograd.grad(pos[n], params, retain_graph=True))
    g_neg = project(torch.autograd.grad(neg[n], params))
    store, plan = audit.open_store(finished), audit.load_plan(finished)
    all_pos = torch.from_numpy(store.pos_gradients()).double()
    shift = audit.scored_curvature_shift(plan, store)
    h = all_pos.T @ all_pos + shift * torch.eye(plan.dim, dtype=torch.float64)
    expected = float(g_pos @ torch.linalg.solve(h, g_pos + g_neg))
    assert float(row["self_influence"]) == pytest.approx(expected, rel=2e-3)


def test_curvature_from_shard_partial_sums_or_shard_rows_equals_the_all_rows_sum(workspace, tmp_path, monkeypatch):
    """Each gradients shard stores sum g_pos g_pos^T of its rows when that is smaller than the rows
    (partial_sums_pay); the curvature stage adds one shard at a time, the stored sum or the sum of
    the shard's rows: the Fisher of all N rows either way, bit for bit, and with stored sums the
    stage never reads the rows (they are zeroed here)."""
    import torch

    from ecif_core.influence.curvature import eigendecompose, fisher_sum

    eigvals = {}
    for pays in (True, False):
        monkeypatch.setattr(curvature_stage, "partial_sums_pay", lambda plan, pays=pays: pays)
        out = tmp_path / f"pays-{pays}"
        run_audit(workspace / "manifest.json", out)
        plan, store = audit.load_plan(out), audit.open_store(out)
        assert plan.shards > 1
        assert (out / "store.zarr" / "fisher" / "partial" / "c").exists() == pays  # no partial bytes when rows are smaller
        all_rows = torch.from_numpy(store.pos_gradients()).double()
        expected = all_rows.T @ all_rows
        torch.testing.assert_close(fisher_from_partials(store, plan), expected, rtol=1e-10, atol=1e-12)
        eigvals[pays] = store.curvature()[0]
        np.testing.assert_allclose(eigvals[pays], eigendecompose(expected)[0].numpy(), rtol=1e-8, atol=1e-10)
        if pays:
            for shard in range(plan.shards):  # each partial is its own shard's rows only
                rows = torch.from_numpy(store.pos_gradients(shard * plan.shard_rows, (shard + 1) * plan.shard_rows))
                torch.testing.assert_close(torch.from_numpy(store.fisher_partial(shard)),
                                           fisher_sum([rows], plan.dim))
            copy = tmp_path / "copy"
            shutil.copytree(out, copy)
            copied = audit.open_store(copy)
            del copied.root[keys.CURVATURE]
            copied.root[keys.POS_GRADIENTS][:] = 0.0  # the stage must not read the rows
            curvature(copy)
            np.testing.assert_array_equal(copied.curvature()[0], eigvals[pays])
    np.testing.assert_array_equal(eigvals[True], eigvals[False])


def test_partial_sums_are_stored_only_when_smaller_than_the_rows():
    plan = lambda rows, dim: audit.Plan(manifest={}, batch_size=rows, n_batches=1, shard_batches=1, shards=1,  # noqa: E731
                                        dim=dim, pairs_total=rows, pairs_rejected=0)
    assert not curvature_stage.partial_sums_pay(plan(256, 1152))   # the demo: 10.6 MB of sum against 1.2 MB of rows
    assert curvature_stage.partial_sums_pay(plan(2304, 1152)) and not curvature_stage.partial_sums_pay(plan(2303, 1152))
    assert curvature_stage.partial_sums_pay(plan(256, 32))


def test_curvature_of_a_store_without_partial_sums_reads_the_rows(finished, tmp_path):
    """Audit folders made before the partial sums existed still get the same curvature."""
    copy = tmp_path / "old"
    shutil.copytree(finished, copy)
    store = audit.open_store(copy)
    del store.root[keys.CURVATURE]
    del store.root[keys.FISHER_PARTIAL]
    curvature(copy)
    np.testing.assert_allclose(store.curvature()[0], audit.open_store(finished).curvature()[0],
                               rtol=1e-8, atol=1e-10)


def test_model_cache_turns_tf32_off(workspace):
    """CUDA audits must match CPU ones to 1e-4: cuDNN's default TF32 convolutions did not."""
    import torch

    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cuda.matmul.allow_tf32 = True
    audit.ModelCache().get(load_manifest(workspace / "manifest.json"))
    assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32


def test_the_edit_loads_its_model_with_exact_float32_on_theta(finished, monkeypatch):
    """The edit's model comes from the same factory as the audit's: TF32 off (a GPU edit must not
    use the TF32 the audit turns off on purpose), gradients on the audit's theta only."""
    import torch

    from ecif_core.edit import from_audit

    class Loaded(Exception):
        pass

    seen = {}

    def stop_after_the_load(audit_dir, removed, preprocess, tokenizer):
        seen["tf32"] = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
        raise Loaded

    def remember(*args, **kwargs):
        seen["ready"] = ready = factory_ready(*args, **kwargs)
        return ready

    from ecif_core.models import factory

    factory_ready = factory.ready_model
    monkeypatch.setattr(from_audit, "ready_model", remember)
    monkeypatch.setattr(from_audit, "training_batches_of", stop_after_the_load)
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cuda.matmul.allow_tf32 = True
    with pytest.raises(Loaded):
        from_audit.edit_audit(finished, "random:3", finished.parent / "edited")
    assert seen["tf32"] == (False, False)
    model, theta = seen["ready"].model, {id(p) for _, p in seen["ready"].theta}
    patterns = audit.manifest_of(audit.load_plan(finished)).options.theta
    expected = {id(p) for _, p in factory.select_theta(model, patterns)}
    assert theta == expected and {id(p) for p in model.parameters() if p.requires_grad} == expected


def test_memory_limit_option_reaches_the_gradients_stage(workspace, finished, tmp_path, monkeypatch):
    """options.memory_limit goes to per_pair_gradients, which then runs the batches in the planned
    slices; the stored gradients are those of the audit without it."""
    from ecif_core.influence import memory

    calls = []
    monkeypatch.setattr(memory, "plan_chunks", lambda limit, *rest: calls.append(limit) or (3, 4))
    manifest = _write_manifest(workspace, "m-memory.json", {**OPTIONS, "memory_limit": "3GB"})
    out = tmp_path / "memory"
    prepare(load_manifest(manifest), out)
    shard_gradients(out, 0)
    assert calls and set(calls) == {3 << 30}
    rows = audit.load_plan(out).shard_rows
    ours = audit.open_store(out).pos_gradients(0, rows)
    reference = audit.open_store(finished).pos_gradients(0, rows)
    np.testing.assert_allclose(ours, reference, rtol=1e-4, atol=1e-5 * float(np.abs(reference).max()))


def _no_sidecar_checkpoint(workspace: Path) -> str:
    """The trained model without its sidecar: a checkpoint from elsewhere, audited on any file."""
    if not (workspace / "no_sidecar.pt").exists():
        shutil.copy(workspace / "model.pt", workspace / "no_sidecar.pt")
    return "no_sidecar.pt"


def _run_with_roots(manifest_path: Path, out: Path, roots) -> list[dict]:
    """The audit with data roots, as the service's workers run it: the service pipeline (here with
    its in-process dispatcher and a SQLite database); the rows of its results.csv."""
    from services import repository
    from services.db.session import session_scope, upgrade
    from services.pipeline import LocalDispatcher, Pipeline

    url = f"sqlite:///{out.resolve()}.db"
    upgrade(url)
    with session_scope(url) as session:
        audit_id = repository.create_audit(session, "test", load_manifest(manifest_path), out, audit_dir=out).id
    dispatcher = LocalDispatcher()
    pipeline = Pipeline(url, dispatcher, image_roots=roots)
    pipeline.start(audit_id)
    dispatcher.drain(pipeline)
    return list(csv.DictReader("".join(repository.results_csv(url, audit_id)).splitlines()))


def test_a_hard_linked_image_is_a_rejected_row_and_the_audit_goes_on(workspace, tmp_path):
    import os

    from ecif_core.data.confine import data_roots

    lines = (workspace / "data" / "train.jsonl").read_text().splitlines()[:40]
    outside = tmp_path / "outside.png"  # a file outside the data root, with a second name inside it
    shutil.copy(workspace / "data" / json.loads(lines[0])["image"], outside)
    if not (workspace / "data" / "linked.png").exists():
        os.link(outside, workspace / "data" / "linked.png")
    linked = {"id": "linked", "image": "linked.png", "caption": "a photo of the digit one"}
    (workspace / "data" / "linked.jsonl").write_text("\n".join(lines + [json.dumps(linked)]) + "\n")
    manifest = workspace / "linked.json"
    manifest.write_text(json.dumps({"model": {"config": "cfg.json", "checkpoint": _no_sidecar_checkpoint(workspace)},
                                    "train": "data/linked.jsonl", "options": OPTIONS}))
    ranked = _run_with_roots(manifest, tmp_path / "refused", data_roots([workspace]))
    [row] = _rows(tmp_path / "refused" / "rejected.csv")
    assert (row["row"], row["id"]) == ("41", "linked")
    assert row["reason"].startswith("image is a hard link (2 names") and "ECIF_ALLOW_HARD_LINKS=true" in row["reason"]
    assert len(ranked) == 40
    allowed = _run_with_roots(manifest, tmp_path / "allowed", data_roots([workspace], allow_hard_links=True))
    assert "linked" in {r["id"] for r in allowed} and len(allowed) == 41


def test_a_later_duplicate_id_is_a_rejected_row_and_training_and_audit_keep_the_first(workspace, tmp_path):
    from ecif_core.data.batching import partition
    from ecif_core.data.sources import read_pairs

    lines = (workspace / "data" / "train.jsonl").read_text().splitlines()
    same_id = {**json.loads(lines[2]), "caption": "a photo of the digit seven"}  # row 3's id, another pair
    data = workspace / "data" / "dups.jsonl"
    data.write_text("\n".join(lines + [json.dumps(same_id), lines[9]]) + "\n")  # and row 10 again, as is
    result = train(data, workspace / "cfg.json", workspace / "dups.pt",
                   TrainConfig(epochs=1, batch_size=8, lr=1e-3, weight_decay=1e-2, seed=1))
    assert json.loads(result.sidecar.read_text())["pairs_used"] == 64  # the first rows were trained on
    (workspace / "dups.json").write_text(json.dumps({"model": {"config": "cfg.json", "checkpoint": "dups.pt"},
                                                     "train": "data/dups.jsonl", "options": OPTIONS}))
    ranked = run_audit(workspace / "dups.json", tmp_path / "dups")  # the sidecar's ids: the same set
    rejected = [(r["row"], r["id"], r["reason"]) for r in _rows(tmp_path / "dups" / "rejected.csv")]
    assert rejected == [("65", same_id["id"], "duplicate of row 3"),
                        ("66", json.loads(lines[9])["id"], "duplicate of row 10")]
    rows = {r["id"]: r for r in _rows(ranked)}
    assert len(rows) == 64 and rows[same_id["id"]]["caption"] == json.loads(lines[2])["caption"]
    plan = audit.load_plan(tmp_path / "dups")
    assert (plan.pairs_total, plan.pairs_rejected, plan.pairs_usable) == (66, 2, 64)  # every row counted once
    # the batches are the partition of the original file's ids: the duplicates changed nothing
    _, _, ids = read_pairs(workspace / "data" / "train.jsonl")
    batches = {}
    for line in (tmp_path / "dups" / "pairs.jsonl").read_text().splitlines():
        row = json.loads(line)
        batches.setdefault(row["batch"], []).append(row["id"])
    assert list(batches.values()) == partition(ids, 8, 1)


def test_an_empty_or_too_small_train_file_fails_with_a_reason_that_says_what_to_do(workspace, tmp_path):
    from ecif_core.data.batching import partition
    from ecif_core.data.sources import read_pairs

    lines = (workspace / "data" / "train.jsonl").read_text().splitlines()
    _, _, ids = read_pairs(workspace / "data" / "train.jsonl")
    apart = {batch[0] for batch in partition(ids, 8, 1)[:2]}  # two pairs in two different batches
    missing = [json.dumps({**json.loads(line), "image": "images/missing.png"}) for line in lines]
    spread = [line if json.loads(line)["id"] in apart else bad for line, bad in zip(lines, missing)]
    cases = [("", "has no rows \\(the file is empty\\); add image-caption pairs to it"),
             (lines[0] + "\n", "only 1 usable pair is left: a contrastive batch needs at least 2 pairs, "
                               "so add pairs to the file"),
             ("\n".join(spread) + "\n", "no batch holds two of the 2 usable pairs \\(each is alone in its batch "
                                        "after removals\\): a contrastive batch needs at least 2 pairs")]
    checkpoint = _no_sidecar_checkpoint(workspace)
    for number, (content, message) in enumerate(cases):
        (workspace / "data" / f"small{number}.jsonl").write_text(content)
        manifest = workspace / f"small{number}.json"
        manifest.write_text(json.dumps({"model": {"config": "cfg.json", "checkpoint": checkpoint},
                                        "train": f"data/small{number}.jsonl",
                                        "options": {**OPTIONS, "batch_size": 8, "seed": 1}}))
        with pytest.raises(ConfigError, match=message) as error:
            run_audit(manifest, tmp_path / f"small{number}")
        assert error.value.field == "train"
        with pytest.raises(ConfigError, match=message):  # ecif train says the same
            train(workspace / "data" / f"small{number}.jsonl", workspace / "cfg.json", tmp_path / "small.pt",
                  TrainConfig(epochs=1, batch_size=8, lr=1e-3, weight_decay=1e-2, seed=1))


def test_a_validation_set_of_one_pair_fails_with_a_reason_that_says_what_to_do(workspace, tmp_path):
    line = (workspace / "data" / "val.jsonl").read_text().splitlines()[0]
    (workspace / "data" / "val1.jsonl").write_text(line + "\n")
    manifest = _write_manifest(workspace, "val1.json", OPTIONS, validation="data/val1.jsonl")
    with pytest.raises(ConfigError, match="only 1 usable pair is left: .*so add pairs to the file") as error:
        run_audit(manifest, tmp_path / "val1")
    assert error.value.field == "validation"


def test_the_partners_option_fills_dropped_partner_mass_and_changes_the_gradients(workspace, finished, tmp_path):
    """options.partners reaches the gradients stage: every ranked row gets its dropped softmax mass
    (the exact audit leaves the column empty), and the stored gradients are the approximation's."""
    manifest = _write_manifest(workspace, "m-partners.json", {**OPTIONS, "partners": 2})
    rows = _rows(run_audit(manifest, tmp_path / "partners"))
    assert rows and all(float(r["dropped_partner_mass"]) > 0 for r in rows)
    assert all(r["dropped_partner_mass"] == "" for r in _rows(finished / "ranked.csv"))
    shard_rows = audit.load_plan(finished).shard_rows
    ours = audit.open_store(tmp_path / "partners").pos_gradients(0, shard_rows)
    exact = audit.open_store(finished).pos_gradients(0, shard_rows)
    assert not np.allclose(ours, exact, rtol=1e-3, atol=1e-6)
