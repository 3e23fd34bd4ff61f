"""The schema comes only from migrations: after `upgrade`, the database matches the models."""
from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from services.cli import main
from services.db.models import Base
from services.db.session import get_engine, schema_is_current, upgrade


def _differences(url: str) -> list:
    with get_engine(url).connect() as connection:
        return compare_metadata(MigrationContext.configure(connection), Base.metadata)


def test_postgres_schema_matches_the_models(pg_url):
    assert schema_is_current(pg_url)
    assert _differences(pg_url) == []


def test_sqlite_schema_from_ecif_db_upgrade_matches_the_models(tmp_path, monkeypatch):
    url = f"sqlite:///{tmp_path / 'ecif.db'}"
    assert not schema_is_current(url)
    monkeypatch.setenv("ECIF_DATABASE_URL", url)
    from services.settings import get_settings

    get_settings.cache_clear()
    try:
        assert main(["db", "upgrade"]) == 0
    finally:
        get_settings.cache_clear()
    assert schema_is_current(url) and _differences(url) == []
    upgrade(url)  # a second upgrade is a no-op


def test_sessions_use_the_engine_get_engine_returns_now(tmp_path):
    """A session is bound to get_engine(url) when it opens: after get_engine's cache dropped the URL's
    engine (more URLs than it keeps), sessions use the new engine, never a stale second pool."""
    from sqlalchemy import event, text

    from services.db.session import session_scope

    url = f"sqlite:///{tmp_path / 'x.db'}"
    with session_scope(url) as session:
        session.execute(text("SELECT 1"))
    get_engine.cache_clear()
    seen = []
    event.listen(get_engine(url), "after_cursor_execute", lambda *args: seen.append(args[2]))
    with session_scope(url) as session:
        session.execute(text("SELECT 2"))
    assert "SELECT 2" in seen
