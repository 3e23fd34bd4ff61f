import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config, items):
    """Tests under tests/services talk to PostgreSQL, Redis, Chromium and worker processes: mark them
    `services`, so `-m "not slow and not services"` is the quick subset (README)."""
    import pytest

    for item in items:
        if "tests/services/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(pytest.mark.services)
