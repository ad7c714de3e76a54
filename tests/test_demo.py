"""tools/demo.py's step runner: copies of a command at once, each with its share of the cores."""
import sys
from pathlib import Path

import pytest

from transfer.errors import UserError

from conftest import load_script

pytestmark = pytest.mark.slow  # trains, evaluates or runs tools on generated data: not in `make test-fast`

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def demo():
    return load_script("tools/demo.py")


def test_copies_run_at_once_with_their_thread_share(demo, tmp_path):
    # Each copy waits until both have started: they only finish if they run at the same time.
    script = ("import os, sys, time; from pathlib import Path; d = Path(sys.argv[1]); "
              "(d / str(os.getpid())).write_text(os.environ['OMP_NUM_THREADS']); "
              "end = time.time() + 60\n"
              "while len(list(d.iterdir())) < 2 and time.time() < end: time.sleep(0.05)\n"
              "print('copies', len(list(d.iterdir())))")
    started = tmp_path / "started"
    started.mkdir()
    timings = {}
    demo.step("two copies", [sys.executable, "-c", script, started], timings, jobs=2, threads=3,
              logs=tmp_path / "logs")
    assert [p.read_text() for p in started.iterdir()] == ["3", "3"]
    assert (tmp_path / "logs" / "two_copies.2.log").read_text().strip() == "copies 2"
    assert timings["two copies"] < 60


def test_a_failing_copy_names_its_log(demo, tmp_path):
    # The second copy (whose output goes to its log) fails.
    script = "import os, sys; sys.exit(3 if os.readlink('/proc/self/fd/1').endswith('.2.log') else 0)"
    command = [sys.executable, "-c", script]
    with pytest.raises(UserError, match=r"demo step 'failing' failed \(exit code 3\); see .*failing.2.log"):
        demo.step("failing", command, {}, jobs=2, logs=tmp_path)
