"""The store: its interface (``base.Store``), what it keeps (``records``), its backends
(``json_store``, ``postgres``), and the user operations built on it (``users``)."""

from typing import TYPE_CHECKING

from atlas.store.base import Charge, Hold, Ledger, Store
from atlas.store.json_store import JsonStore
from atlas.store.leases import Lease, LocalLeases, RoomLeases
from atlas.store.records import (
    Identity,
    LeaseLost,
    Limits,
    RoomState,
    StoreCorrupt,
    StoreError,
    StoreUnavailable,
    TokenRecord,
    Turn,
    UsageDay,
    UsageRecord,
    UserGone,
    UserRecord,
    hash_token,
    is_valid_user_id,
    mask_key,
    new_token,
)

if TYPE_CHECKING:
    from atlas.config import Settings

__all__ = [
    "Charge", "Hold", "Identity", "JsonStore", "Lease", "LeaseLost", "Ledger", "Limits", "LocalLeases",
    "RoomLeases", "RoomState", "Store", "StoreCorrupt", "StoreError", "StoreUnavailable", "TokenRecord",
    "Turn", "UsageDay", "UsageRecord", "UserGone", "UserRecord", "hash_token", "is_valid_user_id",
    "mask_key", "new_token", "store_for",
]


def store_for(settings: "Settings") -> Store:
    """The store the settings name: PostgreSQL when a database URL is set, else the JSON files
    under the data directory (the embedded default). Call ``prepare()`` before using it, and
    ``close()`` when done."""
    if settings.database_url:
        from atlas.store.postgres import PostgresStore  # psycopg is imported only when used

        return PostgresStore(settings.database_url)
    from atlas.config import prepare_data_dir

    return JsonStore(prepare_data_dir(settings.data_dir))
