"""The store: its interface (``base.Store``), what it keeps (``records``), its backends
(``json_store``), and the user operations built on it (``users``)."""

from typing import TYPE_CHECKING

from atlas.store.base import Store
from atlas.store.json_store import JsonStore
from atlas.store.records import (
    Identity,
    RoomState,
    StoreCorrupt,
    StoreError,
    TokenRecord,
    Turn,
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
    "Identity", "JsonStore", "RoomState", "Store", "StoreCorrupt", "StoreError", "TokenRecord", "Turn",
    "UserGone", "UserRecord", "hash_token", "is_valid_user_id", "mask_key", "new_token", "store_for",
]


def store_for(settings: "Settings") -> Store:
    """The store the settings name: the JSON files under the data directory (the default)."""
    from atlas.config import prepare_data_dir

    return JsonStore(prepare_data_dir(settings.data_dir))
