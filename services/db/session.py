"""Engines, sessions and `ecif db upgrade` (Alembic, run from code)."""
from __future__ import annotations

from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Iterator

from sqlalchemy import Engine, create_engine, event, make_url, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

CONNECT_TIMEOUT_S = 10
MIGRATIONS = Path(__file__).resolve().parents[2] / "migrations"


@lru_cache(maxsize=8)
def get_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=5, connect_args=_connect_args(url))


def _connect_args(url: str) -> dict:
    """A database host that drops packets (rather than refusing them) must still end in a 503 or a
    retried task within seconds, not after the OS's TCP timeout; a URL's own connect_timeout wins."""
    return {} if "connect_timeout" in make_url(url).query else {"connect_timeout": CONNECT_TIMEOUT_S}


def _sqlite_pragmas(connection, _record) -> None:
    """Cascading deletes and concurrent readers while a task writes."""
    cursor = connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.close()


@contextmanager
def session_scope(url: str) -> Iterator[Session]:
    """One transaction: committed on success, rolled back on any exception. Bound to get_engine(url)
    each time (not to a cached session factory, whose engine could be one get_engine has since
    dropped from its cache: two pools for one database, and listeners on the wrong one)."""
    session = Session(get_engine(url), expire_on_commit=False)
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


class DatabaseMissing(Exception):
    """The database named by the URL does not exist, or cannot be reached; says what to do."""


def upgrade(url: str, revision: str = "head") -> None:
    """Bring the schema to `revision` with the project's Alembic migrations."""
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    try:
        connection = get_engine(url).connect()
    except OperationalError as exc:
        raise DatabaseMissing(_missing_message(url, exc)) from None
    with connection, connection.begin():
        config.attributes["connection"] = connection
        command.upgrade(config, revision)


def _missing_message(url: str, exc: OperationalError) -> str:
    parsed = make_url(url)
    first = (str(exc.orig).strip().splitlines() or [""])[0] if exc.orig is not None else str(exc)
    if parsed.get_backend_name() == "sqlite":
        folder = Path(parsed.database or ".").parent
        return (f"cannot open the SQLite database {parsed.database} ({first}); create its folder {folder} "
                "or run `ecif db upgrade --create`")
    if "does not exist" in first:
        return (f"database {parsed.database!r} does not exist on {parsed.host}:{parsed.port or 5432} ({first}); "
                f"create it (`createdb -h {parsed.host} -U {parsed.username} {parsed.database}`) "
                "or run `ecif db upgrade --create`")
    return f"cannot connect to the database at {parsed.host}:{parsed.port or 5432} ({first}); check ECIF_DATABASE_URL"


def create_database(url: str) -> str | None:
    """Create the URL's database (Postgres: CREATE DATABASE through the `postgres` database;
    SQLite: the file's folder) when it is missing; returns its name if it was created."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            folder = Path(parsed.database).parent
            if not folder.exists():
                folder.mkdir(parents=True)
                return str(folder)
        return None
    admin = create_engine(parsed.set(database="postgres"), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            exists = connection.execute(text("SELECT 1 FROM pg_database WHERE datname = :name"),
                                        {"name": parsed.database}).scalar()
            if exists:
                return None
            quoted = connection.dialect.identifier_preparer.quote_identifier(parsed.database)
            connection.execute(text(f"CREATE DATABASE {quoted}"))
            return parsed.database
    except OperationalError as exc:
        raise DatabaseMissing(_missing_message(url, exc)) from None
    finally:
        admin.dispose()


def schema_is_current(url: str) -> bool:
    """True when the database is at the newest migration (a readiness check)."""
    from alembic.config import Config
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    heads = set(ScriptDirectory.from_config(config).get_heads())
    with get_engine(url).connect() as connection:
        return set(MigrationContext.configure(connection).get_current_heads()) == heads
