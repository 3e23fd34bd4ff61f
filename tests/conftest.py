import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


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
