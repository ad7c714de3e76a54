"""The suite: planning, run identity, the per-run lock, resume after a kill, concurrent invocations."""
import contextlib
import errno
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from transfer import fileio, report, suite
from transfer.errors import UserError

from conftest import load_script

pytestmark = pytest.mark.slow  # trains, evaluates or runs tools on generated data: not in `make test-fast`

REPO = Path(__file__).resolve().parent.parent


def fake_weights(tmp_path, label, content=b"weights"):
    path = tmp_path / f"{label}.pkl"
    path.write_bytes(content)
    return suite.prepare_weights(str(path), tmp_path)


def test_plan_covers_every_weights_task_and_trial_with_one_folder_each(tmp_path):
    base = suite.prepare_weights(str(fake_weights(tmp_path, "R-50").path), tmp_path, label="supervised")
    moco = suite.prepare_weights(f"moco_v2={fake_weights(tmp_path, 'ckpt', b'other').path}", tmp_path)
    assert (base.label, moco.label) == ("supervised", "moco_v2")
    runs = suite.plan([base, moco], ["voc07", "coco_fpn_1x"], "demo", 3, tmp_path / "out")
    assert len(runs) == 2 * 2 * 3
    assert [(r.task, r.seed, r.weights.label) for r in runs[:4]] == [
        ("voc07", 0, "supervised"), ("voc07", 0, "moco_v2"),
        ("voc07", 1, "supervised"), ("voc07", 1, "moco_v2")]
    assert len({r.dir for r in runs}) == len(runs)
    assert runs[1].dir == (tmp_path / "out" / "moco_v2" / "voc07" / "demo" / "seed0").resolve()
    assert runs[1].weights.sha256 == fileio.sha256_of(moco.path)
    with pytest.raises(UserError, match="used twice"):
        suite.plan([moco, moco], ["voc07"], "demo", 1, tmp_path)
    with pytest.raises(UserError, match="--trials"):
        suite.plan([moco], ["voc07"], "demo", 0, tmp_path)
    with pytest.raises(UserError, match="not found"):
        suite.prepare_weights(str(tmp_path / "missing.pkl"), tmp_path)


def test_state_is_read_from_the_run_folder(tmp_path):
    weights = fake_weights(tmp_path, "moco")
    [run] = suite.plan([weights], ["voc07"], "demo", 1, tmp_path / "out")
    assert suite.state(run) == "new"
    run.dir.mkdir(parents=True)
    assert suite.state(run) == "interrupted"
    record = {"status": "failed", "error": "boom", "weights_sha256": weights.sha256, "metrics": {}}
    run.metrics_path.write_text(json.dumps(record))
    assert suite.state(run) == "failed"
    run.metrics_path.write_text(json.dumps({**record, "status": "ok", "metrics": {"AP": 1.0}}))
    assert suite.state(run) == "done"
    # The same label now names another file: its old results must not pass for this one's.
    other = fake_weights(tmp_path / "out", "moco", b"changed")
    [changed] = suite.plan([other], ["voc07"], "demo", 1, tmp_path / "out")
    with pytest.raises(UserError, match="another weights file"):
        suite.state(changed)


def test_the_run_lock_is_exclusive_and_outlives_the_suite_in_its_subprocess(tmp_path):
    [run] = suite.plan([fake_weights(tmp_path, "moco")], ["voc07"], "demo", 1, tmp_path / "out")
    with suite.RunLock(run) as lock:
        with pytest.raises(suite.RunBusy, match=f"pid {os.getpid()}"):
            suite.RunLock(run).__enter__()
        # A child that inherited the descriptor keeps the run locked after the parent lets go.
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                                 pass_fds=(lock.fd,))
    try:
        with pytest.raises(suite.RunBusy):
            suite.RunLock(run).__enter__()
    finally:
        child.kill()
        child.wait()
    with suite.RunLock(run):  # free again once the last holder is gone
        pass


# ---------------------------------------------------------------------------------------------
# Real runs. The demo tasks take minutes per run on a CPU, so these tests point the suite at a
# real but tiny task: a custom COCO-format dataset of two 64x48 images with a ResNet-18 FPN,
# one training iteration at 64 px, no precise BN. Every run is a real tools/finetune.py
# subprocess (detectron2 trains and evaluates and writes metrics.json), about 15 s of CPU each.
TINY_OPTS = ["TEST.PRECISE_BN.ENABLED", "False", "INPUT.MIN_SIZE_TRAIN", "(64,)",
             "INPUT.MAX_SIZE_TRAIN", "96", "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "96",
             "DATALOADER.NUM_WORKERS", "0"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    import torch
    import torchvision
    import yaml
    from PIL import Image, ImageDraw

    from transfer.convert import convert

    root = tmp_path_factory.mktemp("tiny")
    (root / "images").mkdir()
    images, annotations = [], []
    for i in range(2):
        image = Image.new("RGB", (64, 48), (90, 90, 90))
        x, y = 10 + 20 * i, 8 + 10 * i
        ImageDraw.Draw(image).rectangle([x, y, x + 20, y + 20], fill=(220, 30, 30))
        image.save(root / "images" / f"{i}.jpg")
        images.append({"id": i + 1, "file_name": f"{i}.jpg", "width": 64, "height": 48})
        annotations.append({"id": i + 1, "image_id": i + 1, "category_id": 1, "bbox": [x, y, 20, 20],
                            "area": 400, "iscrowd": 0})
    (root / "data.json").write_text(json.dumps(
        {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "square"}]}))
    (root / "tiny.yaml").write_text(yaml.safe_dump({
        "name": "tiny", "format": "coco", "model": "FPN", "masks": False, "classes": "from_annotations",
        "train": {"json": "data.json", "images": "images"}, "test": {"json": "data.json", "images": "images"},
        "schedule": {"max_iter": 1, "steps": [], "base_lr": 0.001, "ims_per_batch": 1}}))
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18().state_dict(), root / "r18.pth")
    return root / "tiny.yaml", convert(root / "r18.pth", output=root / "r18.pkl").weights_path


def suite_command(tiny, output, trials, weights=None):
    task, pkl = tiny
    return [sys.executable, str(REPO / "tools" / "run_suite.py"), "--tasks", str(task),
            "--weights", f"r18={weights or pkl}", "--trials", str(trials), "--schedule", "custom",
            "--output", str(output), *TINY_OPTS]


def attempts(output, seed, weights="r18"):
    log = Path(output) / weights / "tiny" / "custom" / f"seed{seed}" / "attempts.log"
    return log.read_text().splitlines() if log.exists() else []


def started(output, seed, weights="r18"):
    return sum(line.endswith(": started") for line in attempts(output, seed, weights))


def test_killed_during_run_2_of_3_the_next_invocation_runs_only_2_and_3(tiny, tmp_path):
    import pandas as pd

    output = tmp_path / "out"
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen(suite_command(tiny, output, 3), stdout=log, stderr=subprocess.STDOUT,
                                 cwd=REPO, start_new_session=True)
        deadline = time.time() + 300
        while not started(output, 1) and first.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert started(output, 1), (tmp_path / "first.log").read_text()
        time.sleep(2)  # run 2's fine-tuning process is up
        first.terminate()  # SIGTERM, as `kill` or `scancel` sends it
        assert first.wait(timeout=60) == 130, (tmp_path / "first.log").read_text()
    run_dir = output / "r18" / "tiny" / "custom"
    assert json.loads((run_dir / "seed0" / "metrics.json").read_text())["status"] == "ok"
    assert not (run_dir / "seed1" / "metrics.json").exists() and attempts(output, 1)[-1].endswith("interrupted")
    assert not (run_dir / "seed2").exists()
    first_result = (run_dir / "seed0" / "metrics.json").read_bytes()

    second = subprocess.run(suite_command(tiny, output, 3), capture_output=True, text=True, cwd=REPO)
    assert second.returncode == 0, second.stderr
    assert "Plan: 3 runs (1 done, 1 interrupted, 1 new)" in second.stderr
    assert [started(output, seed) for seed in range(3)] == [1, 2, 1]  # run 1 was not run again
    assert (run_dir / "seed0" / "metrics.json").read_bytes() == first_result
    summary = pd.read_csv(output / "summary.csv")
    assert (summary["n"] == 3).all() and (summary["failed"] == 0).all()
    assert set(summary["metric"]) == {"APbb", "APbb50", "APbb75"} and (summary["task"] == "tiny").all()
    assert sorted(pd.read_csv(output / "runs.csv")["seed"].unique()) == [0, 1, 2]


def test_concurrent_invocations_share_the_runs_without_duplicating_one(tiny, tmp_path):
    import pandas as pd

    output = tmp_path / "out"
    logs = [open(tmp_path / f"suite{i}.log", "w+") for i in range(2)]
    suites = [subprocess.Popen(suite_command(tiny, output, 2), stdout=log, stderr=subprocess.STDOUT,
                               cwd=REPO) for log in logs]
    codes = [s.wait(timeout=600) for s in suites]
    outputs = [(tmp_path / f"suite{i}.log").read_text() for i in range(2)]
    assert codes == [0, 0], outputs
    assert [started(output, seed) for seed in range(2)] == [1, 1]
    # Both invocations end with the complete report, whichever one ran which run.
    summary = pd.read_csv(output / "summary.csv")
    assert (summary["n"] == 2).all()


def test_a_run_that_repeats_another_gets_its_result_without_training(tiny, tmp_path):
    task, pkl = tiny
    broken = tmp_path / "broken.pkl"
    broken.write_bytes(b"not a pickle")
    weights = [suite.prepare_weights(f"r18={pkl}", tmp_path), suite.prepare_weights(f"bad={broken}", tmp_path)]
    output = tmp_path / "out"
    runs = suite.plan(weights, suite.resolve_tasks(str(task), "custom"), "custom", 2, output)
    # Seed 1 stands in for a task whose resolved config equals seed 0's task's.
    repeats = {runs[2]: runs[0], runs[3]: runs[1]}
    launcher = suite.LocalLauncher(opts=TINY_OPTS)
    outcomes = suite.run_suite(runs, launcher, repeats=repeats)
    assert [(o.run.weights.label, o.run.seed, o.status) for o in outcomes] == [
        ("r18", 0, "ok"), ("bad", 0, "failed"), ("r18", 1, "ok"), ("bad", 1, "failed")]
    assert (started(output, 0), started(output, 1)) == (1, 0)
    assert (started(output, 0, "bad"), started(output, 1, "bad")) == (1, 0)
    original, repeat = (json.loads(run.metrics_path.read_text()) for run in (runs[0], runs[2]))
    assert repeat["same_run_as"] == runs[0].name and repeat["metrics"] == original["metrics"]
    assert (repeat["task"], repeat["seed"], repeat["status"]) == (original["task"], 1, "ok")
    table = report.load_runs(output)
    assert set(table[table["seed"] == 1]["same_run_as"]) == {runs[0].name, runs[1].name}
    assert "repeats bad/tiny/custom/seed0, which failed" in json.loads(runs[3].metrics_path.read_text())["error"]
    # The next invocation runs the failed original again and nothing else.
    outcomes = suite.run_suite(runs, launcher, repeats=repeats)
    assert [(o.run.weights.label, o.run.seed, o.status) for o in outcomes] == [
        ("bad", 0, "failed"), ("bad", 1, "failed")]
    assert (started(output, 0), started(output, 0, "bad"), started(output, 1, "bad")) == (1, 2, 0)


def test_a_failed_run_is_recorded_reported_and_run_again(tiny, tmp_path):
    import pandas as pd

    broken = tmp_path / "broken.pkl"
    broken.write_bytes(b"not a pickle")
    output = tmp_path / "out"
    for attempt in (1, 2):
        done = subprocess.run(suite_command(tiny, output, 1, weights=broken), capture_output=True,
                              text=True, cwd=REPO)
        assert done.returncode == 1 and "FAILED" in done.stderr, done.stderr
        assert started(output, 0) == attempt  # a failed run is re-run by the next invocation
    record = json.loads((output / "r18" / "tiny" / "custom" / "seed0" / "metrics.json").read_text())
    assert record["status"] == "failed" and record["error"]
    summary = pd.read_csv(output / "summary.csv")
    assert (summary["n"] == 0).all() and (summary["failed"] == 1).all() and summary["mean"].isna().all()
    assert "## Failed runs" in (output / "summary.md").read_text()


def test_a_run_killed_by_sigkill_is_reported_as_killed_out_of_memory_with_its_peak_memory(tmp_path, monkeypatch):
    import io
    import re

    # A stand-in for tools/finetune.py that fills 64 MiB and is killed as the OOM killer kills.
    child = tmp_path / "finetune.py"
    child.write_text("import os, signal\nheld = b'x' * (64 * 2**20)\nos.kill(os.getpid(), signal.SIGKILL)\n")
    monkeypatch.setattr(suite.execution, "FINETUNE", child)
    runs = suite.plan([fake_weights(tmp_path, "moco")], ["voc07"], "demo", 1, tmp_path / "out")
    shown = io.StringIO()
    [outcome] = suite.run_suite(runs, suite.LocalLauncher(), stream=shown)
    reason = re.fullmatch(r"killed \(out of memory\?\): tools/finetune.py got SIGKILL \(killed by signal 9\) "
                          r"at a peak memory of (\d+) MiB",
                          outcome.error or "")
    assert outcome.status == "failed" and reason and int(reason[1]) >= 64, outcome.error
    assert f"{runs[0].name}: FAILED: {outcome.error} (see " in shown.getvalue()
    assert json.loads(runs[0].metrics_path.read_text())["error"] == outcome.error
    report.write_reports(tmp_path / "out")
    assert f": {outcome.error}" in (tmp_path / "out" / "summary.md").read_text()


def test_slurm_launcher_submits_each_run_as_a_job(tiny, tmp_path):
    # submitit's "local" cluster runs the jobs the SLURM launcher submits as processes on this machine.
    task, pkl = tiny
    weights = suite.prepare_weights(f"r18={pkl}", tmp_path)
    tasks = suite.resolve_tasks(str(task), "custom")
    runs = suite.plan([weights], tasks, "custom", 1, tmp_path / "out")
    launcher = suite.SlurmLauncher(tmp_path / "out", opts=TINY_OPTS, partition="gpu", time_min=30,
                                   cluster="local")
    outcomes = suite.run_suite(runs, launcher)
    assert [o.status for o in outcomes] == ["ok"] and "APbb50" in outcomes[0].metrics
    assert list((tmp_path / "out" / "slurm").glob("*/*_submission.sh")) or \
        list((tmp_path / "out" / "slurm").glob("*/*_log.out"))
    assert started(tmp_path / "out", 0) == 1
    # Done runs are not submitted again.
    assert suite.run_suite(runs, launcher) == []


# ---------------------------------------------------------------------------------------------
# What --tasks and the defaults of tools/run_suite.py resolve to

COCO = ["coco_c4_1x", "coco_c4_2x", "coco_fpn_1x", "coco_fpn_2x", "coco_kp_2x"]


def test_families_expand_in_order_and_a_task_named_twice_runs_once(tmp_path):
    assert suite.expand_tasks("voc,coco") == ["voc07+12", "voc07", *COCO]
    assert suite.expand_tasks("voc07, voc,coco_fpn_1x,coco") == [
        "voc07", "voc07+12", "coco_fpn_1x", "coco_c4_1x", "coco_c4_2x", "coco_fpn_2x", "coco_kp_2x"]
    assert list(suite.resolve_tasks("coco,voc", "demo", tmp_path)) == [*COCO, "voc07+12", "voc07"]
    assert suite.expand_tasks("semseg,cityscapes") == ["cityscapes_sem", "voc_sem", "cityscapes_inst"]


def test_an_unknown_task_or_family_is_one_line_naming_the_choices():
    with pytest.raises(UserError) as error:
        suite.expand_tasks("voc,detection")
    message = str(error.value)
    assert message.startswith("--tasks detection: unknown task or family") and "\n" not in message
    assert "voc07+12" in message and "families: voc, coco, lvis, cityscapes, semseg, all" in message
    with pytest.raises(UserError, match="no task given"):
        suite.expand_tasks(" , ")


def test_all_is_every_task_of_the_papers_protocol_except_the_fallbacks():
    from transfer.tasks import DEFAULT_PROTOCOL, TASKS

    everything = suite.expand_tasks("all")
    assert everything[:7] == ["voc07+12", "voc07", *COCO]
    assert {"lvis_1x", "lvis_2x", "cityscapes_inst", "cityscapes_sem", "voc_sem"} <= set(everything)
    assert not {"voc_sem_train", "lvis_v0.5_1x", "lvis_v0.5_2x"} & set(everything)
    assert all(TASKS[name].protocol == DEFAULT_PROTOCOL for name in everything)


def datasets_with_fallbacks_only(root):
    """VOC 2012 segmentation without SegmentationClassAug, and LVIS v0.5 without v1."""
    voc = root / "VOC2012"
    for folder in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / folder).mkdir(parents=True)
    for split in ("train", "val"):
        (voc / f"ImageSets/Segmentation/{split}.txt").write_text("2007_000001\n")
        (root / "coco" / f"{split}2017").mkdir(parents=True)
    (root / "lvis").mkdir()
    for split in ("train", "val"):
        (root / "lvis" / f"lvis_v0.5_{split}.json").write_text("{}")
    return root


def test_a_fallback_is_chosen_at_plan_time_and_its_runs_are_filed_under_the_task_that_runs(tmp_path):
    import io

    root = datasets_with_fallbacks_only(tmp_path / "datasets")
    notes = []
    tasks = suite.resolve_tasks("voc_sem,lvis_1x,voc_sem_train", "full", root, notes)
    assert tasks == {"voc_sem_train": "voc_sem_train", "lvis_v0.5_1x": "lvis_v0.5_1x"}
    suite.check_datasets(tasks, root)
    assert len(notes) == 2 and notes[0].startswith(
        f"voc_sem: {root / 'VOC2012' / 'SegmentationClassAug'}: missing, so running voc_sem_train (")
    assert "1,464 images" in notes[0] and notes[0].endswith("not comparable with the paper's voc_sem)")
    assert notes[1].startswith(f"lvis_1x: {root / 'lvis' / 'lvis_v1_train.json'}: missing, so running lvis_v0.5_1x")

    runs = suite.plan([fake_weights(tmp_path, "moco")], tasks, "full", 1, tmp_path / "out")
    assert [r.dir.relative_to((tmp_path / "out").resolve()).parts[1] for r in runs] == ["voc_sem_train", "lvis_v0.5_1x"]
    shown = io.StringIO()
    suite.run_suite(runs, lambda runs, on_start, on_done: [], stream=shown, notes=notes)
    plan = shown.getvalue()
    assert plan.startswith("Plan: 2 runs (2 new)") and notes[0] in plan and notes[1] in plan
    assert "voc_sem_train" in plan.splitlines()[2] + plan.splitlines()[3]


def test_with_neither_a_task_nor_its_fallback_on_disk_the_check_names_the_tasks_files(tmp_path):
    (tmp_path / "coco" / "train2017").mkdir(parents=True)
    (tmp_path / "coco" / "val2017").mkdir()
    notes = []
    tasks = suite.resolve_tasks("lvis", "full", tmp_path, notes)
    assert tasks == {"lvis_1x": "lvis_1x", "lvis_2x": "lvis_2x"} and notes == []
    with pytest.raises(UserError, match=r"lvis/lvis_v1_train.json: missing; expected .*LVIS layout"):
        suite.check_datasets(tasks, tmp_path)


def test_the_newest_demo_or_pretraining_weights_are_the_default(tmp_path):
    assert suite.find_default_weights(tmp_path) is None
    files = {"demo": tmp_path / "results/demo/weights/moco_v2_demo.pkl",
             "baseline": tmp_path / "results/demo/weights/supervised_demo.pkl",
             "run": tmp_path / "results/moco_run/pretrain/checkpoint_last.pth.tar",
             "default": tmp_path / "output/pretrain/checkpoint_last.pth.tar",
             "suite": tmp_path / "results/moco_v2-full/weights/supervised.pkl"}  # a suite's own copy
    mtimes = {"default": 1e9, "run": 1.1e9, "baseline": 1.2e9, "suite": 1.4e9, "demo": 1.3e9}
    for name, path in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"w")
        os.utime(path, (mtimes[name], mtimes[name]))
    assert suite.find_default_weights(tmp_path) == (f"moco_v2={files['demo']}", files["baseline"])
    os.utime(files["run"], (2e9, 2e9))
    assert suite.find_default_weights(tmp_path) == (f"moco_run={files['run']}", None)
    os.utime(files["default"], (3e9, 3e9))
    assert suite.find_default_weights(tmp_path) == (f"pretrain={files['default']}", None)


def load_run_suite():
    return load_script("tools/run_suite.py")


def test_run_suite_without_weights_and_none_to_find_says_what_to_pass(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit:
        load_run_suite().main(["--tasks", "voc,coco", "--schedule", "demo"], root=tmp_path)
    assert exit.value.code == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and error.startswith("error: no --weights given") and "pass --weights FILE" in error


def test_run_suite_without_weights_runs_the_demos_against_its_baseline_into_results(tmp_path, capsys):
    import signal

    from transfer.datasets import demo

    datasets = demo.generate(tmp_path / "demo_datasets")
    weights = tmp_path / "repo" / "results" / "demo" / "weights"
    weights.mkdir(parents=True)
    for name in ("moco_v2_demo.pkl", "supervised_demo.pkl"):  # not loadable: each run fails at once
        (weights / name).write_bytes(name.encode())
    handler = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(SystemExit) as exit:
            load_run_suite().main(["--tasks", "voc07", "--schedule", "demo", "--datasets", str(datasets)],
                                  root=tmp_path / "repo")
    finally:
        signal.signal(signal.SIGTERM, handler)
    lines = capsys.readouterr().err.splitlines()
    assert exit.value.code == 1, lines
    output = tmp_path / "repo" / "results" / "moco_v2-demo"
    assert lines[:3] == [
        f"weights: moco_v2={weights / 'moco_v2_demo.pkl'} (no --weights: the newest demo / pre-training weights)",
        f"baseline: {weights / 'supervised_demo.pkl'} (no --baseline: the demo's supervised weights)",
        f"output: {output} (no --output)"]
    assert lines[3].startswith("Plan: 2 runs (2 new)"), lines
    for label in ("supervised", "moco_v2"):
        record = json.loads((output / label / "voc07" / "demo" / "seed0" / "metrics.json").read_text())
        assert record["status"] == "failed" and record["task"] == "voc07"


@pytest.mark.parametrize("content", ["[]", '{"status": "ok"}', '{"status": "ok", "metrics": {}}'])
def test_a_metrics_file_without_a_result_is_run_again(tmp_path, content):
    [run] = suite.plan([fake_weights(tmp_path, "moco")], ["voc07"], "demo", 1, tmp_path / "out")
    run.dir.mkdir(parents=True)
    run.metrics_path.write_text(content)
    assert suite.state(run) == "failed"  # not "done": the next invocation runs it again
    assert "unreadable metrics.json" in suite.read_metrics(run)["error"]


def test_an_override_of_the_wrong_type_is_one_line_before_any_run_and_locks_nothing(tmp_path, capsys):
    import signal

    weights = fake_weights(tmp_path, "moco").path
    handler = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(SystemExit) as exit:
            load_run_suite().main(["--tasks", "voc07", "--weights", str(weights), "--output", str(tmp_path / "out"),
                                   "SOLVER.BASE_LR", "1000"], root=tmp_path)
    finally:
        signal.signal(signal.SIGTERM, handler)
    error = capsys.readouterr().err.strip().splitlines()
    assert exit.value.code == 2 and len(error) == 1, error
    assert "SOLVER.BASE_LR" in error[0] and "<class 'float'> vs. <class 'int'>" in error[0]
    assert not (tmp_path / "out").exists()  # no suite.json: the folder is not locked to the bad override


def kill_the_suite_during_a_run(tmp_path, monkeypatch):
    """A suite (suite.execute in a forked process) killed with SIGKILL while its run trains; waits
    until the run's lock is free again. Returns the run, the suite's pid and its child's pid."""
    import multiprocessing
    import signal
    import time

    # A stand-in for tools/finetune.py that does what it does first (die_with_suite), then trains forever.
    child = tmp_path / "finetune.py"
    child.write_text(f"import os, sys, time\nsys.path.insert(0, {str(REPO)!r})\n"
                     "from transfer.suite import die_with_suite\ndie_with_suite()\n"
                     f"open({str(tmp_path / 'child.pid')!r}, 'w').write(str(os.getpid()))\ntime.sleep(120)\n")
    monkeypatch.setattr(suite.execution, "FINETUNE", child)
    [run] = suite.plan([fake_weights(tmp_path, "moco")], ["voc07"], "demo", 1, tmp_path / "out")
    suite_process = multiprocessing.get_context("fork").Process(target=suite.execute, args=(run,))
    suite_process.start()
    deadline = time.time() + 30
    while not (tmp_path / "child.pid").exists() and time.time() < deadline:
        time.sleep(0.05)
    pid = int((tmp_path / "child.pid").read_text())
    assert suite.locked_by(run) is not None  # the run is running
    os.kill(suite_process.pid, signal.SIGKILL)
    suite_process.join()
    deadline = time.time() + 10
    while suite.locked_by(run) is not None and time.time() < deadline:
        time.sleep(0.05)
    return run, suite_process.pid, pid


def test_a_suite_killed_with_sigkill_leaves_no_child_holding_the_lock(tmp_path, monkeypatch):
    run, _, pid = kill_the_suite_during_a_run(tmp_path, monkeypatch)
    assert suite.locked_by(run) is None  # the child ended with the suite: the lock is free
    status = Path(f"/proc/{pid}/status")
    assert not status.exists() or "State:\tZ" in status.read_text()  # gone, or a zombie nobody reaped yet


def test_the_next_attempt_after_a_suite_killed_with_sigkill_ends_its_attempts_line_naming_the_dead_pid(
        tmp_path, monkeypatch):
    import re

    run, dead, _ = kill_the_suite_during_a_run(tmp_path, monkeypatch)
    log = run.dir / "attempts.log"
    assert log.read_text().splitlines()[-1].endswith(f"pid {dead} on {socket.gethostname()}: started")
    quick = tmp_path / "fails_at_once.py"  # the next invocation's run
    quick.write_text("import sys\nsys.exit(3)\n")
    monkeypatch.setattr(suite.execution, "FINETUNE", quick)
    assert suite.execute(run).error == "tools/finetune.py exited with code 3 without writing metrics.json"
    lines = log.read_text().splitlines()
    me = f"pid {os.getpid()} on {socket.gethostname()}"
    assert len(lines) == 4 and re.fullmatch(
        rf"\S+ {me}: the attempt of pid {dead} on {socket.gethostname()} \(started \S+\) ended without an end "
        r"line: its process is gone \(killed\?\)", lines[1]), lines
    assert lines[2].endswith(f"{me}: started") and lines[3].endswith(f"{me}: exit code 3")
    suite.execute(run)  # a finished attempt is not noted again
    assert len(log.read_text().splitlines()) == 6


# ---------------------------------------------------------------------------------------------
# A full disk, a read-only folder

@contextlib.contextmanager
def tmpfs(folder, size):
    """A tmpfs of ``size`` mounted on ``folder`` where this process may mount one (root in a
    sandbox); yields whether it is mounted (elsewhere tests inject the error at the write call)."""
    folder.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                             capture_output=True).returncode == 0
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", "--lazy", str(folder)], check=True)


# Loaded by every Python process of a suite through PYTHONPATH where no tmpfs can be mounted: the
# fsync of an atomic write of FILE in FOLDER fails as it does on a full disk.
NO_SPACE_FOR = """import errno, os
_fsync, _folder, _file = os.fsync, os.environ["NO_SPACE_IN"], os.environ["NO_SPACE_FOR"]
def fsync(fd):
    path = os.readlink(f"/proc/self/fd/{fd}")
    if os.path.dirname(path) == _folder and os.path.basename(path).startswith(f".{_file}."):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return _fsync(fd)
os.fsync = fsync
"""


def no_space_for(tmp_path, folder, name) -> dict:
    """An environment in which an atomic write of ``folder``/``name`` hits ENOSPC."""
    (tmp_path / "inject").mkdir()
    (tmp_path / "inject" / "sitecustomize.py").write_text(NO_SPACE_FOR)
    path = os.pathsep.join(filter(None, [str(tmp_path / "inject"), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "NO_SPACE_IN": str(folder), "NO_SPACE_FOR": name}


def test_a_checkpoint_that_does_not_fit_fails_its_run_with_the_disk_line_and_only_it_runs_again(tiny, tmp_path):
    import re

    output = tmp_path / "out"
    full, other = (output / "r18" / "tiny" / "custom" / f"seed{seed}" for seed in (0, 1))
    with tmpfs(full, "4m") as mounted:  # the logs and the record fit, the 110 MB checkpoint does not
        env = None if mounted else no_space_for(tmp_path, full, "model_final.pth")
        first = subprocess.run(suite_command(tiny, output, 2), capture_output=True, text=True, cwd=REPO, env=env)
        assert first.returncode == 1, first.stderr
        record = json.loads((full / "metrics.json").read_text())
        line = rf"{re.escape(str(full / 'model_final.pth'))}: cannot write it: no space left \(\d+ MiB free\)"
        assert record["status"] == "failed" and re.fullmatch(line, record["error"]), record["error"]
        assert re.search(rf"seed0: FAILED: {line} \(see ", first.stderr), first.stderr
        files = [path for path in full.rglob("*") if path.is_file()]
        assert not [path for path in files if path.name.endswith(".tmp") or path.name.startswith("model_")
                    or path.name in ("last_checkpoint", ".result.pt")], files  # nothing half-written
        assert all(path.stat().st_size for path in files if path.name != ".lock"), files
        assert json.loads((other / "metrics.json").read_text())["status"] == "ok"

        if mounted:  # room again: the same file system, grown
            subprocess.run(["mount", "-o", "remount,size=512m", str(full)], check=True)
        second = subprocess.run(suite_command(tiny, output, 2), capture_output=True, text=True, cwd=REPO)
        assert second.returncode == 0, second.stderr
        assert "Plan: 2 runs (1 done, 1 failed)" in second.stderr
        assert [started(output, seed) for seed in range(2)] == [2, 1]  # only the lost run ran again
        assert json.loads((full / "metrics.json").read_text())["status"] == "ok"


# A stand-in for tools/finetune.py: seed 1 fails without a record, after filling its run folder
# when that is the test's small tmpfs (never another disk: at most 64 MiB); the others record a result.
FILLS_ITS_DISK = """import json, os, sys
output, seed = sys.argv[sys.argv.index("--output") + 1], int(sys.argv[sys.argv.index("--seed") + 1])
if seed == 1:
    try:
        if os.path.ismount(output):
            with open(os.path.join(output, "filler"), "wb") as f:
                for _ in range(1024):
                    f.write(bytes(1 << 16))
                    f.flush()
    except OSError:
        pass
    sys.exit(1)
record = {"status": "ok", "task": "tiny", "schedule": "custom", "seed": seed, "metrics": {"APbb": 50.0 + seed}}
open(os.path.join(output, "metrics.json"), "w").write(json.dumps(record))
"""


def test_where_not_even_a_failure_can_be_recorded_the_suite_stops_keeping_every_result(
        tiny, tmp_path, monkeypatch, capsys):
    import signal

    import pandas as pd

    task, pkl = tiny
    child = tmp_path / "finetune.py"
    child.write_text(FILLS_ITS_DISK)
    monkeypatch.setattr(suite.execution, "FINETUNE", child)
    output = tmp_path / "out"
    full = output / "r18" / "tiny" / "custom" / "seed1"
    command = ["--tasks", str(task), "--weights", f"r18={pkl}", "--trials", "3", "--schedule", "custom",
               "--output", str(output), *TINY_OPTS]
    handler = signal.getsignal(signal.SIGTERM)
    try:
        with tmpfs(full, "1m") as mounted:
            if not mounted:  # no tmpfs: the record of the failure is what does not fit
                real = fileio.os.fsync

                def fsync(fd):
                    if Path(os.readlink(f"/proc/self/fd/{fd}")).parent == full:
                        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                    return real(fd)

                monkeypatch.setattr(fileio.os, "fsync", fsync)
            with pytest.raises(SystemExit) as exit:
                load_run_suite().main(command, root=tmp_path)
            error = [line for line in capsys.readouterr().err.splitlines() if "error" in line or "Traceback" in line]
            assert exit.value.code == 2 and len(error) == 1, error
            assert error[0].startswith(f"error: {full / 'metrics.json'}: cannot write it: no space left (")
            assert error[0].endswith("stopped: finished runs are kept; run the same command again once it can be "
                                     "written")
            assert json.loads((output / "r18/tiny/custom/seed0/metrics.json").read_text())["metrics"] == {"APbb": 50.0}
            assert not (output / "r18/tiny/custom/seed2").exists()  # the suite stopped
            summary = pd.read_csv(output / "summary.csv")  # the reports of what was recorded
            assert summary[["metric", "mean", "n"]].values.tolist() == [["APbb", 50.0, 1]]

            # Room again: the next invocation runs what was lost, and nothing else.
            if mounted:
                (full / "filler").unlink()
            monkeypatch.undo()
            monkeypatch.setattr(suite.execution, "FINETUNE", child)
            child.write_text(FILLS_ITS_DISK.replace("seed == 1", "False"))
            load_run_suite().main(command, root=tmp_path)
            assert [started(output, seed) for seed in range(3)] == [1, 2, 1]
            assert pd.read_csv(output / "summary.csv")["n"].tolist() == [3]
    finally:
        signal.signal(signal.SIGTERM, handler)


def test_a_read_only_output_folder_is_one_line_naming_the_run_lock(tiny, tmp_path, capsys):
    import re
    import signal

    task, pkl = tiny
    output = tmp_path / "out"
    handler = signal.getsignal(signal.SIGTERM)
    with tmpfs(output, "1m") as mounted:
        (output / "suite.json").write_text(json.dumps({"opts": TINY_OPTS}))  # an earlier invocation's
        if mounted:
            subprocess.run(["mount", "-o", "remount,ro", str(output)], check=True)
        elif os.geteuid() != 0:
            os.chmod(output, 0o555)
        else:
            pytest.skip("no read-only folder here: root, and no tmpfs can be mounted")
        try:
            with pytest.raises(SystemExit) as exit:
                load_run_suite().main(["--tasks", str(task), "--weights", f"r18={pkl}", "--schedule", "custom",
                                       "--output", str(output), *TINY_OPTS], root=tmp_path)
        finally:
            signal.signal(signal.SIGTERM, handler)
            os.chmod(output, 0o755) if not mounted else None
    error = [line for line in capsys.readouterr().err.splitlines() if "error" in line or "Traceback" in line]
    lock = output / "r18" / "tiny" / "custom" / "seed0" / ".lock"
    assert exit.value.code == 2 and len(error) == 1, error
    assert re.match(rf"error: {re.escape(str(lock))}: cannot write it: (read-only file system|permission denied) "
                    r"\(\d+ MiB free\); stopped", error[0]), error
