"""A curator's first hour (issue 26): validate runs the service's submit checks, a wrong model
fails in seconds with one line, no tracebacks (stopped server, Ctrl-C), as real processes."""
from __future__ import annotations

import copy
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.services.conftest import OPTIONS
from tests.conftest import one_thread_env
from tests.services.processes import free_port

ROOT = Path(__file__).resolve().parents[2]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ECIF_")}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]))
    return one_thread_env(env)


def ecif(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "services.cli", *args], env=_env(), capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


def _manifest(data_root: Path, folder: Path, name: str = "m.json", **overrides) -> Path:
    """A manifest in `folder` naming the data root's files by absolute path."""
    manifest = {"model": {"config": str(data_root / "cfg.json"), "checkpoint": str(data_root / "model.pt")},
                "train": str(data_root / "digits/train.jsonl"), "validation": str(data_root / "digits/val.jsonl"),
                "options": OPTIONS, **overrides}
    path = folder / name
    path.write_text(json.dumps(manifest))
    return path


def _one_line_error(result: subprocess.CompletedProcess) -> str:
    """The error output is one `ecif: error:` line, never a traceback."""
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("ecif: error: "), result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def deeper_checkpoint(data_root, tmp_path_factory) -> Path:
    """An open_clip training checkpoint ({epoch, state_dict} with DDP's `module.` prefixes) of a
    model with 4 vision blocks, where the data root's config builds 2."""
    import torch

    from ecif_core.models.factory import load_model
    from tests.core.helpers import MICRO_CONFIG

    config = copy.deepcopy(MICRO_CONFIG)
    config["vision_cfg"]["layers"] = 4
    state = load_model(config=config).model.state_dict()
    path = tmp_path_factory.mktemp("deeper") / "epoch_1.pt"
    torch.save({"epoch": 1, "state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    return path


def test_validate_says_ok_to_a_manifest_the_service_accepts(data_root, tmp_path):
    from ecif_core.data.manifest import load_manifest
    from ecif_core.models.check import check_model_spec

    result = ecif("validate", str(_manifest(data_root, tmp_path)))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["train"]["usable"] == 96 and report["train"]["images"] == {"checked": 96, "missing": 0,
                                                                            "missing_examples": []}
    # the model was built (on the meta device) and its gradient size checked, as at submit
    assert report["gradient_dim"] == check_model_spec(load_manifest(_manifest(data_root, tmp_path)))


def test_validate_estimate_prints_the_expected_time_and_store_size(data_root, tmp_path):
    result = ecif("validate", "--estimate", "--estimate-batches", "1", str(_manifest(data_root, tmp_path)))
    assert result.returncode == 0, result.stderr
    estimate = json.loads(result.stdout)["estimate"]
    assert (estimate["pairs"], estimate["validation_pairs"], len(estimate["measured"]["batch_s"])) == (96, 24, 1)
    assert estimate["measured"]["startup_s"] > 0  # this fresh process's library import, which `ecif audit` pays too
    assert "Traceback" not in result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line == estimate["summary"] and line.startswith("Expected: about ") and " for 96 pairs (" in line
    assert "store about " in line and "measured on 1 batch of 8" in line


def test_a_checkpoint_of_another_architecture_fails_validate_and_audit_within_seconds(
        data_root, deeper_checkpoint, tmp_path):
    manifest = _manifest(data_root, tmp_path, model={"config": str(data_root / "cfg.json"),
                                                     "checkpoint": str(deeper_checkpoint)})
    expected = ("checkpoint has 4 vision blocks (visual.transformer.resblocks), the config builds 2")
    result = ecif("validate", str(manifest))
    assert result.returncode == 2
    assert expected in _one_line_error(result)
    started = time.monotonic()
    result = ecif("audit", str(manifest), "--out", str(tmp_path / "audit"))
    assert time.monotonic() - started < 30  # before prepare decodes an image, not at "gradients shard 0"
    assert result.returncode == 2
    line = _one_line_error(result)
    assert expected in line and "unexpected" not in line and "gradients" not in line
    assert not (tmp_path / "audit" / "ecif.db").exists()  # no audit was started


def test_validate_refuses_an_unknown_architecture_as_the_service_does(data_root, tmp_path):
    from ecif_core.errors import ConfigError
    from services.manifests import confined_manifest

    raw = json.loads(_manifest(data_root, tmp_path).read_text())
    raw["model"] = {"arch": "ViT-B-32x", "checkpoint": str(data_root / "model.pt")}
    (tmp_path / "arch.json").write_text(json.dumps(raw))
    result = ecif("validate", str(tmp_path / "arch.json"))
    assert result.returncode == 2
    line = _one_line_error(result)
    assert "model.arch: unknown open_clip architecture 'ViT-B-32x'" in line
    with pytest.raises(ConfigError) as refused:  # POST /audits answers 422 with the same words
        confined_manifest(raw, [data_root, tmp_path])
    assert line == f"ecif: error: {refused.value}"


def test_validate_names_missing_images_with_a_sample_path(data_root, tmp_path):
    rows = [json.loads(line) for line in (data_root / "digits/train.jsonl").read_text().splitlines()]
    (tmp_path / "moved.jsonl").write_text("".join(json.dumps({**row, "image": f"elsewhere/{row['image']}"}) + "\n"
                                                  for row in rows))
    result = ecif("validate", str(_manifest(data_root, tmp_path, train=str(tmp_path / "moved.jsonl"))))
    assert result.returncode == 2
    line = _one_line_error(result)
    assert line.startswith(f"ecif: error: train: 96 of 96 sampled images not found, e.g. {tmp_path / 'elsewhere'}")
    images = json.loads(result.stdout)["train"]["images"]
    assert images["missing"] == 96 and images["missing_examples"][0].startswith(str(tmp_path / "elsewhere"))


def test_a_training_file_of_one_row_is_refused_by_validate_audit_and_the_service(data_root, tmp_path):
    from ecif_core.errors import ConfigError
    from services.manifests import confined_manifest

    first = (data_root / "digits/train.jsonl").read_text().splitlines()[0]
    (tmp_path / "one.jsonl").write_text(first + "\n")
    manifest = _manifest(data_root, tmp_path, train=str(tmp_path / "one.jsonl"))
    for args in (("validate", str(manifest)), ("audit", str(manifest), "--out", str(tmp_path / "a"))):
        result = ecif(*args)
        assert result.returncode == 2
        assert "train: only 1 usable pair is left: a contrastive batch needs at least 2 pairs" in _one_line_error(result)
    with pytest.raises(ConfigError, match="only 1 usable pair"):
        confined_manifest(json.loads(manifest.read_text()), [data_root, tmp_path])


def test_a_stopped_server_is_one_line_naming_the_address(tmp_path):
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    for args in (("status", "some-id"), ("results", "some-id", "-o", str(tmp_path / "r.csv"))):
        result = ecif(*args, "--server", url, "--key", "k", timeout=120)
        assert result.returncode == 2
        assert _one_line_error(result).startswith(f"ecif: error: cannot reach {url}; is `ecif serve` running?")
    assert not (tmp_path / "r.csv").exists()


LOGGED_TASKS = """
import os, sys, time
from services import pipeline
run = pipeline.Pipeline._execute
def logged(self, stage, audit_id, audit_dir, shard):
    with open(os.environ["TASK_LOG"], "a") as log:
        log.write(f"{stage} {shard}\\n")
    pause = float(os.environ.get("GRADIENT_PAUSE", "0")) if stage == "gradients" else 0
    time.sleep(pause)
    run(self, stage, audit_id, audit_dir, shard)
    time.sleep(pause)  # the shard's numbers are written, its row not yet marked done
pipeline.Pipeline._execute = logged
from services.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _audit_process(manifest: Path, out: Path, log: Path, pause: float) -> subprocess.Popen:
    """`ecif audit` in a process of its own, each task logged (and each gradients shard slowed
    down by `pause` seconds, so that Ctrl-C lands mid-run); one thread, so runs compare bytewise."""
    return subprocess.Popen([sys.executable, "-c", LOGGED_TASKS, "audit", str(manifest), "--out", str(out),
                             "--threads", "1"], env={**_env(), "TASK_LOG": str(log), "GRADIENT_PAUSE": str(pause)},
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _gradient_shards_done(database: Path) -> int:
    if not database.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=1) as conn:
            return conn.execute("SELECT count(*) FROM shards WHERE stage = 'gradients' AND status = 'done'").fetchone()[0]
    except sqlite3.Error:
        return 0


def test_ctrl_c_during_ecif_audit_exits_130_and_the_rerun_resumes_to_the_same_csv(data_root, tmp_path):
    manifest = _manifest(data_root, tmp_path)
    whole = _audit_process(manifest, tmp_path / "whole", tmp_path / "whole.log", 0)
    assert whole.wait(timeout=300) == 0, whole.communicate()
    out = tmp_path / "audit"
    process = _audit_process(manifest, out, tmp_path / "first.log", 0.4)
    deadline = time.monotonic() + 240
    while _gradient_shards_done(out / "ecif.db") < 2 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert process.poll() is None, process.communicate()
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    assert stderr.strip().splitlines()[-1] == (f"ecif: interrupted; run the same command again to resume ({out}: "
                                               "finished shards are kept, the audit goes on where it stopped)")
    done = _gradient_shards_done(out / "ecif.db")
    assert done >= 2 and not (out / "ranked.csv").exists()

    rerun = _audit_process(manifest, out, tmp_path / "rerun.log", 0)
    assert rerun.wait(timeout=300) == 0, rerun.communicate()
    ran = (tmp_path / "rerun.log").read_text().splitlines()
    assert "prepare None" not in ran  # resumed: prepare and the finished shards are not run again
    with sqlite3.connect(out / "ecif.db") as conn:
        (total,) = conn.execute("SELECT count(*) FROM shards WHERE stage = 'gradients'").fetchone()
    assert sum(line.startswith("gradients ") for line in ran) == total - done
    assert (out / "ranked.csv").read_bytes() == (tmp_path / "whole" / "ranked.csv").read_bytes()


SLOW_EDIT = """
import sys, time
from ecif_core.edit import from_audit
write = from_audit._write_edited_model
def slow(model, manifest, chosen, out, record, **kwargs):
    out.mkdir(parents=True, exist_ok=True)
    (out / "partial").write_text("half written")
    print("WRITING", file=sys.stderr, flush=True)
    time.sleep(60)
    return write(model, manifest, chosen, out, record, **kwargs)
from_audit._write_edited_model = slow
from services.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("action", ["--remove", "--demote"])
def test_ctrl_c_during_ecif_edit_exits_130_and_leaves_no_partial_folder(embedded_csv, tmp_path, action):
    out = tmp_path / "edited"
    process = subprocess.Popen([sys.executable, "-c", SLOW_EDIT, "edit", "--audit-dir", str(embedded_csv.parent),
                                action, "top:5:suspicion", "--out", str(out)],
                               env=_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not (out / "partial").exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert process.poll() is None, process.communicate()
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    assert stderr.strip().splitlines()[-1] == f"ecif: interrupted; nothing was written to {out} (run the command " \
                                              "again to edit)"
    assert not out.exists()


# ------------------------------------------------------------------ results to stdout and as Parquet

RANKED = ('rank,id,image,caption,suspicion,influence,suspected\r\n'
          '1,a,/d/a.png,"a dog, running",4.5,-0.25,true\r\n'
          '2,b,/d/b.png,"says ""hi""",,0.5,false\r\n'
          '3,c,/d/c.png,two,3.25,,true\r\n')


@pytest.fixture
def results_server():
    """A loopback HTTP server answering GET /audits/A1/results.csv with RANKED (Bearer k only)."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            ok = self.path.startswith("/audits/A1/results.csv") and self.headers["Authorization"] == "Bearer k"
            body = RANKED.encode() if ok else b'{"detail": "no such audit"}'
            self.send_response(200 if ok else 404)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_results_to_stdout_with_dash(results_server):
    result = subprocess.run([sys.executable, "-m", "services.cli", "results", "A1", "-o", "-", "--server",
                             results_server, "--key", "k"], env=_env(), cwd=ROOT, capture_output=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout == RANKED.encode()  # the results only: no "wrote" line mixed in
    assert not (ROOT / "-").exists()


def _parquet_rows(data: bytes) -> tuple[list[str], list[dict]]:
    import io

    import pyarrow.parquet as pq

    table = pq.read_table(io.BytesIO(data))
    return [f"{f.name}:{f.type}" for f in table.schema], table.to_pylist()


def test_results_as_parquet_with_a_tags_column(results_server, tmp_path):
    expected_schema = ["rank:int64", "id:string", "image:string", "caption:string", "suspicion:double",
                       "influence:double", "suspected:bool", "tags:list<element: string>"]
    expected_rows = [
        {"rank": 1, "id": "a", "image": "/d/a.png", "caption": "a dog, running", "suspicion": 4.5, "influence": -0.25,
         "suspected": True, "tags": ["suspected"]},
        {"rank": 2, "id": "b", "image": "/d/b.png", "caption": 'says "hi"', "suspicion": None, "influence": 0.5,
         "suspected": False, "tags": []},
        {"rank": 3, "id": "c", "image": "/d/c.png", "caption": "two", "suspicion": 3.25, "influence": None,
         "suspected": True, "tags": ["suspected"]}]
    base = [sys.executable, "-m", "services.cli", "results", "A1", "--format", "parquet", "--server", results_server,
            "--key", "k"]
    result = subprocess.run([*base, "-o", str(tmp_path / "r.parquet")], env=_env(), cwd=ROOT, capture_output=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert _parquet_rows((tmp_path / "r.parquet").read_bytes()) == (expected_schema, expected_rows)
    result = subprocess.run([*base, "-o", "-"], env=_env(), cwd=ROOT, capture_output=True, timeout=120)
    assert result.returncode == 0 and _parquet_rows(result.stdout) == (expected_schema, expected_rows)
    refused = ecif("results", "A2", "--format", "parquet", "-o", str(tmp_path / "x.parquet"), "--server",
                   results_server, "--key", "k")
    assert refused.returncode == 2 and "server answered 404: no such audit" in _one_line_error(refused)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.parquet"]  # no partial file left


def test_results_of_an_audit_folder_filtered_as_the_api_filters(embedded_csv, capsys):
    from services.cli import main

    rows = embedded_csv.read_text(encoding="utf-8").splitlines()
    flagged = [row for row in rows[1:] if row.endswith(",true")]
    assert main(["results", "--audit-dir", str(embedded_csv.parent), "-o", "-", "--limit", "3"]) == 0
    assert capsys.readouterr().out.splitlines() == rows[:4]
    assert main(["results", "--audit-dir", str(embedded_csv.parent), "-o", "-", "--suspected-only"]) == 0
    assert capsys.readouterr().out.splitlines() == [rows[0], *flagged]


# ------------------------------------------------------------------ --device

def test_device_flag_is_exported_and_honoured_where_models_are_placed(monkeypatch, tmp_path):
    import torch

    from ecif_core.errors import ConfigError
    from ecif_core.models.runtime import model_device
    from services.cli import apply_threads, build_parser

    monkeypatch.delenv("ECIF_DEVICE", raising=False)
    for verb in (["audit", "m.json", "--out", "o"], ["demo"], ["edit", "--audit-dir", "a", "--remove", "suspected",
                                                               "--out", "o"],
                 ["trace", "--audit-dir", "a", "--image", "i", "--caption", "c"], ["worker"]):
        monkeypatch.delenv("ECIF_DEVICE", raising=False)
        apply_threads(build_parser().parse_args([*verb, "--device", "cpu"]))
        assert os.environ["ECIF_DEVICE"] == "cpu", verb
        assert model_device() == torch.device("cpu")  # even where a GPU is visible
    monkeypatch.setenv("ECIF_DEVICE", "tpu")
    with pytest.raises(ConfigError, match="'tpu' is not one of auto, cpu, cuda"):
        model_device()
    monkeypatch.setenv("ECIF_DEVICE", "auto")
    assert model_device().type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_device_cuda_without_a_gpu_is_refused_before_any_work(data_root, tmp_path):
    import torch

    result = ecif("audit", str(_manifest(data_root, tmp_path)), "--out", str(tmp_path / "a"), "--device", "cuda",
                  "--quiet")
    if torch.cuda.is_available():  # on a GPU machine the audit runs there
        assert result.returncode == 0, result.stderr
    else:
        assert result.returncode == 2
        assert "device: cuda was asked for" in _one_line_error(result)
        assert not (tmp_path / "a").exists()


def test_the_audited_model_is_placed_on_the_device_asked_for(data_root, tmp_path, monkeypatch):
    import torch

    from ecif_core.data.manifest import load_manifest
    from ecif_core.models.cache import ModelCache

    manifest = load_manifest(_manifest(data_root, tmp_path))
    monkeypatch.setenv("ECIF_DEVICE", "cpu")
    loaded, _, _ = ModelCache().get(manifest)
    assert {p.device.type for p in loaded.model.parameters()} == {"cpu"}
    if torch.cuda.is_available():
        monkeypatch.setenv("ECIF_DEVICE", "cuda")
        loaded, _, _ = ModelCache().get(manifest)
        assert {p.device.type for p in loaded.model.parameters()} == {"cuda"}
