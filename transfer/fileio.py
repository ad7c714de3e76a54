"""Atomic file writes (a reader, or a resumed suite, never sees a half-written file), file hashes,
YAML files read with a one-line error when they are not what they should be, and the lock a run's
folder is held with."""
import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import socket
import tempfile
from pathlib import Path

import yaml

from transfer.errors import UserError

# Why a write can fail for want of room or permission: reported as one line naming the path.
DISK_ERRORS = {errno.ENOSPC: "no space left", errno.EDQUOT: "disk quota exceeded",
               errno.EROFS: "read-only file system", errno.EACCES: "permission denied"}


class DiskError(UserError):
    """A result or checkpoint could not be written (full disk, quota, read-only or forbidden folder)."""


def free_space(folder) -> str:
    """The free space of the file system holding ``folder`` (or its nearest existing parent)."""
    folder = Path(folder)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return f"{shutil.disk_usage(folder).free / 2**20:.0f} MiB free"


def disk_error(path, error: OSError) -> DiskError | None:
    """The one-line DiskError for an OSError that is about room or permission, else None; ``path``
    is the file that could not be written, or the folder when the file is not known."""
    if error.errno not in DISK_ERRORS:
        return None
    path = Path(path)
    what, folder = ("in it", path) if path.is_dir() else ("it", path.parent)
    return DiskError(f"{path}: cannot write {what}: {DISK_ERRORS[error.errno]} ({free_space(folder)})")


@contextlib.contextmanager
def disk_errors(path):
    """Turn an OSError of room or permission inside the block into ``disk_error``'s one line for ``path``
    (any other OSError goes on as it is)."""
    try:
        yield
    except OSError as e:
        raise (disk_error(path, e) or e) from None


def temporaries(folder) -> list[Path]:
    """The temporary files of atomic writes (``.<name>.<random>.tmp``) under ``folder``: only a
    process killed mid-write leaves one behind."""
    return [p for p in Path(folder).rglob(".*.tmp") if p.is_file()]


def _mode_for(path: Path) -> int:
    """The permissions ``open(path, "w")`` would leave: the old file's, else 0666 less the umask."""
    if path.exists():
        return path.stat().st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write_bytes(path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, fsync, rename: ``path`` is either the old
    file or the whole new one. No room (checked first, as the size is known) or no permission is a
    DiskError naming the path and the free space; the temporary file never stays behind."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if shutil.disk_usage(path.parent).free < len(data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.fchmod(fd, _mode_for(path))  # mkstemp makes 0600; a result is as readable as a plain open()'s file
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        if tmp:
            Path(tmp).unlink(missing_ok=True)
        raise (disk_error(path, e) or e) from None
    except BaseException:
        if tmp:
            Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def atomic_torch_save(obj, path) -> None:
    import io

    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def sha256_of(path) -> str:
    """A weights file's identity: runs are keyed by it, so a renamed file is still the same weights."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_tensors(path, flag: str):
    """``torch.load`` of a checkpoint of tensors and plain values, never unpickling code.

    ``flag`` names where the path came from (``--resume``), for the one-line error.
    """
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"{flag} {path}: no such file") from None
    except Exception as e:  # not a torch file, or one that needs unpickling code (never done)
        raise UserError(f"{flag} {path}: not a PyTorch checkpoint of tensors ({type(e).__name__})") from None


def read_yaml_mapping(path, holds: str) -> dict:
    """The mapping in the YAML file at ``path`` ({} for an empty file); ``holds`` says what it should
    hold, for the error raised when the file is missing, not YAML or not a mapping."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file (expected {holds})")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise UserError(f"{path}: not valid YAML: {getattr(e, 'problem', None) or type(e).__name__}{where}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected {holds}, found a YAML {type(data).__name__}")
    return data


# ---------------------------------------------------------------------------------------------
# The lock of a folder (a fine-tuning run's, a pre-training sweep's setting)

LOCK = ".lock"


class FolderBusy(Exception):
    """Another process holds the folder's lock; the message names it."""


class FolderLock:
    """An exclusive, non-blocking (or waiting) flock on ``<folder>/.lock``, naming its holder in the file.

    flock locks belong to the open file, so a subprocess that inherits the descriptor keeps the folder
    locked even if its parent is killed; the kernel drops the lock when the last holder exits, and
    it holds across the machines of a shared disk. A folder where the lock cannot be made
    (read-only, full) is a DiskError naming it.
    """

    def __init__(self, folder, wait: bool = False):
        self.path = Path(folder) / LOCK
        self.wait = wait
        self.fd = -1

    def __enter__(self):
        with disk_errors(self.path):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | (0 if self.wait else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(self.fd)
            raise FolderBusy(_holder(self.path)) from None
        os.ftruncate(self.fd, 0)
        try:
            os.write(self.fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        except OSError:  # a full disk: the folder is locked all the same, its holder just goes unnamed
            pass
        return self

    def __exit__(self, *exc) -> None:
        os.close(self.fd)


def _holder(path: Path) -> str:
    try:
        return path.read_text().strip() or "another process"
    except OSError:
        return "another process"


def locked_by(folder) -> str | None:
    """Who holds the folder's lock right now, or None (asked without taking it over)."""
    path = Path(folder) / LOCK
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return _holder(path)
    finally:
        os.close(fd)  # also lets go of the lock if it was taken
    return None
