"""Atomic writes when the disk is full or read-only: one line naming the path, nothing half-written."""
import errno
import os
import subprocess
from collections import namedtuple

import pytest

from transfer import fileio

Usage = namedtuple("Usage", "total used free")


def test_a_write_that_does_not_fit_is_refused_before_it_starts(tmp_path, monkeypatch):
    target = tmp_path / "metrics.json"
    target.write_text("old")
    monkeypatch.setattr(fileio.shutil, "disk_usage", lambda path: Usage(100, 90, 10))
    with pytest.raises(fileio.DiskError) as error:
        fileio.atomic_write_text(target, "x" * 100)
    assert str(error.value) == f"{target}: cannot write it: no space left (0 MiB free)"
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["metrics.json"]


@pytest.mark.parametrize("code, why", [(errno.ENOSPC, "no space left"), (errno.EROFS, "read-only file system")])
def test_a_write_that_fails_midway_leaves_the_old_file_and_no_temporary_one(tmp_path, monkeypatch, code, why):
    target = tmp_path / "model_final.pth"
    target.write_bytes(b"old")

    def fail(fd):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(fileio.os, "fsync", fail)
    with pytest.raises(fileio.DiskError, match=f"^{target}: cannot write it: {why} \\(\\d+ MiB free\\)$"):
        fileio.atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["model_final.pth"]


def test_a_real_full_file_system_gives_the_same_line(tmp_path):
    """On a 64 KiB tmpfs where this process may mount one (root in a sandbox); skipped elsewhere."""
    small = tmp_path / "small"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(small)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        fileio.atomic_write_bytes(small / "fits.bin", b"a" * 1000)
        with pytest.raises(fileio.DiskError, match=r"big\.bin: cannot write it: no space left"):
            fileio.atomic_write_bytes(small / "big.bin", b"b" * 200_000)
        assert sorted(os.listdir(small)) == ["fits.bin"]
    finally:
        subprocess.run(["umount", str(small)], check=True)


def test_an_atomic_write_leaves_the_permissions_a_plain_write_would(tmp_path):
    plain, atomic = tmp_path / "plain.json", tmp_path / "atomic.json"
    plain.write_text("{}")
    fileio.atomic_write_text(atomic, "{}")
    assert atomic.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777
    atomic.chmod(0o640)
    fileio.atomic_write_text(atomic, "{}")
    assert atomic.stat().st_mode & 0o777 == 0o640
