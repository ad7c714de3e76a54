"""Install detectron2 into the running Python environment.

Route 1: a compiled detectron2 (``detectron2._C``) is already importable -> nothing to do.
Route 2: install upstream v0.6's Python package from PyPI's ``pb1-detectron2==0.6`` sdist as a
pure-Python package. That sdist is a byte-identical copy of upstream's ``detectron2/`` folder and
model-zoo configs but lacks ``layers/csrc``, so ``pip install pb1-detectron2`` fails at its C++
build step; we therefore fetch it (hash-pinned), and install only its ``detectron2/`` folder.
The missing compiled module is stood in for at run time by ``transfer/d2compat.py``.

Users who reach GitHub can instead compile upstream:
    pip install 'git+https://github.com/facebookresearch/detectron2.git'
"""
import hashlib
import importlib.util
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
from pathlib import Path

SDIST_URL = (
    "https://files.pythonhosted.org/packages/60/26/48f5bbb7ee492696a21da23303daeecdfe3942c498a70d34"
    "108acf63b2bd/pb1-detectron2-0.6.tar.gz"
)
SDIST_SHA256 = "5d2e9e51e523ec72f6a31cca04b0a515492e9514b773a3d134cedc0677170b29"

PYPROJECT = """\
[build-system]
requires = ["setuptools>=61"]
build-backend = "setuptools.build_meta"

[project]
name = "detectron2"
version = "0.6"
description = "detectron2 v0.6 Python package (pure Python, from the pb1-detectron2 sdist)"

[tool.setuptools.packages.find]
include = ["detectron2*"]

[tool.setuptools.package-data]
"*" = ["*.yaml", "*.py"]
"""


def installed() -> str:
    if importlib.util.find_spec("detectron2") is None:
        return ""
    if importlib.util.find_spec("detectron2._C") is not None:
        return "compiled"
    return "pure-python"


def fetch(url: str, sha256: str, dest: Path) -> None:
    with urllib.request.urlopen(url, timeout=120) as r:
        data = r.read()
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256:
        sys.exit(f"install_detectron2: {url} has sha256 {digest}, expected {sha256}")
    dest.write_bytes(data)


def main() -> None:
    found = installed()
    if found:
        print(f"detectron2 already installed ({found}); nothing to do")
        return
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sdist = tmp / "pb1-detectron2-0.6.tar.gz"
        print(f"fetching {SDIST_URL}")
        fetch(SDIST_URL, SDIST_SHA256, sdist)
        with tarfile.open(sdist) as tar:
            tar.extractall(tmp, filter="data")
        src = tmp / "pb1-detectron2-0.6" / "detectron2"
        pkg = tmp / "pkg"
        shutil.copytree(src, pkg / "detectron2")
        (pkg / "pyproject.toml").write_text(PYPROJECT)
        subprocess.check_call(
            [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", str(pkg)]
        )
    print(f"detectron2 0.6 installed as pure Python ({installed()})")


if __name__ == "__main__":
    main()
