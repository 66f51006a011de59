"""Atomic writes: a reader sees the old file (or folder) or the new one, never a half-written one.

Temporary files and folders are written beside their target and named ``.<target>.tmp-<host>-<pid>-<random>``,
so that `remove_stale_temporaries` can clean up after processes that died before renaming them (a killed run),
and never touches those of a process still writing: a folder set aside to be replaced (``...-old-...``) whose
target is missing is put back, anything else is deleted.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None
import shutil
import socket
import tempfile
import uuid
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

_HOST = socket.gethostname().replace("-", "_")


def _temp_prefix(path: Path) -> str:
    return f".{path.name}.tmp-{_HOST}-{os.getpid()}-"


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0


def _no_space(error: OSError, path: Path, tmp: Path) -> OSError:
    """A disk-full error as one line: the path, what was written when the disk filled, what is free."""
    if error.errno != errno.ENOSPC:
        return error
    written, free = _size(tmp) / 2**20, shutil.disk_usage(path.parent).free / 2**20
    return OSError(errno.ENOSPC, f"No space left on the disk of {path} while writing it ({written:.1f} MiB written "
                                 f"when it filled, {free:.1f} MiB free now; it needs more than that): free some space "
                                 "there, or use another --output-dir, and run the same command again (nothing saved "
                                 "before was changed).")


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` on a temporary file beside `path`, fsync it, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private
        os.replace(tmp, path)
    except OSError as error:
        failure = _no_space(error, path, Path(tmp))
        if os.path.exists(tmp):
            os.remove(tmp)
        if failure is error:
            raise
        raise failure from None
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)

    atomic_write(path, write)


def atomic_write_json(path: str | os.PathLike, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


@contextmanager
def atomic_folder(path: str | os.PathLike, keep_existing: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary folder beside `path` to fill; when the block ends without error it replaces `path`
    (a folder already there is renamed aside first, put back if the swap fails, and removed after). On error the
    temporary folder is deleted and `path` is left as it was.

    With `keep_existing`, a `path` that exists when the block ends is kept and the new folder discarded: the first
    of several writers racing to create the same folder (e.g. a shared cache) wins, and no reader ever sees a
    folder replaced under it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(path), dir=path.parent))
    old = None
    try:
        yield tmp
        os.chmod(tmp, 0o755)  # mkdtemp makes it private
        if keep_existing:
            try:
                os.rename(tmp, path)  # fails when another writer's folder is already there (not empty)
            except OSError:
                if not (path.is_dir() and any(path.iterdir())):
                    raise
                shutil.rmtree(tmp, ignore_errors=True)  # lost the race: theirs stays
            return
        if path.exists():
            old = path.with_name(f"{_temp_prefix(path)}old-{uuid.uuid4().hex}")
            os.replace(path, old)
        try:
            os.replace(tmp, path)
        except BaseException:
            if old is not None:
                os.replace(old, path)
                old = None
            raise
    except OSError as error:
        failure = _no_space(error, path, tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        if failure is error:
            raise
        raise failure from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def remove_folder(path: str | os.PathLike) -> None:
    """Remove a folder so that no reader ever sees it half removed: it is renamed to a temporary name first (which
    `remove_stale_temporaries` deletes if the process dies before it is gone)."""
    path = Path(path)
    if not path.exists():
        return
    aside = path.with_name(f"{_temp_prefix(path)}removing-{uuid.uuid4().hex}")
    os.replace(path, aside)
    shutil.rmtree(aside, ignore_errors=True)


LOCK_NAME = ".hificl.lock"


class FolderLockedError(RuntimeError):
    """Another run is writing to the output folder."""


def _holder_error(folder: Path, lock: Path) -> FolderLockedError:
    try:
        holder = json.loads(lock.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        holder = {}
    return FolderLockedError(
        f"Another hificl run (pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}) is "
        f"writing to {folder}. Wait for it to finish, or give this run another --output-dir.")


@contextmanager
def _flocked(lock: Path, folder: Path, mine: str) -> Iterator[None]:
    try:
        fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o644)
    except PermissionError:
        raise PermissionError(f"The output folder {folder} is not writable: give another --output-dir.") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _holder_error(folder, lock) from None
        os.ftruncate(fd, 0)
        os.write(fd, mine.encode())
        yield
    finally:
        os.close(fd)  # releases the lock; the file stays (unlinking it could race a run opening it)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(folder: str | os.PathLike, recursive: bool = True) -> list[Path]:
    """Delete the temporary files and folders that processes of this host left in `folder` (and below) when they
    were killed between writing and renaming; returns what was removed."""
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for entry in list(folder.iterdir()):
        marker = ".tmp-"
        if entry.name.startswith(".") and marker in entry.name:
            target, rest = entry.name[1:].split(marker, 1)
            host_pid = rest.split("-")
            if len(host_pid) >= 2 and host_pid[0] == _HOST and host_pid[1].isdigit() and not _alive(int(host_pid[1])):
                original = folder / target
                if host_pid[2:3] == ["old"] and not original.exists():
                    os.replace(entry, original)  # killed between setting it aside and putting the new one in
                elif entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)
                removed.append(entry)
                continue
        if recursive and entry.is_dir() and not entry.is_symlink():
            removed += remove_stale_temporaries(entry, recursive)
    return removed


@contextmanager
def folder_lock(folder: str | os.PathLike) -> Iterator[Path]:
    """Hold `folder` (created if needed) for one run: an exclusive advisory lock (``flock``) on a lock file that
    names this process; a second run gets `FolderLockedError` naming the holder. The system releases the lock of a
    process that dies, so a killed run never blocks the next one. (Where ``flock`` does not exist, a lock file
    made with O_EXCL, taken over when its process of this host is gone.) Also checks, before anything is trained,
    that the folder can be written to."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"The output folder {folder} is a file: give another --output-dir.")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise PermissionError(f"Cannot create the output folder {folder} ({error.strerror}): give another "
                              "--output-dir.") from None
    lock = folder / LOCK_NAME
    mine = json.dumps({"host": _HOST, "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S")})
    if fcntl is not None:
        with _flocked(lock, folder, mine):
            remove_stale_temporaries(folder)
            yield folder
        return
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                holder = json.loads(lock.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                holder = {}
            if holder.get("host") == _HOST and isinstance(holder.get("pid"), int) and not _alive(holder["pid"]):
                lock.unlink(missing_ok=True)  # its process died: take it over
                continue
            raise _holder_error(folder, lock) from None
        except PermissionError:
            raise PermissionError(f"The output folder {folder} is not writable: give another --output-dir.") from None
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(mine)
        break
    try:
        remove_stale_temporaries(folder)
        yield folder
    finally:
        with contextlib.suppress(OSError):
            if lock.read_text(encoding="utf-8") == mine:
                lock.unlink()
