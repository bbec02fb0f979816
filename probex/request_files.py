"""The app's request files (uploads, downloaded links, generated cards): how long they live on the server.

Gradio stores an upload under the hash of its content, so two requests sending the same file share ONE path, and the
second may still wait in the queue when the first finishes; ``RequestFiles`` deletes a path only once no request
needs it. UI lifetime, not a verb: probex.service never writes or deletes request files.
"""
from __future__ import annotations

import shutil
import threading
import time
from contextlib import contextmanager
from pathlib import Path


class RequestFiles:
    """Deletes the files of requests (uploads, downloads, generated cards) once they are done with.

    A path is deleted only when no request holds it, none has released it for ``grace_s`` seconds, and it was not
    uploaded again in that time (each upload rewrites the file: its mtime is the last upload); a background sweep
    does it. Nothing is kept longer.
    """

    def __init__(self, grace_s: float = 60.0):
        self.grace_s = grace_s
        self._held: dict[Path, int] = {}
        self._released: dict[Path, float] = {}
        self._lock = threading.Lock()
        self._sweeper = threading.Thread(target=self._sweep_forever, daemon=True, name="probex-request-files")
        self._sweeper.start()

    def hold(self, *paths: str | Path) -> None:
        with self._lock:
            for p in map(Path, paths):
                self._held[p] = self._held.get(p, 0) + 1
                self._released.pop(p, None)

    def release(self, *paths: str | Path) -> None:
        now = time.monotonic()
        with self._lock:
            for p in map(Path, paths):
                self._held[p] = self._held.get(p, 1) - 1
                if self._held[p] <= 0:
                    del self._held[p]
                    self._released[p] = now

    @contextmanager
    def holding(self, *paths: str | Path):
        self.hold(*paths)
        try:
            yield
        finally:
            self.release(*paths)

    def sweep(self) -> list[Path]:
        """Delete every released path whose grace time is over; returns what was deleted."""
        now, wall = time.monotonic(), time.time()
        with self._lock:
            due = [p for p, t in self._released.items()
                   if now - t >= self.grace_s and wall - modified_at(p) >= self.grace_s]
            for p in due:
                del self._released[p]
        for p in due:
            delete_path(p)
        return due

    def _sweep_forever(self) -> None:
        while True:
            time.sleep(max(0.2, self.grace_s / 4))
            self.sweep()


def modified_at(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0  # already gone: due at once


def delete_path(path: Path) -> None:
    """A file (and its folder when that is left empty: Gradio gives each upload its own) or a whole temp dir."""
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
        return
    path.unlink(missing_ok=True)
    try:
        path.parent.rmdir()  # only succeeds when empty
    except OSError:
        pass
