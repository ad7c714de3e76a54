"""The sweep runner (transfer/pretrain/ablation.py, tools/ablate_moco.py): plans, resumes, never runs a
setting twice, reports divergence, writes the table and figures."""
import fcntl
import io
import json
import subprocess

import pandas as pd
import pytest

from transfer import slurm
from transfer.errors import UserError
from transfer.pretrain import ablation, config, engine

from conftest import load_script

pytestmark = pytest.mark.slow  # trains, evaluates or runs tools on generated data: not in `make test-fast`

# v2 at toy scale: 24 images, batch 8 (3 steps per epoch), 32 px, ResNet-18, on the CPU
TINY = dict(device="cpu", arch="resnet18", moco_k=24, batch_size=8, epochs=1, image_size=32, workers=0, bn_splits=2,
            print_freq=1, monitor_every=1, knn_k=5, consistency_keys=16)


@pytest.fixture(scope="module")
def data(tmp_path_factory, colour_image_folder):
    return colour_image_folder(tmp_path_factory.mktemp("images"), per_class=8, val_per_class=2)


def test_a_plan_runs_each_distinct_setting_once_and_labels_it_by_what_differs():
    plan = ablation.Plan("v2", [{"moco_m": [0.9, 0.999]},  # 0.999 is the preset's: labelled "v2"
                                {"mechanism": ["memory_bank"], "moco_m": [0.9, 0.99]},  # m does not matter to the bank
                                {"mechanism": ["moco"], "moco_m": [0.9]}], {"epochs": 5})  # m = 0.9 again
    base, settings = ablation.expand(plan)
    labels = [ablation.label(s, base, plan.preset) for s in settings]
    assert labels == ["moco_m=0.9", "v2", "mechanism=memory_bank"]
    assert all(s["epochs"] == 5 for s in settings) and base["epochs"] == 5
    assert ablation.parse_assignment("moco-m=0,0.99") == ("moco_m", [0.0, 0.99])
    assert ablation.parse_assignment("--shuffle-bn=false,true") == ("shuffle_bn", [False, True])
    assert ablation.parse_assignment("knn_max_images=null", several=False) == ("knn_max_images", [None])
    with pytest.raises(UserError, match="^moco_k=x: expected an integer, found 'x'$"):
        ablation.parse_assignment("moco_k=x")
    with pytest.raises(UserError, match="'queue' is not a pre-training setting"):
        ablation.parse_assignment("queue=4")


def test_the_demo_plan_covers_momentum_mechanism_and_shuffle_bn():
    plan = ablation.load_plan("demo")
    base, settings = ablation.expand(plan)
    labels = [ablation.label(s, base, plan.preset) for s in settings]
    assert labels == ["moco_m=0.0", "ablation_demo", "mechanism=memory_bank", "mechanism=end_to_end",
                      "shuffle_bn=false"]
    assert base["data"] is None and base["device"] == "auto"  # the demo images, on whatever there is


def test_a_bad_plan_file_is_one_line(tmp_path):
    (tmp_path / "p.yaml").write_text("preset: v2\nsweeps:\n  - {momentum_m: [0.9]}\n")
    with pytest.raises(UserError, match=r"p.yaml: 'momentum_m' is not a pre-training setting$"):
        ablation.load_plan(tmp_path / "p.yaml")
    (tmp_path / "q.yaml").write_text("preset: v2\nsweep: []\n")
    with pytest.raises(UserError, match="q.yaml: expected the keys preset, sweeps .*unknown: sweep"):
        ablation.load_plan(tmp_path / "q.yaml")


def test_the_runner_resumes_an_interrupted_run_reports_divergence_and_never_runs_a_setting_twice(
        data, tmp_path, monkeypatch, capsys):
    plan = ablation.Plan("v2", [{"mechanism": ["moco", "memory_bank"]}, {"lr": [1e30]}], TINY | {"data": str(data)})
    runs = ablation.plan_runs(plan, tmp_path)
    assert [r.label for r in runs] == ["v2", "mechanism=memory_bank", "lr=1e+30"]
    # An interrupted run: a checkpoint at step 2 of 3 and no result (as after a Ctrl-C).
    interrupted = runs[1]
    engine.pretrain(config.PretrainConfig(**interrupted.setting | {"output": str(interrupted.folder), "max_steps": 2}))
    assert interrupted.state == "partial"

    ablation.run_all(runs)
    assert [r.result["status"] for r in runs] == ["ok", "ok", "diverged"]
    log = pd.read_csv(interrupted.folder / "log.csv")
    assert log["step"].tolist() == [1, 2, 3]  # resumed at step 3 (a fresh start would refuse the checkpoint)
    assert json.loads((interrupted.folder / "result.json").read_text())["status"] == "ok"
    assert "the run diverged" in runs[2].result["error"]

    frame = ablation.table(runs, ["mechanism", "lr"])
    assert frame["status"].tolist() == ["ok", "ok", "diverged"] and frame["diverged"].tolist() == ["no", "no", "yes"]
    assert frame.loc[1, "lr"] == "0.03" and frame.loc[0, "mechanism"] == "moco"
    filled = ["final loss", "k-NN %", "k-NN % step 0", "consistency", "consistency fall", "images/s"]
    assert frame.loc[0, filled].notna().all()
    markdown = ablation.write_table(frame, tmp_path)
    assert "| mechanism=memory_bank |" in markdown and (tmp_path / "ablation.csv").is_file()
    for png in ablation.figures(runs, tmp_path):
        assert png.stat().st_size > 10_000

    # Again, also from a plan that reaches the same settings through other sweeps: nothing runs.
    def no_subprocess(*args, **kwargs):
        raise AssertionError(f"ran {args[0]}")

    monkeypatch.setattr(subprocess, "run", no_subprocess)
    again = ablation.Plan("v2", [{"mechanism": ["memory_bank"], "moco_m": [0.5]},
                                 {"lr": [1e30], "mechanism": ["moco"]}], TINY | {"data": str(data)})
    rerun = ablation.plan_runs(again, tmp_path)
    assert [r.folder for r in rerun] == [runs[1].folder, runs[2].folder]
    capsys.readouterr()
    ablation.run_all(rerun)
    assert "mechanism=memory_bank: done already (ok)" in capsys.readouterr().out


def test_ablate_moco_dry_run_lists_the_settings_and_their_state(tmp_path, capsys):
    tool = load_script("tools/ablate_moco.py")
    tool.main(["--preset", "v2", "--sweep", "moco-k=4096,65536", "--sweep", "mechanism=moco,memory_bank",
               "--output", str(tmp_path), "--dry-run"])
    out = capsys.readouterr().out
    assert "4 setting(s) of preset v2" in out
    assert "mechanism=memory_bank,moco_k=4096: new" in out and "moco_k=4096: new" in out
    with pytest.raises(SystemExit):
        tool.main(["--sweep", "moco-m", "--dry-run"])
    assert "error: moco-m: expected SETTING=VALUE,VALUE..." in capsys.readouterr().err


def test_the_slurm_launcher_runs_each_setting_as_a_job_and_a_second_invocation_submits_nothing(data, tmp_path):
    # submitit's "local" cluster runs the submitted jobs as processes on this machine.
    plan = ablation.Plan("v2", [{"mechanism": ["moco", "memory_bank"]}], TINY | {"data": str(data)})
    runs = ablation.plan_runs(plan, tmp_path)
    executor = slurm.executor(tmp_path, time_min=10, cluster="local")
    shown = io.StringIO()
    ablation.run_all(runs, executor=executor, stream=shown)
    assert [r.result["status"] for r in runs] == ["ok", "ok"]
    job_folders = sorted(p.name for p in (tmp_path / "slurm").glob("[0-9]*"))  # submitit also makes "%j"
    assert len(job_folders) == 2
    for run, job in zip(runs, job_folders):
        assert f"  {run.label}: submitted as job {job}, running in {run.folder}\n" in shown.getvalue()
        assert f"  {run.label}: ok\n" in shown.getvalue()

    again = io.StringIO()
    ablation.run_all(ablation.plan_runs(plan, tmp_path), executor=executor, stream=again)
    assert again.getvalue() == "  v2: done already (ok)\n  mechanism=memory_bank: done already (ok)\n"
    assert sorted(p.name for p in (tmp_path / "slurm").glob("[0-9]*")) == job_folders


def test_a_slurm_job_that_dies_leaves_a_failed_result_and_a_setting_held_elsewhere_is_not_submitted(tmp_path):
    from submitit.core.utils import FailedJobError

    class DeadJob:  # a job whose function raised, as submitit reports it
        job_id = "42"

        def done(self):
            return True

        def result(self):
            raise FailedJobError("Job (task=0) failed during processing with trace:\n----------------------\n"
                                 "Traceback (most recent call last):\n  ...\n"
                                 "OSError: [Errno 122] Disk quota exceeded\n----------------------\n"
                                 "You can check full logs with 'job.stderr(0)' and 'job.stdout(0)'or at paths:\n"
                                 "  - /x/42_0_log.err\n  - /x/42_0_log.out")

    submitted = []

    class Executor:
        def submit(self, function, run, *args):
            submitted.append(run.label)
            return DeadJob()

    plan = ablation.Plan("v2", [{"mechanism": ["moco", "memory_bank"]}], TINY)
    held, dies = ablation.plan_runs(plan, tmp_path)
    shown = io.StringIO()
    held.folder.mkdir()
    with open(held.folder / ".lock", "w") as lock:  # another invocation is running this setting
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        ablation.run_all([held, dies], executor=Executor(), stream=shown)
    assert submitted == [dies.label]
    assert "  v2: running in another invocation\n" in shown.getvalue() and held.result is None
    assert dies.result == {"status": "failed", "error": "job 42 died: OSError: [Errno 122] Disk quota exceeded"}
    assert f"  {dies.label}: submitted as job 42, running in {dies.folder}\n" in shown.getvalue()
    assert f"  {dies.label}: failed: job 42 died: OSError: [Errno 122] Disk quota exceeded\n" in shown.getvalue()
    assert dies.state == "failed"  # a rerun retries it
    assert ablation.table([dies], ["mechanism"])["status"].tolist() == ["failed"]


def test_ablate_moco_with_the_slurm_launcher_where_there_is_no_slurm_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))  # no srun, no sbatch
    tool = load_script("tools/ablate_moco.py")
    with pytest.raises(SystemExit) as exit_:
        tool.main(["--preset", "v2", "--sweep", "moco-m=0,0.9", "--output", str(tmp_path), "--launcher", "slurm"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == ("error: --launcher slurm: no SLURM found on this machine "
                                       "(srun is not on PATH)\n")
