"""Reports of a suite: every number comes from the runs' metrics.json files, nothing is typed in.

A suite's output folder holds one folder per run, ``<weights>/<task>/<schedule>/seed<N>/``
(see transfer/suite.py), each with the ``metrics.json`` that ``tools/finetune.py`` wrote. From those
files alone this module writes:

- ``runs.csv``     long format: one row per (run, metric), with the run's timings and versions;
                   a failed run is one row with its error and no metric.
- ``summary.csv``  per weights x task x schedule x metric: mean, std (over trials), n (trials that
                   have the metric), failed (trials that failed), delta against the supervised
                   baseline, and the published reference numbers for the same task and schedule.
- ``summary.md``   the same table in Markdown, plus the list of failed runs.
- ``deltas.png``   a bar chart of the deltas against the baseline (the paper's green / red).

Failed runs are never averaged, and a metric a run did not report stays missing (never zero).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from transfer.fileio import atomic_write_bytes, atomic_write_text

PUBLISHED_CSV = Path(__file__).resolve().parent.parent / "results" / "published_results.csv"
BASELINE = "supervised"
KEYS = ["weights", "task", "schedule"]

# metrics.json fields copied into runs.csv beside each metric (absent fields stay empty).
RUN_FIELDS = ["s_per_iter", "wall_time_s", "iterations", "num_gpus", "precision", "peak_memory_mb",
              "weights_path", "weights_sha256", "same_run_as"]
HATCHES = ["", "//", "..", "xx", "\\\\", "++"]
VERSIONS = ["python", "torch", "torchvision", "detectron2", "moco_transfer"]


@dataclass
class Report:
    runs: Path
    summary_csv: Path
    summary_md: Path
    chart: Path


# ---------------------------------------------------------------------------------------------
# Reading the runs

def _number(value):
    """A metric value as float, or None when it is missing or not a finite number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _run_rows(path: Path, output: Path) -> list[dict]:
    rel = path.parent.relative_to(output)
    weights, task, schedule, seed_dir = rel.parts[-4:]
    run = {"weights": weights, "task": task, "schedule": schedule,
           "seed": int(seed_dir.removeprefix("seed")), "run_dir": rel.as_posix()}
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        return [{**run, "status": "failed", "error": f"unreadable metrics.json: {e}",
                 "metric": None, "value": None}]
    # Names come from the suite's folders (a custom task's record names its YAML path instead).
    run.update(status=record.get("status", "failed"), error=record.get("error"),
               task_variant=record.get("task_variant"), weights_path=record.get("weights"))
    run.update({k: record.get(k) for k in RUN_FIELDS if k != "weights_path"})
    versions = record.get("versions") or {}
    run.update({f"version_{k}": versions.get(k) for k in VERSIONS})

    metrics = (record.get("metrics") or {}) if run["status"] == "ok" else {}
    rows = [{**run, "metric": name, "value": _number(value)} for name, value in metrics.items()]
    return rows or [{**run, "metric": None, "value": None}]


def load_runs(output) -> pd.DataFrame:
    """The long runs table of every ``<weights>/<task>/<schedule>/seed<N>/metrics.json`` under output."""
    output = Path(output)
    paths = sorted(p for p in output.glob("*/*/*/seed*/metrics.json")
                   if p.parent.name.removeprefix("seed").isdigit())
    rows = [row for path in paths for row in _run_rows(path, output)]
    columns = (KEYS + ["seed", "status", "metric", "value", "error", "task_variant"] + RUN_FIELDS
               + [f"version_{k}" for k in VERSIONS] + ["run_dir"])
    runs = pd.DataFrame(rows, columns=columns)
    runs["value"] = runs["value"].astype(float)
    return runs


# ---------------------------------------------------------------------------------------------
# Aggregating

def load_published(path=PUBLISHED_CSV) -> pd.DataFrame:
    return pd.read_csv(path)


def _reference_for(task: str, schedule: str):
    """(published task key, published schedule) for one of our (task, schedule), or None.

    Published numbers exist only for the paper's full schedules; the task registry says which
    published rows a task corresponds to. Unknown tasks (custom datasets) have none.
    """
    if schedule != "full":
        return None
    try:
        from transfer.tasks import get_task

        reference = get_task(task).reference
    except Exception:  # a custom or since-removed task: no published numbers to compare with
        return None
    return tuple(reference) if reference else None


def _published_columns(summary: pd.DataFrame, published: pd.DataFrame) -> pd.DataFrame:
    """Published values as one column per pre-training ("published: supervised IN-1M", ...)."""
    rows = []
    for task, schedule in summary[["task", "schedule"]].drop_duplicates().itertuples(index=False):
        reference = _reference_for(task, schedule)
        if reference is None:
            continue
        key, published_schedule = reference
        match = published[(published["task"] == key) & (published["schedule"] == published_schedule)]
        for r in match.itertuples(index=False):
            rows.append({"task": task, "schedule": schedule, "metric": r.metric,
                         "column": f"published: {r.pretrain}", "value": r.value})
    if not rows:
        return summary
    wide = pd.DataFrame(rows).pivot_table(index=["task", "schedule", "metric"], columns="column",
                                          values="value", aggfunc="first", sort=False)
    return summary.merge(wide.reset_index(), on=["task", "schedule", "metric"], how="left")


def _task_rank(tasks) -> dict:
    """Tasks in the registry's order (VOC, COCO, LVIS, Cityscapes, ...), unknown ones after, by name."""
    try:
        from transfer.tasks import TASKS

        known = [t for t in TASKS if t in tasks]
    except ImportError:
        known = []
    ordered = known + sorted(set(tasks) - set(known))
    return {t: i for i, t in enumerate(ordered)}


def summarize(runs: pd.DataFrame, baseline: str = BASELINE, published: pd.DataFrame | None = None):
    """Per weights x task x schedule x metric: mean, std, n, failed, delta vs baseline, published.

    The metrics of a (task, schedule) are those any successful run of it reported; a weights whose
    runs lack one of them gets that row with n = 0 and no mean. A (weights, task, schedule) whose
    runs all failed gets one row with no metric, n = 0 and its failed count.
    """
    columns = KEYS + ["metric", "mean", "std", "n", "failed", "delta"]
    if runs.empty:
        return pd.DataFrame(columns=columns)
    ok = runs[runs["status"] == "ok"]
    one_per_run = runs.drop_duplicates(KEYS + ["seed"])
    failed = (one_per_run[one_per_run["status"] != "ok"].groupby(KEYS).size().rename("failed"))
    metrics_of = ok.dropna(subset=["metric"]).groupby(["task", "schedule"], sort=False)["metric"].unique()

    rows = []
    for (weights, task, schedule), _ in one_per_run.groupby(KEYS, sort=False):
        names = list(metrics_of.get((task, schedule), [])) or [None]
        for name in names:
            values = ok[(ok["weights"] == weights) & (ok["task"] == task)
                        & (ok["schedule"] == schedule) & (ok["metric"] == name)]["value"].dropna()
            rows.append({"weights": weights, "task": task, "schedule": schedule, "metric": name,
                         "mean": values.mean() if len(values) else math.nan,
                         "std": values.std(ddof=1) if len(values) > 1 else math.nan,
                         "n": len(values)})
    summary = pd.DataFrame(rows)
    summary["failed"] = [int(failed.get(tuple(k), 0)) for k in summary[KEYS].itertuples(index=False)]

    base = summary[summary["weights"] == baseline].set_index(["task", "schedule", "metric"])["mean"]
    summary["delta"] = [
        mean - base.get((task, schedule, metric), math.nan) if weights != baseline else math.nan
        for weights, task, schedule, metric, mean in
        summary[KEYS + ["metric", "mean"]].itertuples(index=False)]

    # Baseline first within a task, then the other weights in the order they were given.
    order = {w: i for i, w in enumerate(dict.fromkeys([baseline] + list(runs["weights"])))}
    summary["_order"] = summary["weights"].map(order)
    summary["_task"] = summary["task"].map(_task_rank(set(summary["task"])))
    summary = summary.sort_values(["_task", "schedule", "_order"], kind="stable")
    summary = summary.drop(columns=["_order", "_task"]).reset_index(drop=True)
    if published is not None:
        summary = _published_columns(summary, published)
    return summary


# ---------------------------------------------------------------------------------------------
# Writing

def _cell(value, signed=False):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return f"{value:+.2f}" if signed else f"{value:.2f}"
    return str(value)


def to_markdown(summary: pd.DataFrame, runs: pd.DataFrame, baseline: str = BASELINE) -> str:
    table = summary.copy()
    for column in table.columns:
        signed = column == "delta"
        table[column] = [_cell(v, signed) for v in table[column]]
    table = table.rename(columns={"delta": f"delta vs {baseline}"})
    lines = ["# Transfer results", "",
             f"Mean and std over trials (seeds); n = trials with the metric, failed = trials that "
             f"failed (never averaged); delta = mean minus the mean of `{baseline}`; published = "
             f"the paper's number for the same task and schedule.", "",
             table.to_markdown(index=False, disable_numparse=True), ""]

    failures = runs[runs["status"] != "ok"].drop_duplicates(KEYS + ["seed"])
    if len(failures):
        lines += ["## Failed runs", ""]
        for r in failures.itertuples(index=False):
            error = str(r.error or "no error recorded").strip().splitlines()
            lines.append(f"- `{r.run_dir}`: {error[-1] if error else ''}")
        lines.append("")
    return "\n".join(lines)


def read_markdown_table(text: str) -> pd.DataFrame:
    """The first pipe table of a Markdown text, numbers parsed (the inverse of ``to_markdown``)."""
    rows = [line.strip() for line in text.splitlines() if line.strip().startswith("|")]
    cells = [[c.strip() for c in row.strip("|").split("|")] for row in rows]
    header, body = cells[0], [c for c in cells[1:] if not set("".join(c)) <= set("-: ")]
    table = pd.DataFrame(body, columns=header).replace("", None)
    for column in table.columns:
        converted = pd.to_numeric(table[column], errors="coerce")
        if converted.notna().sum() == table[column].notna().sum():
            table[column] = converted
    return table


def plot_deltas(summary: pd.DataFrame, path, baseline: str = BASELINE) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    deltas = summary.dropna(subset=["delta"])
    groups = list(dict.fromkeys(zip(deltas["task"], deltas["schedule"], deltas["metric"])))
    others = list(dict.fromkeys(deltas["weights"]))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.5 * len(groups) * max(1, len(others)) + 2), 4))
    if not groups:
        ax.text(0.5, 0.5, f"no deltas: no weights besides '{baseline}' with results",
                ha="center", va="center")
        ax.set_axis_off()
    else:
        width, handles = 0.8 / len(others), []
        for i, weights in enumerate(others):
            mine = deltas[deltas["weights"] == weights].set_index(["task", "schedule", "metric"])["delta"]
            values = [mine.get(g, math.nan) for g in groups]
            xs = [j + (i - (len(others) - 1) / 2) * width for j in range(len(groups))]
            colors = ["tab:green" if v >= 0 else "tab:red" for v in values]
            # Colour says better / worse; the hatch tells the weights apart.
            ax.bar(xs, values, width, color=colors, edgecolor="black", linewidth=0.5,
                   hatch=HATCHES[i % len(HATCHES)])
            handles.append(Patch(facecolor="white", edgecolor="black", hatch=HATCHES[i % len(HATCHES)],
                                 label=weights))
            for x, v in zip(xs, values):
                if not math.isnan(v):
                    ax.annotate(f"{v:+.1f}", (x, v), ha="center", fontsize=7,
                                va="bottom" if v >= 0 else "top")
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels([f"{t}\n{m}" + ("" if s == "full" else f" ({s})") for t, s, m in groups],
                           rotation=45, ha="right", fontsize=8)
        ax.set_ylabel(f"delta vs {baseline} (points)")
        if len(others) > 1:
            ax.legend(handles=handles, fontsize=8)
        ax.set_title(f"Transfer: difference to {baseline} pre-training")
    fig.tight_layout()
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def write_reports(output, baseline: str = BASELINE, published_path=PUBLISHED_CSV) -> Report:
    """(Re)write runs.csv, summary.csv, summary.md and deltas.png from output's metrics.json files."""
    output = Path(output)
    runs = load_runs(output)
    published = load_published(published_path) if published_path else None
    summary = summarize(runs, baseline, published)
    report = Report(output / "runs.csv", output / "summary.csv", output / "summary.md",
                    output / "deltas.png")
    atomic_write_text(report.runs, runs.to_csv(index=False))
    atomic_write_text(report.summary_csv, summary.to_csv(index=False))
    atomic_write_text(report.summary_md, to_markdown(summary, runs, baseline))
    plot_deltas(summary, report.chart, baseline)
    return report
