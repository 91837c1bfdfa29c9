"""Both store backends behind one fixture, for the tests that must hold on either.

    def test_x(backend):            # runs twice: backend.name == "json", then "postgres"
        store = backend.open_store()
        backend.cli_args()          # the flags that point `atlas user ...` at this store
        backend.corrupt_room("alice", '{"prefs": []}')
        backend.leftovers("alice")  # whatever is still kept that names alice

The PostgreSQL variant takes a fresh database of its own (``postgres_url``), so it needs the
session's cluster (pg_cluster.py): without PostgreSQL it skips, or fails on CI.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from atlas.store import JsonStore, Store
from atlas.store.postgres import PostgresStore

BACKENDS = ["json", "postgres"]


@dataclass
class Backend:
    name: str
    data_dir: Path
    database_url: str | None = None
    opened: list[Store] = field(default_factory=list)

    @property
    def settings(self) -> dict[str, Any]:
        """The settings that select this store (for ``open_atlas`` or ``Settings``)."""
        return {"data_dir": self.data_dir, "database_url": self.database_url}

    def open_store(self, **options: Any) -> Store:
        """A new, prepared store on this backend's data (as another process would open it)."""
        if self.database_url is None:
            store: Store = JsonStore(self.data_dir)
        else:
            store = PostgresStore(self.database_url, **options)
        store.prepare()
        self.opened.append(store)
        return store

    def cli_args(self) -> list[str]:
        args = ["--data-dir", str(self.data_dir)]
        return args + (["--database-url", self.database_url] if self.database_url else [])

    def corrupt_room(self, room_id: str, content: str) -> str:
        """Store ``content`` as the room's raw value, bypassing the store; returns where it is,
        as a ``StoreCorrupt`` message must name it."""
        if self.database_url is None:
            path = JsonStore(self.data_dir).room_path(room_id)
            path.write_text(content)
            return str(path)
        import psycopg

        with psycopg.connect(self.database_url, autocommit=True) as conn:
            conn.execute(
                "INSERT INTO rooms (id, state) VALUES (%s, %s::json)"
                " ON CONFLICT (id) DO UPDATE SET state = EXCLUDED.state", (room_id, content),
            )
        return f"row {room_id!r} of table rooms"

    def raw_room(self, room_id: str) -> str | None:
        if self.database_url is None:
            path = JsonStore(self.data_dir).room_path(room_id)
            return path.read_text() if path.exists() else None
        import psycopg

        with psycopg.connect(self.database_url) as conn:
            row = conn.execute("SELECT state::text FROM rooms WHERE id = %s", (room_id,)).fetchone()
        return row[0] if row else None

    def leftovers(self, user_id: str) -> list[str]:
        """Everything still kept that belongs to ``user_id``: files named after them (crash
        leftovers included), or rows naming them."""
        if self.database_url is None:
            return sorted(p.name for p in self.data_dir.rglob("*") if user_id in p.name)
        import psycopg

        with psycopg.connect(self.database_url) as conn:
            rows = conn.execute(
                "SELECT 'users/' || id FROM users WHERE id = %(u)s"
                " UNION ALL SELECT 'tokens/' || hash FROM tokens WHERE user_id = %(u)s"
                " UNION ALL SELECT 'rooms/' || id FROM rooms WHERE id = %(u)s"
                " UNION ALL SELECT 'usage/' || user_id || '/' || day FROM usage_days WHERE user_id = %(u)s"
                " UNION ALL SELECT 'reservations/' || id FROM reservations WHERE user_id = %(u)s"
                " UNION ALL SELECT 'admissions/' || user_id FROM admissions WHERE user_id = %(u)s",
                {"u": user_id},
            ).fetchall()
        return sorted(row[0] for row in rows)

    def orphans(self) -> list[str]:
        """Rooms and tokens whose user does not exist (with built-in auth, there must be none)."""
        if self.database_url is None:
            store = JsonStore(self.data_dir)
            users = set(store.user_ids())
            found = [f"rooms/{p.stem}" for p in store.rooms_dir.glob("*.json") if p.stem not in users]
            for path in store.tokens_dir.glob("*.json"):
                record = store.load_token(path.stem)
                if record is not None and record.user_id not in users:
                    found.append(f"tokens/{path.stem}")
            return sorted(found)
        import psycopg

        with psycopg.connect(self.database_url) as conn:
            rows = conn.execute(
                "SELECT 'rooms/' || id FROM rooms WHERE id NOT IN (SELECT id FROM users)"
                " UNION ALL SELECT 'tokens/' || hash FROM tokens"
                " WHERE user_id NOT IN (SELECT id FROM users)"
            ).fetchall()
        return sorted(row[0] for row in rows)

    def age_ledger(self, seconds: float) -> None:
        """Make the live ledger's rows ``seconds`` older, as if the database's clock had moved on
        (PostgreSQL: reservation expiries and admission times; the JSON backend keeps none: its
        admission counts by the clock the test gives it)."""
        if self.database_url is None:
            return
        import psycopg

        with psycopg.connect(self.database_url, autocommit=True) as conn:
            conn.execute("UPDATE reservations SET expires_at = expires_at - make_interval(secs => %s)",
                         (seconds,))
            conn.execute("UPDATE admissions SET at = at - make_interval(secs => %s)", (seconds,))

    def clear_reservations(self) -> None:
        import psycopg

        assert self.database_url is not None
        with psycopg.connect(self.database_url, autocommit=True) as conn:
            conn.execute("DELETE FROM reservations")

    def ledger_rows(self) -> list[tuple]:
        """(user_id, tokens) of every reservation row still stored (PostgreSQL)."""
        import psycopg

        assert self.database_url is not None
        with psycopg.connect(self.database_url) as conn:
            return conn.execute("SELECT user_id, tokens FROM reservations ORDER BY id").fetchall()

    def close(self) -> None:
        for store in self.opened:
            store.close()


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path):
    """The test's store backend: JSON files in a temp dir, or a fresh PostgreSQL database."""
    url = request.getfixturevalue("postgres_url") if request.param == "postgres" else None
    chosen = Backend(request.param, tmp_path / "data", url)
    try:
        yield chosen
    finally:
        chosen.close()
