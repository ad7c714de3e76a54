"""Sweeps of pre-training settings (the MoCo paper's ablations): one run per setting, a table, figures.

A plan is a preset plus groups of sweeps; each group is the product of its settings' values, the
plan the union of its groups (e.g. momentum x {0, 0.9, 0.99}, then mechanism x {memory_bank,
end_to_end}). A setting is its complete resolved configuration, less the settings its mechanism
does not use (moco_m for the memory bank), so two groups that reach the same one run it once.

    <output>/<label>/setting.yaml    the run's settings, a complete preset: the run's identity
    <output>/<label>/...             what tools/pretrain_moco.py writes (log.csv, monitor.csv, figures)
    <output>/<label>/result.json     written when the run ended: ok, diverged or failed
    <output>/ablation.csv, .md       the table; knn.png, consistency.png, loss.png the figures

A run with result "ok" or "diverged" is never run again; a failed or interrupted one is, from its
last checkpoint. The label names what differs from the preset ("moco_m=0.0", "mechanism=memory_bank";
the preset's name for the preset itself). Each run is a tools/pretrain_moco.py process (under torchrun
with ``nproc_per_node`` > 1) holding the lock of its folder, launched like a suite's runs: on this
machine, ``jobs`` at a time (on a CPU: one per core, one thread each), or as one SLURM job per run
(a submitit executor from transfer/slurm.py), the job taking the same lock on the shared disk.
"""
import concurrent.futures
import contextlib
import dataclasses
import itertools
import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import yaml

from transfer import REPO, errors, fileio
from transfer.errors import UserError
from transfer.pretrain import config, monitors
from transfer.pretrain.engine import CHECKPOINT

PLANS = config.PRESETS / "ablations"
PRETRAIN = REPO / "tools" / "pretrain_moco.py"
LINEAR_EVAL = REPO / "tools" / "linear_eval.py"
RESULT = "result.json"
SETTING = "setting.yaml"
NOT_IDENTITY = ("output", "resume", "device")  # where and how a run executes, not what it computes


# ----------------------------------------------------------------------------- the plan


def parse_value(name, text):
    """A setting's value from its command-line text, read as YAML ("0.99", "false", "null", "resnet18")."""
    value = yaml.safe_load(text)
    if config.value_type(name)[0] is float and isinstance(value, str):
        with contextlib.suppress(ValueError):
            value = float(value)  # YAML reads "1e-4" as a string
    problem = config.check_value(name, value)
    if problem:
        raise UserError(f"{name}={text}: {problem}")
    return value


def parse_assignment(text, several=True):
    """"moco-m=0,0.9" -> ("moco_m", [0.0, 0.9]) (one value unless ``several``)."""
    key, sep, values = text.partition("=")
    name = key.strip().lstrip("-").replace("-", "_")
    if not sep or not values:
        raise UserError(f"{text}: expected SETTING=VALUE{',VALUE...' if several else ''}")
    if name not in config.FIELDS or name in NOT_IDENTITY:
        raise UserError(f"{text}: '{key}' is not a pre-training setting (tools/pretrain_moco.py --help)")
    parts = values.split(",") if several else [values]
    return name, [parse_value(name, v.strip()) for v in parts]


@dataclasses.dataclass
class Plan:
    preset: str
    groups: list  # of {setting: [values]}, each expanded as a product
    fixed: dict  # settings of every run


def load_plan(name_or_path):
    """configs/pretrain/ablations/<name>.yaml or a YAML path: {preset, set: {..}, sweeps: [{setting: [values]}]}."""
    path = config.named_yaml(name_or_path, PLANS, "--plan", "plan")
    raw = fileio.read_yaml_mapping(path, "an ablation plan (preset, set, sweeps)")
    unknown = sorted(set(raw) - {"preset", "set", "sweeps"})
    if unknown or not isinstance(raw.get("sweeps"), list) or "preset" not in raw:
        raise UserError(f"{path}: expected the keys preset, sweeps (a list of {{setting: [values]}}) and "
                        f"optionally set{'; unknown: ' + ', '.join(unknown) if unknown else ''}")
    groups = []
    for group in raw["sweeps"]:
        if not isinstance(group, dict) or not all(isinstance(v, list) for v in group.values()):
            raise UserError(f"{path}: each sweep is a mapping of setting -> list of values, found {group!r}")
        groups.append({_checked(path, k, v): v for k, v in group.items()})
    fixed = raw.get("set") or {}
    for key, value in fixed.items():
        _checked(path, key, [value])
    return Plan(str(raw["preset"]), groups, dict(fixed))


def _checked(path, key, values):
    if key not in config.FIELDS or key in NOT_IDENTITY:
        raise UserError(f"{path}: '{key}' is not a pre-training setting")
    for value in values:
        problem = config.check_value(key, value)
        if problem:
            raise UserError(f"{path}: {key}: {problem}")
    return key


def identity(setting: dict) -> tuple:
    """What a run computes: its settings, less where it runs and what its mechanism ignores."""
    return tuple(sorted((k, json.dumps(v)) for k, v in setting.items()
                        if k not in NOT_IDENTITY and config.used_by(k, setting["mechanism"])))


def expand(plan: Plan):
    """(the preset's settings with the plan's fixed ones, [each distinct setting of the plan, in order])."""
    base = config.override(config.load_config(plan.preset), **plan.fixed)
    settings, seen = [], set()
    for group in plan.groups or [{}]:
        for values in itertools.product(*group.values()):
            setting = dataclasses.asdict(config.override(base, **dict(zip(group, values))))
            if identity(setting) not in seen:
                seen.add(identity(setting))
                settings.append(setting)
    return dataclasses.asdict(base), settings


def label(setting, base, preset):
    """What differs from the plan's preset (with its fixed settings), e.g. "mechanism=memory_bank,moco_k=4096";
    the preset's name if nothing does."""
    differs = [f"{k}={_text(v)}" for k, v in setting.items()
               if k not in NOT_IDENTITY and v != base[k] and config.used_by(k, setting["mechanism"])]
    return ",".join(sorted(differs, key=lambda d: not d.startswith("mechanism="))) or Path(preset).stem


def _text(value):
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


# ----------------------------------------------------------------------------- running


@dataclasses.dataclass
class Run:
    """One setting of a plan and its folder."""

    label: str
    folder: Path
    setting: dict

    @property
    def result(self):
        path = self.folder / RESULT
        return json.loads(path.read_text()) if path.is_file() else None

    @property
    def state(self):
        """done (ok or diverged: never run again), failed, partial (a checkpoint to resume) or new."""
        result = self.result
        if result and result["status"] in ("ok", "diverged"):
            return "done"
        if result:
            return "failed"
        return "partial" if (self.folder / CHECKPOINT).is_file() else "new"


def plan_runs(plan, output):
    """A Run per distinct setting of the plan; an existing folder of the same setting is reused whatever its label."""
    base, settings = expand(plan)
    output = Path(output)
    existing = {}
    for path in output.glob(f"*/{SETTING}"):
        existing[identity(yaml.safe_load(path.read_text()))] = path.parent
    runs = []
    for setting in settings:
        name = label(setting, base, plan.preset)
        folder = existing.get(identity(setting), output / name)
        stored = folder / SETTING
        if stored.is_file() and identity(yaml.safe_load(stored.read_text())) != identity(setting):
            raise UserError(f"{folder}: holds a run of other settings (the preset changed?); choose another --output")
        runs.append(Run(folder.name, folder, setting))
    return runs


def _command(run, nproc_per_node):
    if nproc_per_node > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc_per_node}"]
    else:
        launcher = [sys.executable]
    command = [*launcher, str(PRETRAIN), "--preset", str(run.folder / SETTING), "--output", str(run.folder)]
    if run.state in ("partial", "failed") and (run.folder / CHECKPOINT).is_file():
        command += ["--resume", str(run.folder / CHECKPOINT)]
    return command


def execute(run, nproc_per_node=1, linear_epochs=None, threads=None):
    """Run (or resume) one setting to its end, then linear evaluation if asked; writes result.json.
    Returns the result, or None when another invocation holds the run. ``threads``: CPU threads of
    the run's process (OMP_NUM_THREADS), when several share the machine."""
    try:
        with fileio.FolderLock(run.folder):  # the lock of a suite's run folder, held the same way
            return _run_to_the_end(run, nproc_per_node, linear_epochs, threads)
    except fileio.FolderBusy:
        return None


def _run_to_the_end(run, nproc_per_node, linear_epochs, threads):
    if run.state != "done":
        fileio.atomic_write_text(run.folder / SETTING, yaml.safe_dump(
            {k: v for k, v in run.setting.items() if k not in ("output", "resume")}, sort_keys=False))
        with open(run.folder / "pretrain.log", "a") as log:
            env = os.environ | ({"OMP_NUM_THREADS": str(threads)} if threads else {})
            code = subprocess.run(_command(run, nproc_per_node), stdout=log, stderr=subprocess.STDOUT,
                                  env=env).returncode
        status = "ok" if code == 0 else "diverged" if _diverged(run.folder) else "failed"
        record = {"status": status, "exit_code": code}
        if status != "ok":
            record["error"] = _last_error(run.folder / "pretrain.log")
        fileio.atomic_write_text(run.folder / RESULT, json.dumps(record, indent=1))
    if _needs_linear_eval(run, linear_epochs):
        _linear_eval(run, linear_epochs)
    return run.result


def _linear_eval(run, epochs):
    from transfer.datasets import demo

    s = run.setting
    data = s["data"] or str(demo.images())
    command = [sys.executable, str(LINEAR_EVAL), "--pretrained", str(run.folder / CHECKPOINT), "--data", data,
               "--output", str(run.folder / "lincls"), "--epochs", str(epochs), "--image-size", str(s["image_size"]),
               "-j", str(s["workers"]), "--seed", str(s["seed"])]
    with open(run.folder / "linear_eval.log", "a") as log:
        code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT).returncode
    if code:
        record = run.result | {"linear_eval_error": _last_error(run.folder / "linear_eval.log")}
        fileio.atomic_write_text(run.folder / RESULT, json.dumps(record, indent=1))


def _diverged(folder):
    rows = _read_csv(folder / "log.csv")
    return rows is not None and any(not math.isfinite(float(loss)) for loss in rows["loss"])


def _last_error(log_path):
    return _error_line(log_path.read_text(errors="replace"))


def _error_line(text):
    """The tool's ``error:`` line, else the last line that says something (not a rule of dashes)."""
    message = errors.said(text)
    if message:
        return f"error: {message}"[:500]
    text = text.replace("\r", "\n")  # progress bars rewrite their line
    lines = [line.strip() for line in text.splitlines() if line.strip().strip("-")]
    return (lines or ["(no output)"])[-1][:500]


def _on_cpu(setting):
    import torch

    return setting["device"] == "cpu" or (setting["device"] == "auto" and not torch.cuda.is_available())


def _needs_linear_eval(run, linear_epochs):
    return (linear_epochs and run.result and run.result["status"] == "ok"
            and not (run.folder / "lincls" / "linear_eval.json").is_file())


def run_all(runs, jobs=None, nproc_per_node=1, linear_epochs=None, stream=None, executor=None):
    """Execute every run not done yet: on this machine, ``jobs`` at a time (default: one per CPU core
    when the runs are on the CPU, else one), or, given a submitit ``executor`` (transfer/slurm.py), each
    as one job. A line per run as it starts and ends (on ``stream``, default stdout)."""
    pending = [r for r in runs if r.state != "done" or _needs_linear_eval(r, linear_epochs)]
    for r in runs:
        if r not in pending:
            print(f"  {r.label}: done already ({r.result['status']})", file=stream, flush=True)
    if executor is None:
        _run_here(pending, jobs, nproc_per_node, linear_epochs, stream)
    else:
        _run_as_jobs(pending, executor, nproc_per_node, linear_epochs, stream)


def _run_here(pending, jobs, nproc_per_node, linear_epochs, stream):
    cores = len(os.sched_getaffinity(0))
    jobs = jobs or (cores if all(_on_cpu(r.setting) for r in pending) else 1)
    # Runs side by side share the cores: one thread each is faster than threads that wait for each other.
    threads = max(1, cores // min(jobs, len(pending))) if jobs > 1 and pending else None

    def start(run):
        _said(run, _starting(run), stream)
        return execute(run, nproc_per_node, linear_epochs, threads)

    with concurrent.futures.ThreadPoolExecutor(max(1, jobs)) as pool:
        futures = {pool.submit(start, r): r for r in pending}
        for future in concurrent.futures.as_completed(futures):
            _said_result(futures[future], future.result(), stream)


def _run_as_jobs(pending, executor, nproc_per_node, linear_epochs, stream):
    """Submit each run that no other invocation holds as a job running ``execute``; wait for them all."""
    import submitit

    jobs = {}
    for run in pending:
        if fileio.locked_by(run.folder):  # asked, not taken: the job takes the lock itself, wherever it lands
            _said_result(run, None, stream)
            continue
        job = executor.submit(execute, run, nproc_per_node, linear_epochs)
        _said(run, f"submitted as job {job.job_id}, {_starting(run)}", stream)
        jobs[job] = run
    for job in submitit.helpers.as_completed(list(jobs)):
        run = jobs[job]
        try:
            result = job.result()
        except Exception as e:  # the job itself died: time limit, pre-emption, node failure
            result = _job_died(run, job, e)
        _said_result(run, result, stream)


def _job_died(run, job, error):
    """Record a job that died in result.json: failed, with the error's last line, so the table says so and
    a rerun retries the run (from its last checkpoint); a run that had ended keeps its status."""
    # A job's traceback ends with its exception, which submitit follows with where the job's logs are.
    message = f"job {job.job_id} died: {_error_line(str(error).split('You can check full logs')[0])}"
    if run.state == "done":  # it died in the linear evaluation
        record = run.result | {"linear_eval_error": message}
    else:
        record = {"status": "failed", "error": message}
    fileio.atomic_write_text(run.folder / RESULT, json.dumps(record, indent=1))
    return record


def _starting(run):
    return f"{'resuming' if run.state in ('partial', 'failed') else 'running'} in {run.folder}"


def _said(run, what, stream):
    print(f"  {run.label}: {what}", file=stream, flush=True)


def _said_result(run, result, stream):
    """How the run ended; ``result`` None: another invocation was running it."""
    status = "running in another invocation" if result is None else result["status"]
    detail = "".join(f": {result[k]}" for k in ("error", "linear_eval_error") if result and result.get(k))
    _said(run, f"{status}{detail}", stream)


# ----------------------------------------------------------------------------- the table


def _read_csv(path):
    import pandas as pd

    return pd.read_csv(path) if Path(path).is_file() and Path(path).stat().st_size else None


def table(runs, swept):
    """One row per run from its files: the swept settings ("-" where the mechanism ignores one), its
    status, final loss and contrastive accuracy (mean over the last epoch's log rows; accuracy over
    the first epoch too), k-NN top-1 at step 0 and at the end, linear top-1 (when evaluated), the
    dictionary consistency, raw cosine and feature spread at the end, how much the consistency falls
    with key age (``monitors.consistency_fall``, the mean over the monitors), images/s, diverged."""
    import pandas as pd

    rows = []
    for run in runs:
        s = run.setting
        row = {"setting": run.label}
        row |= {k: (_text(s[k]) if config.used_by(k, s["mechanism"]) else "-") for k in swept}
        result = run.result
        row["status"] = result["status"] if result else "not run"
        log, monitor = _read_csv(run.folder / "log.csv"), _read_csv(run.folder / "monitor.csv")
        if log is not None and len(log):
            last, first = log[log["epoch"] == log["epoch"].max()], log[log["epoch"] == log["epoch"].min()]
            row |= {"final loss": last["loss"].mean(), "contrastive acc %": last["acc1"].mean(),
                    "acc % 1st epoch": first["acc1"].mean(), "images/s": log["images_per_s"].median()}
        if monitor is not None and len(monitor):
            start, end = monitor[monitor["step"] == 0], monitor.iloc[-1]
            row["k-NN % step 0"] = start["knn_top1"].iloc[0] if len(start) else math.nan
            row |= {"k-NN %": end["knn_top1"], "consistency": end["dict_consistency"],
                    "raw cosine": end["dict_cosine"], "feature spread": end["feature_spread"]}
        consistency = _read_csv(run.folder / "dictionary_consistency.csv")
        if consistency is not None and len(consistency):
            row["consistency fall"] = statistics.fmean(monitors.consistency_fall(rows)
                                                       for _, rows in consistency.groupby("step"))
        linear = run.folder / "lincls" / "linear_eval.json"
        if linear.is_file():
            row["linear top-1 %"] = json.loads(linear.read_text())["top1"]
        row["diverged"] = "yes" if _diverged(run.folder) else "no"
        row["note"] = (result or {}).get("error", "") + (result or {}).get("linear_eval_error", "")
        rows.append(row)
    frame = pd.DataFrame(rows)
    return frame if frame["note"].any() else frame.drop(columns="note")


def write_table(frame, output):
    """ablation.csv and ablation.md (numbers rounded for reading); returns the Markdown text."""
    output = Path(output)
    fileio.atomic_write_text(output / "ablation.csv", frame.to_csv(index=False))
    markdown = frame.to_markdown(index=False, floatfmt=".3g")
    fileio.atomic_write_text(output / "ablation.md", markdown + "\n")
    return markdown


# ----------------------------------------------------------------------------- figures


def figures(runs, output):
    """knn.png (k-NN top-1 by setting and over training), consistency.png (by key age at the first,
    middle and last monitor), loss.png (loss and contrastive accuracy over training): one colour per setting."""
    plt = monitors.pyplot()
    colours = plt.get_cmap("tab10" if len(runs) <= 10 else "tab20")
    output = Path(output)
    logs = {r.label: _read_csv(r.folder / "log.csv") for r in runs}
    knn_rows = {r.label: _read_csv(r.folder / "monitor.csv") for r in runs}
    consistency = {r.label: _read_csv(r.folder / "dictionary_consistency.csv") for r in runs}
    colour = {r.label: colours(i) for i, r in enumerate(runs)}

    fig, (bars, lines) = plt.subplots(1, 2, figsize=(12, 4.5))
    labels = [r.label for r in runs if knn_rows[r.label] is not None]
    finals = [knn_rows[name]["knn_top1"].iloc[-1] for name in labels]
    starts = [knn_rows[name].loc[knn_rows[name]["step"] == 0, "knn_top1"] for name in labels]
    bars.bar(range(len(labels)), finals, color=[colour[n] for n in labels])
    for i, start in enumerate(starts):
        if len(start):
            bars.plot([i - 0.4, i + 0.4], [start.iloc[0]] * 2, color="black", linestyle="--",
                      label="step 0 (random init)" if i == 0 else None)
    bars.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize="small")
    bars.set_ylabel("k-NN top-1 at the end (%)")
    bars.set_title("k-NN top-1 by setting")

    for name in labels:
        m = knn_rows[name]
        lines.plot(m["epoch"], m["knn_top1"], marker="o", color=colour[name], label=name)
    lines.set_xlabel("epoch")
    lines.set_ylabel("k-NN top-1 (%)")
    lines.set_title("k-NN top-1 during training")
    bars.set_ylim(0, 120)  # room for the legend above the bars
    monitors.finish_figure(fig, [bars, lines], output / "knn.png")

    tables = {name: t for name, t in consistency.items() if t is not None and len(t)}
    epochs = sorted({e for t in tables.values() for e in t.loc[t["step"] > 0, "epoch"]})  # step 0: nothing stored yet
    shown = sorted({epochs[0], epochs[len(epochs) // 2], epochs[-1]}) if epochs else []
    panels = {f"epoch {e}": {name: t[t["epoch"] == e] for name, t in tables.items() if (t["epoch"] == e).any()}
              for e in shown}
    monitors.plot_consistency_curves(panels, output / "consistency.png",
                                     "Dictionary consistency by key age: the first, middle and last monitor", colour)

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, log in logs.items():
        if log is None:
            continue
        axes[0].plot(log["step"], log["loss"], color=colour[name], label=name)
        axes[1].plot(log["step"], log["acc1"], color=colour[name], label=name)
    axes[0].set_ylabel("InfoNCE loss")
    axes[0].set_title("Training loss")
    axes[1].set_ylabel("contrastive accuracy (%): positive ranked first")
    axes[1].set_title("Pretext accuracy")
    for ax in axes:
        ax.set_xlabel("training step")
    monitors.finish_figure(fig, axes, output / "loss.png")
    return [output / "knn.png", output / "consistency.png", output / "loss.png"]

