"""scripts/install_detectron2.py finds detectron2's sdist through the index pip is configured with."""
import hashlib
import http.server
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from conftest import load_script

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def installer():
    return load_script("scripts/install_detectron2.py")


@pytest.fixture
def index(tmp_path):
    """A PEP 503 index on the loopback address holding one file, served from tmp_path."""
    project = tmp_path / "simple" / "pb1-detectron2"
    project.mkdir(parents=True)
    (tmp_path / "files").mkdir()
    handler = lambda *a: http.server.SimpleHTTPRequestHandler(*a, directory=str(tmp_path))  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/simple", project, tmp_path / "files"
    server.shutdown()


def publish(index, data: bytes):
    url, project, files = index
    (files / "pb1-detectron2-0.6.tar.gz").write_bytes(data)
    (project / "index.html").write_text(
        '<html><body><a href="../../files/pb1-detectron2-0.6.tar.gz#sha256=x">pb1-detectron2-0.6.tar.gz</a>'
        '<a href="../../files/other.whl">other.whl</a></body></html>')
    return url


def test_the_sdist_comes_from_pip_index_url_and_is_hash_checked(installer, index, tmp_path, monkeypatch):
    data = b"not really a tarball"
    monkeypatch.setenv("PIP_INDEX_URL", publish(index, data))
    monkeypatch.setattr(installer, "SDIST_SHA256", hashlib.sha256(data).hexdigest())
    assert installer.pip_indexes()[0] == index[0]
    installer.fetch(tmp_path / "got.tar.gz")
    assert (tmp_path / "got.tar.gz").read_bytes() == data


def test_a_wrong_hash_or_an_unreachable_index_is_one_line_naming_what_was_tried(installer, index, tmp_path,
                                                                                   monkeypatch):
    url = publish(index, b"tampered")
    monkeypatch.setenv("PIP_INDEX_URL", url)
    monkeypatch.setenv("PIP_EXTRA_INDEX_URL", "http://127.0.0.1:9/simple")
    with pytest.raises(SystemExit) as error:
        installer.fetch(tmp_path / "got.tar.gz")
    message = str(error.value)
    assert "\n" not in message and message.startswith("install_detectron2: could not fetch pb1-detectron2-0.6.tar.gz")
    assert f"sha256 {hashlib.sha256(b'tampered').hexdigest()}, expected {installer.SDIST_SHA256}" in message
    assert "http://127.0.0.1:9/simple: " in message and not (tmp_path / "got.tar.gz").exists()


def test_without_pip_configuration_the_default_index_is_pips_own():
    code = "import sys; sys.path.insert(0, 'scripts'); import install_detectron2 as i; print(i.pip_indexes()[0])"
    env = {"PATH": "/usr/bin:/bin", "PIP_CONFIG_FILE": "/dev/null", "HOME": "/nonexistent"}
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, env=env)
    from pip._internal.models.index import PyPI

    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == PyPI.simple_url
