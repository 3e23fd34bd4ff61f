"""ecif_core is a library: it never imports web, database, broker or worker code."""
import ast
from pathlib import Path

import ecif_core

# the service layer and the packages of the `service` extra (pyproject.toml): `pip install -e .` has none of them
FORBIDDEN = ("services", "workers", "fastapi", "starlette", "celery", "redis", "sqlalchemy", "alembic", "psycopg",
             "pydantic", "pydantic_settings", "uvicorn", "multipart", "httpx", "prometheus_client", "matplotlib", "tqdm")


def test_ecif_core_imports_no_service_layer():
    offenders = []
    for path in Path(ecif_core.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] in FORBIDDEN]
    assert not offenders, offenders
