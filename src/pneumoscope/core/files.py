"""Small file helpers that every module may use without importing the heavy stack (no torch,
NumPy or scikit-learn here): atomic writes and the cache folder."""
from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

# what atomic_write's temporaries are called: "." + the final name + "." + mkstemp's 8 random characters + ".tmp"
TEMPORARY_NAME = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp")


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


class atomic_write:
    """Context manager: write to a temporary file beside `path`, then rename over it on success,
    so a crash never leaves a half-written file under the final name. A failure (a full disk, a
    read-only folder) leaves no temporary behind and raises OSError naming `path`, not the
    temporary's random name."""

    def __init__(self, path: str | os.PathLike, mode: str = "wb", **kwargs):
        self.path, self.mode, self.kwargs = Path(path), mode, kwargs
        self.tmp = None

    def __enter__(self):
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, self.tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
            self.handle = os.fdopen(fd, self.mode, **self.kwargs)
        except OSError as err:
            self._discard()
            raise self._named(err) from None
        return self.handle

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self._discard()
            if isinstance(exc, OSError) and exc.filename is None:  # a write into the handle failed
                raise self._named(exc) from None
            return False
        try:
            self.handle.flush()
            os.fsync(self.handle.fileno())  # on disk before the rename makes it visible
            self.handle.close()
            os.chmod(self.tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give what open() would
            os.replace(self.tmp, self.path)
        except OSError as err:
            self._discard()
            raise self._named(err) from None
        return False

    def _discard(self) -> None:
        """Closes (what cannot be flushed is dropped) and deletes the temporary."""
        handle = getattr(self, "handle", None)
        if handle is not None:
            try:
                handle.close()
            except OSError:
                pass
        if self.tmp is not None:
            try:
                os.unlink(self.tmp)
            except OSError:
                pass

    def _named(self, err: OSError) -> OSError:
        return OSError(err.errno, f"cannot write ({err.strerror})", str(self.path))


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Deletes the temporaries that atomic_write left in `folder` (not below it) when its process
    was killed mid-write, and returns them. Only where no other process is writing: a write in
    progress has such a file too."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = [p for p in folder.iterdir() if TEMPORARY_NAME.fullmatch(p.name) and p.is_file() and not p.is_symlink()]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def default_cache_dir() -> Path:
    """$PNEUMOSCOPE_CACHE, else ~/.cache/pneumoscope."""
    return Path(os.environ.get("PNEUMOSCOPE_CACHE", Path.home() / ".cache" / "pneumoscope"))
