"""Install detectron2 into the running Python environment.

Route 1: a compiled detectron2 (``detectron2._C``) is already importable -> nothing to do.
Route 2: install upstream v0.6's Python package from PyPI's ``pb1-detectron2==0.6`` sdist as a
pure-Python package. That sdist is a byte-identical copy of upstream's ``detectron2/`` folder and
model-zoo configs but lacks ``layers/csrc``, so ``pip install pb1-detectron2`` fails at its C++
build step (and ``pip download`` refuses its metadata's URL dependency); we therefore fetch the
file (hash-pinned) through the package index pip is configured with (``PIP_INDEX_URL`` or
pip.conf's ``index-url``, then ``extra-index-url``; pip's default index when none is set), and
install only its ``detectron2/`` folder. The missing compiled module is stood in for at run time
by ``transfer/d2compat.py``.

Users who reach GitHub can instead compile upstream:
    pip install 'git+https://github.com/facebookresearch/detectron2.git'
"""
import functools
import hashlib
import importlib.util
import json
import re
import shutil
import ssl
import subprocess
import sys
import tarfile
import tempfile
import urllib.parse
import urllib.request
from pathlib import Path

PACKAGE, VERSION = "pb1-detectron2", "0.6"
SDIST = f"{PACKAGE}-{VERSION}.tar.gz"
SDIST_SHA256 = "5d2e9e51e523ec72f6a31cca04b0a515492e9514b773a3d134cedc0677170b29"
# PEP 691's JSON answer where the index has one, else PEP 503's HTML page.
ACCEPT = "application/vnd.pypi.simple.v1+json, text/html;q=0.1"

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


@functools.cache
def pip_config() -> dict:
    """``pip config list`` as {"global.index-url": value, ":env:.index-url": value, ...}."""
    listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
    settings = {}
    for line in listed.splitlines():
        key, _, value = line.partition("=")
        settings[key.strip()] = value.strip().strip("'\"")
    return settings


def pip_setting(name: str) -> str:
    """A setting of pip's configuration: the environment's (PIP_...) first, then pip.conf's
    download and global sections; "" when unset."""
    settings = pip_config()
    return next((settings[key] for key in (f":env:.{name}", f"download.{name}", f"global.{name}")
                 if settings.get(key)), "")


def pip_indexes() -> list[str]:
    """The package indexes pip would use: its index-url (pip's default when unset), then its extra ones."""
    return [pip_setting("index-url") or default_index(), *pip_setting("extra-index-url").split()]


def default_index() -> str:
    from pip._internal.models.index import PyPI  # pip's own default, so that no host is written here

    return PyPI.simple_url


def open_url(url: str, headers=None):
    """urllib with pip's certificate bundle when pip has one (proxies come from the environment)."""
    cert = pip_setting("cert")
    context = ssl.create_default_context(cafile=cert) if cert else None
    return urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=120, context=context)


def sdist_url(index: str) -> str:
    """The URL of SDIST on the index's page for PACKAGE (PEP 691 JSON or PEP 503 HTML)."""
    page = f"{index.rstrip('/')}/{PACKAGE}/"
    with open_url(page, {"Accept": ACCEPT}) as r:
        kind, body = r.headers.get("Content-Type", ""), r.read().decode()
    if "json" in kind:
        links = {f["filename"]: f["url"] for f in json.loads(body)["files"]}
    else:
        links = {name.strip(): href for href, name in re.findall(r'<a[^>]*href="([^"]+)"[^>]*>([^<]+)</a>', body)}
    if SDIST not in links:
        raise LookupError(f"no {SDIST} on {page}")
    return urllib.parse.urljoin(page, links[SDIST].split("#")[0])


def fetch(dest: Path) -> None:
    """SDIST from the first of pip's indexes that has it, checked against SDIST_SHA256; one error
    line naming every index tried when none gives it."""
    tried = []
    for index in pip_indexes():
        try:
            url = sdist_url(index)
            with open_url(url) as r:
                data = r.read()
        except (OSError, ValueError, LookupError) as e:
            tried.append(f"{index}: {e}")
            continue
        digest = hashlib.sha256(data).hexdigest()
        if digest != SDIST_SHA256:
            tried.append(f"{url}: sha256 {digest}, expected {SDIST_SHA256}")
            continue
        print(f"fetched {url}")
        dest.write_bytes(data)
        return
    sys.exit(f"install_detectron2: could not fetch {SDIST} through pip's package indexes ({'; '.join(tried)})")


def main() -> None:
    found = installed()
    if found:
        print(f"detectron2 already installed ({found}); nothing to do")
        return
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sdist = tmp / SDIST
        fetch(sdist)
        with tarfile.open(sdist) as tar:
            tar.extractall(tmp, filter="data")
        src = tmp / f"{PACKAGE}-{VERSION}" / "detectron2"
        pkg = tmp / "pkg"
        shutil.copytree(src, pkg / "detectron2")
        (pkg / "pyproject.toml").write_text(PYPROJECT)
        subprocess.check_call(
            [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", str(pkg)]
        )
    print(f"detectron2 0.6 installed as pure Python ({installed()})")


if __name__ == "__main__":
    main()
