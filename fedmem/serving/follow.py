"""Live updates: watch a memory directory and serve each new version once it is complete and verified.

fedmem replaces a memory directory whole (``fedmem.memory.replace_dir``: the new one is
written beside it, fsynced and renamed into place), and so does a client's pull; other tools
may not. So a change is acted on only once the directory has looked the same for two polls in
a row, and the new version is then loaded through ``load_memory``, which verifies a private
copy (checksum, signature, base model) and refuses one that changed while it was read. Until
a new version has loaded and verified, the current one keeps serving; a version that fails is
not retried until the directory changes again. Polling, rather than inotify, because it works
the same on every filesystem (network mounts included) and a second's delay is fine here.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Callable

from ..memory import MemoryFormatError
from .engines import Engine, EngineSlot

log = logging.getLogger(__name__)


def directory_state(directory: Path) -> tuple | None:
    """What a change to the directory changes: its identity and each file's name, size, mtime and
    inode (a rename-into-place gives new inodes even when sizes and times match). None if absent."""
    try:
        top = os.stat(directory)
        files = []
        for entry in sorted(os.scandir(directory), key=lambda e: e.name):
            st = entry.stat(follow_symlinks=False)
            files.append((entry.name, st.st_size, st.st_mtime_ns, st.st_ino))
    except (FileNotFoundError, NotADirectoryError):
        return None
    return (top.st_ino, top.st_mtime_ns, tuple(files))


class MemoryFollower:
    """Polls ``directory`` every ``interval`` seconds and puts each new version into ``slot``."""

    def __init__(self, directory: str | os.PathLike, load: Callable[[Path], Engine], slot: EngineSlot,
                 interval: float = 1.0):
        self.directory = Path(directory)
        self.load = load
        self.slot = slot
        self.interval = interval
        self._last_seen: tuple | None = None  # the state at the previous poll
        self._settled: tuple | None = None  # the last state acted on (loaded, or refused)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fedmem-follow", daemon=True)
        self.last_error: str | None = None
        self.checked_at: float | None = None

    def mark_current(self, state: tuple | None) -> None:
        """The slot already serves the directory as it was in ``state`` (taken before that load,
        so a change made during it is still seen)."""
        self._last_seen = self._settled = state

    def poll(self) -> bool:
        """One look at the directory; True when a new version was put in the slot."""
        state = directory_state(self.directory)
        self.checked_at = time.time()
        previous, self._last_seen = self._last_seen, state
        if state is None or state != previous or state == self._settled:
            return False  # absent, still changing, or already dealt with
        self._settled = state
        try:
            engine = self.load(self.directory)
        except (MemoryFormatError, OSError, ValueError) as err:
            self.last_error = str(err)
            log.warning("%s: new contents not served (%s); still serving %s", self.directory, err,
                        self._current_name())
            return False
        current = self.slot.get()
        if current is not None and current.version.get("sha256") == engine.version.get("sha256"):
            return False  # rewritten with the same weights
        self.slot.put(engine)
        self.last_error = None
        log.info("now serving %s (round %s, sha256 %s...) from %s", engine.fingerprint, engine.version.get("round"),
                 engine.version["sha256"][:16], self.directory)
        return True

    def _current_name(self) -> str:
        current = self.slot.get()
        return current.fingerprint if current else "no memory yet"

    def status(self) -> dict:
        return {"directory": str(self.directory), "interval_s": self.interval, "checked_at": self.checked_at,
                "last_error": self.last_error, "swaps": self.slot.swaps}

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.poll()
            except Exception:  # the follower must outlive a surprise; the current version keeps serving
                log.exception("following %s", self.directory)
            self._stop.wait(self.interval)

    def start(self) -> MemoryFollower:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self.interval + 60)
