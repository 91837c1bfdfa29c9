"""A process that writes rooms through a store until it is killed (the crash tests' victim).

    python store_writer.py json DATA_DIR ROOM...
    python store_writer.py postgres URL ROOM...

One thread per room writes ``{"n": 0}``, ``{"n": 1}``, ... and prints ``sent ROOM N`` before and
``ack ROOM N`` after each ``save_room`` (after it returned: durable). A thread stops at the first
store error (the database was killed under it).
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path

from atlas.store import JsonStore, RoomState, Store, StoreError
from atlas.store.postgres import PostgresStore

PAD = "p" * 2000  # big enough that a torn write would show


def main() -> None:
    kind, target, *rooms = sys.argv[1:]
    store: Store = JsonStore(Path(target)) if kind == "json" else PostgresStore(target, timeout=2.0)
    store.prepare()
    lock = threading.Lock()

    def say(line: str) -> None:
        with lock:
            sys.stdout.write(line + "\n")
            sys.stdout.flush()

    def write(room: str) -> None:
        n = 0
        while True:
            say(f"sent {room} {n}")
            try:
                store.save_room(room, RoomState(prefs={"n": n, "pad": PAD}))
            except StoreError:
                return
            say(f"ack {room} {n}")
            n += 1

    threads = [threading.Thread(target=write, args=(room,)) for room in rooms]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


if __name__ == "__main__":
    main()
