"""COCO DensePose, the paper's 7th task: what can be checked without detectron2's DensePose project.

The project is not installed here (it is not on PyPI): the task resolves, is left out of ``all``,
compares with the paper's numbers of its protocol, and stops a suite or a run with one line
saying how to install it. Training and evaluating it needs the project and COCO DensePose.
"""
import csv
import subprocess
import sys

import pytest

from transfer import REPO, suite
from transfer.d2 import densepose, evaluation
from transfer.errors import UserError
from transfer.tasks import TASKS, get_task, require

pytestmark = pytest.mark.skipif(densepose.available(), reason="the DensePose project is installed")


def test_the_task_resolves_and_runs_only_when_named():
    task = get_task("coco_densepose")
    assert task.train == ("densepose_coco_2014_train", "densepose_coco_2014_valminusminival")
    assert task.test == ("densepose_coco_2014_minival",) and task.config_path.is_file()
    assert set(task.metrics) <= set(evaluation.HEADLINES[task.evaluator]) and "APdp75" in task.metrics
    assert "coco_densepose" not in suite.expand_tasks("all")
    assert suite.expand_tasks("coco_densepose") == ["coco_densepose"]
    # the paper's numbers of exactly this protocol: R50-FPN, s1x, fine-tuned
    rows = [r for r in csv.DictReader((REPO / "results" / "published_results.csv").open())
            if (r["task"], r["schedule"], r["protocol"]) == (*task.reference, task.protocol)]
    assert {(r["pretrain"], r["metric"], float(r["value"])) for r in rows} >= {
        ("supervised IN-1M", "APdp75", 50.6), ("MoCo v1 IN-1M 200ep", "APdp75", 53.9)}


@pytest.mark.slow
def test_without_the_project_a_run_and_a_suite_stop_with_one_line_saying_how_to_install_it(moco_weights, tmp_path):
    with pytest.raises(UserError) as error:
        require(TASKS["coco_densepose"])
    line = str(error.value)
    assert "\n" not in line and "not on PyPI" in line
    assert "git+https://github.com/facebookresearch/detectron2@v0.6#subdirectory=projects/DensePose" in line

    from transfer import finetune as ft

    with pytest.raises(UserError, match="needs detectron2's DensePose project"):
        ft.finetune("coco_densepose", moco_weights, "full", 0, tmp_path / "run", tmp_path)
    assert "DensePose project" in (tmp_path / "run" / "metrics.json").read_text()

    done = subprocess.run([sys.executable, "tools/run_suite.py", "--tasks", "coco_densepose", "--weights",
                           f"moco={moco_weights}", "--schedule", "full", "--datasets", str(tmp_path),
                           "--output", str(tmp_path / "suite")], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == f"error: {line}"
