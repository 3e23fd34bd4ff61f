import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# One torch thread in every test process (this one, each pytest-xdist worker, and every `ecif`
# server, worker or command a test starts, through ECIF_TORCH_THREADS): the suite runs two
# processes on two cores, and torch's default (all cores per process) made them fight for them.
TEST_THREADS = os.environ.setdefault("ECIF_TEST_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", TEST_THREADS)
os.environ["ECIF_TORCH_THREADS"] = TEST_THREADS


def pytest_configure(config):
    import torch

    torch.set_num_threads(int(TEST_THREADS))


def xdist_worker_index() -> int:
    """0 for a plain run and pytest-xdist's first worker (gw0), 1 for gw1, ..."""
    return int(os.environ.get("PYTEST_XDIST_WORKER", "gw0")[2:] or 0)


def one_thread_env(env: dict[str, str]) -> dict[str, str]:
    """`env` with this suite's thread count for an `ecif` process a test starts (helpers that
    drop the caller's ECIF_ variables put it back with this)."""
    return {**env, "ECIF_TORCH_THREADS": TEST_THREADS, "OMP_NUM_THREADS": TEST_THREADS}


def pytest_collection_modifyitems(config, items):
    """Tests under tests/services talk to PostgreSQL, Redis, Chromium and worker processes: mark them
    `services`, so `-m "not slow and not services"` is the quick subset (README)."""
    for item in items:
        if "tests/services/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(pytest.mark.services)


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """A moto S3 server for the session; this process (and every process started with
    `s3.env()`) reaches it through the standard AWS environment variables."""
    from tests.s3 import S3Server

    server = S3Server()
    server.start(tmp_path_factory.mktemp("s3-log") / "moto.log")
    saved = {k: os.environ.get(k) for k in server.env()}
    os.environ.update(server.env())
    try:
        yield server
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        server.stop()


@pytest.fixture(autouse=True)
def _torch_threads_restored():
    """`ecif` commands run in-process (`main([...])`) set torch's thread count and ECIF_TORCH_THREADS
    for the rest of the process; restore both after every test, so a later test's numbers (float
    sums depend on the thread count in their last digits) never depend on which tests ran before it."""
    import torch

    threads = torch.get_num_threads()
    variable = os.environ.get("ECIF_TORCH_THREADS")
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    if variable is None:
        os.environ.pop("ECIF_TORCH_THREADS", None)
    else:
        os.environ["ECIF_TORCH_THREADS"] = variable


@pytest.fixture(autouse=True)
def _remembered_fits_forgotten():
    """calibration remembers its last mixture fits for the process (one fit per ranking); a test that patches
    what a fit reads is never served an earlier test's fit."""
    from ecif_core.calibration import forget_remembered_fits

    forget_remembered_fits()
    yield
