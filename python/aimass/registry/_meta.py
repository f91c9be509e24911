"""The registry's metadata store: one SQLAlchemy Core schema for SQLite and PostgreSQL.

Every write runs in one transaction that first bumps the ``generation`` counter: on SQLite the
transaction is ``BEGIN IMMEDIATE`` (the database's write lock, WAL mode), on PostgreSQL the counter
row's lock serializes writers. So writers never interleave, and a reader that sees the generation
unchanged knows nothing changed. Schema changes go through ``MIGRATIONS`` and the version stored in
``aimass_schema``.
"""
from __future__ import annotations

import contextlib
import os
import random
import sqlite3
import time
import weakref
from typing import Callable, Dict

import sqlalchemy as sa
from sqlalchemy import event

from ._errors import ConflictError, InvalidArgumentError, RegistryError

SCHEMA_VERSION = 1

md = sa.MetaData()
schema_info = sa.Table(
    "aimass_schema", md,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("version", sa.Integer, nullable=False),
)
counters = sa.Table(
    "aimass_counters", md,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("value", sa.BigInteger, nullable=False),
)
models = sa.Table(
    "aimass_models", md,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("name", sa.String(128), nullable=False, unique=True),
    sa.Column("created", sa.Float, nullable=False),
    # the next version number to hand out: only grows, so a deleted version's number is never reused
    sa.Column("next_version", sa.Integer, nullable=False),
)
versions = sa.Table(
    "aimass_versions", md,
    sa.Column("model_id", sa.Integer, sa.ForeignKey("aimass_models.id"), primary_key=True),
    sa.Column("version", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("sha256", sa.String(64), nullable=False, index=True),
    sa.Column("size", sa.BigInteger, nullable=False),
    sa.Column("created", sa.Float, nullable=False),
    sa.Column("source", sa.Text),
    sa.Column("metrics", sa.Text, nullable=False),      # JSON object
    sa.Column("parent", sa.Integer),
    sa.Column("signature", sa.Text, nullable=False),    # JSON, as aimass.runtime.Model.signature
)
labels = sa.Table(
    "aimass_labels", md,
    sa.Column("model_id", sa.Integer, sa.ForeignKey("aimass_models.id"), primary_key=True),
    sa.Column("label", sa.String(128), primary_key=True),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("updated", sa.Float, nullable=False),
)
label_history = sa.Table(
    "aimass_label_history", md,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("model_id", sa.Integer, sa.ForeignKey("aimass_models.id"), nullable=False),
    sa.Column("label", sa.String(128), nullable=False),
    sa.Column("version", sa.Integer),                   # None: the label was removed
    sa.Column("previous", sa.Integer),
    sa.Column("action", sa.String(16), nullable=False),  # set | remove | rollback
    sa.Column("changed", sa.Float, nullable=False),
    sa.Index("ix_aimass_label_history_model_label", "model_id", "label", "id"),
)

# from-version -> function(conn) bringing the schema to from-version + 1
MIGRATIONS: Dict[int, Callable[[sa.Connection], None]] = {}

_PG_INIT_LOCK = 0x41494D53  # pg_advisory_xact_lock key while creating/migrating the schema


def normalize_url(url: str) -> sa.URL:
    """Parse a database URL; a bare postgresql:// picks psycopg (3) when it is installed."""
    try:
        u = sa.engine.make_url(url)
    except Exception as exc:  # sqlalchemy.exc.ArgumentError
        raise InvalidArgumentError(f"registry store: {url!r} is not a database URL ({exc})") from None
    backend = u.get_backend_name()
    if backend == "postgres":
        u = u.set(drivername="postgresql")
        backend = "postgresql"
    if backend == "postgresql" and "+" not in u.drivername:
        try:
            import psycopg  # noqa: F401
            u = u.set(drivername="postgresql+psycopg")
        except ImportError:
            pass
    if backend not in ("sqlite", "postgresql"):
        raise InvalidArgumentError(
            f"registry store: unsupported database {backend!r}; use sqlite:///PATH or postgresql://USER@HOST/DB")
    if backend == "sqlite" and u.database in (None, "", ":memory:"):
        raise InvalidArgumentError(
            "registry store: an in-memory SQLite database cannot be shared; give a file, sqlite:///PATH")
    return u


class MetaStore:
    """An engine plus the transaction discipline above."""

    def __init__(self, url: str):
        self.url = normalize_url(url)
        self.backend = self.url.get_backend_name()
        kw = {}
        if self.backend == "sqlite":
            kw["connect_args"] = {"timeout": 60.0, "check_same_thread": False}
        else:
            kw["pool_pre_ping"] = True
        try:
            self.engine = sa.create_engine(self.url, **kw)
        except ImportError as exc:
            raise RegistryError(
                f"registry store {self.display}: its database driver is not installed ({exc}); "
                "for PostgreSQL: pip install 'psycopg[binary]'") from None
        # a forked child (server workers, multiprocessing) must not use the parent's connections
        ref = weakref.ref(self)
        os.register_at_fork(after_in_child=lambda: ref() is not None and ref().engine.dispose(close=False))
        if self.backend == "sqlite":
            event.listen(self.engine, "connect", _sqlite_connect)
            event.listen(self.engine, "begin", _sqlite_begin)
        self._init_schema()

    @property
    def display(self) -> str:
        return self.url.render_as_string(hide_password=True)

    @contextlib.contextmanager
    def _database_errors(self, what: str):
        try:
            yield
        except sa.exc.DBAPIError as exc:  # server gone, disk full, file not a database, ...
            raise RegistryError(f"registry store {self.display}: {what} failed: {_first_line(exc)}") from None

    @contextlib.contextmanager
    def read(self):
        """A read transaction (a consistent snapshot on both backends)."""
        with self._database_errors("reading"), self.engine.connect() as conn:
            if self.backend == "postgresql":
                conn.execution_options(isolation_level="REPEATABLE READ")
            with conn.begin():
                yield conn

    @contextlib.contextmanager
    def write(self):
        """A write transaction; writers are serialized, the generation counter moves."""
        with self._database_errors("writing"), self.engine.connect() as conn:
            conn.execution_options(aimass_write=True)
            with conn.begin():
                conn.execute(sa.update(counters).where(counters.c.name == "generation")
                             .values(value=counters.c.value + 1))
                yield conn

    def generation(self) -> int:
        with self._database_errors("reading"), self.engine.connect() as conn:
            return int(conn.execute(sa.select(counters.c.value)
                                    .where(counters.c.name == "generation")).scalar_one())

    def close(self) -> None:
        self.engine.dispose()

    def _init_schema(self) -> None:
        try:
            with self.engine.connect() as conn:
                conn.execution_options(aimass_write=True)
                with conn.begin():
                    if self.backend == "postgresql":
                        conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_INIT_LOCK})
                    md.create_all(conn, checkfirst=True)
                    found = conn.execute(sa.select(schema_info.c.version)).scalar()
                    if found is None:
                        conn.execute(schema_info.insert().values(id=1, version=SCHEMA_VERSION))
                        conn.execute(counters.insert().values(name="generation", value=0))
                        return
                    if found > SCHEMA_VERSION:
                        raise ConflictError(
                            f"registry store {self.display} has schema version {found}, newer than this "
                            f"aimass understands ({SCHEMA_VERSION}); upgrade aimass")
                    while found < SCHEMA_VERSION:
                        MIGRATIONS[found](conn)
                        found += 1
                        conn.execute(schema_info.update().values(version=found))
        except sa.exc.DBAPIError as exc:
            raise RegistryError(f"registry store {self.display} cannot be opened: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None) or exc
    return str(orig).strip().splitlines()[0] if str(orig).strip() else type(orig).__name__


def _sqlite_connect(dbapi_conn, _record):
    # the driver's own transaction handling off: _sqlite_begin issues BEGIN / BEGIN IMMEDIATE
    dbapi_conn.isolation_level = None
    cur = dbapi_conn.cursor()
    # Switching a new database to WAL takes an exclusive lock, and SQLite can answer "database is
    # locked" at once (no busy wait) when another process opens the same new store at that moment:
    # retry for up to the connection timeout instead of failing the open.
    deadline = time.monotonic() + 60.0
    while True:
        try:
            cur.execute("PRAGMA journal_mode=WAL")
            break
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) and "busy" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.01 + 0.04 * random.random())
    cur.execute("PRAGMA synchronous=FULL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def _sqlite_begin(conn):
    conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("aimass_write") else "BEGIN")
