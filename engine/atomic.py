"""Atomic file and folder writes: a failed or interrupted export never leaves half a file behind.

A file is written under a temporary name in its destination folder (same filesystem, so the final `os.replace`
is atomic), flushed and fsynced, then renamed. A folder is built as a hidden sibling and renamed into place.
A full disk becomes one clear error that names the path and the free space.
"""
from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path


class DiskFullError(OSError):
    """The destination ran out of space; the message says where and how much was free."""


def _free_bytes(path: Path) -> int:
    probe = path if path.exists() else path.parent
    while not probe.exists():
        probe = probe.parent
    return shutil.disk_usage(probe).free


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def check_free_space(dest: Path, needed_bytes: int) -> None:
    """Refuse before writing anything when `dest`'s filesystem clearly cannot hold `needed_bytes`."""
    free = _free_bytes(Path(dest))
    if needed_bytes > free:
        raise DiskFullError(errno.ENOSPC, f"not enough disk space to write {dest}: need about {_mib(needed_bytes)},"
                            f" {_mib(free)} free; free some space or choose another --out")


def _reraise_if_disk_full(exc: OSError, dest: Path) -> None:
    if exc.errno == errno.EFBIG:   # the process's file size limit (ulimit -f): os.write's error names no file
        raise OSError(exc.errno, f"file size limit reached while writing {dest} (ulimit -f); nothing was left "
                      "behind — raise the limit or choose another --out") from exc
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        raise DiskFullError(exc.errno, f"disk full while writing {dest} ({_mib(_free_bytes(dest))} free);"
                            " nothing was left behind — free some space or choose another --out") from exc


def _default_file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _unique_sibling(dest: Path) -> Path:
    return dest.with_name(f".{dest.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")


def fsync_dir(folder: Path) -> None:
    """Make a rename inside `folder` durable (a no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(dest: Path | str) -> Iterator[Path]:
    """Yield a temporary path beside `dest`; once the block succeeds, fsync it and rename it onto `dest`.

    For writers that want a file name rather than a file object (gguf.GGUFWriter, safetensors.save_file).
    On any error the temporary file is removed and `dest` is untouched.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = _unique_sibling(dest)
    # O_EXCL with mode 0o666: the umask applies as for any new file (mkstemp would make it private, 0600).
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, dest)
        fsync_dir(dest.parent)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        _reraise_if_disk_full(exc, dest)
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(dest: Path | str, text: str) -> None:
    with atomic_path(dest) as tmp:
        tmp.write_text(text, encoding="utf-8")


@contextlib.contextmanager
def atomic_folder(dest: Path | str, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty hidden sibling folder to fill; on success it replaces `dest` in one rename.

    `dest` must not exist (or be an empty folder) unless `overwrite`; an existing one is swapped out only after
    the new folder is complete, so an error never costs the user the previous export.
    """
    dest = Path(dest)
    if dest.exists() and not dest.is_dir():
        raise FileExistsError(f"{dest} exists and is not a folder; choose another --out")
    if dest.is_dir() and any(dest.iterdir()) and not overwrite:
        raise FileExistsError(f"{dest} already exists and is not empty; choose another --out or pass --force")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = _unique_sibling(dest)
    tmp.mkdir(mode=0o777)
    try:
        yield tmp
        file_mode = _default_file_mode()
        for child in tmp.iterdir():
            if child.is_file():
                with open(child, "rb") as fh:
                    os.fsync(fh.fileno())
                # Some writers (safetensors) create private 0600 files; an export should read like any other file.
                os.chmod(child, file_mode)
        old = None
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old-{os.getpid()}-{secrets.token_hex(4)}")
            os.replace(dest, old)
        try:
            os.replace(tmp, dest)
        except OSError:
            if old is not None:
                os.replace(old, dest)  # put the previous export back
            raise
        fsync_dir(dest.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        _reraise_if_disk_full(exc, dest)
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_bytes_synced(path: Path, data: bytes) -> None:
    """Write and fsync a file that no reader sees yet (inside a folder being built, e.g. a checkpoint)."""
    try:
        with open(path, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as exc:
        _reraise_if_disk_full(exc, Path(path))
        raise


def atomic_write_bytes(dest: Path | str, data: bytes) -> None:
    """Replace `dest` with `data` in one rename: readers see the old file or the new one, never a part."""
    with atomic_path(dest) as tmp:
        tmp.write_bytes(data)
