"""Reports of a suite: every number comes from the runs' metrics.json files, nothing is typed in.

A suite's output folder holds one folder per run, ``<weights>/<task>/<schedule>[@<regime>]/seed<N>/``
(see transfer/runs.py), each with the ``metrics.json`` that ``tools/finetune.py`` wrote. A run's
regime (label ``fraction``, ``backbone`` mode; transfer/regimes.py) is part of every grouping
below, like its schedule. From those files alone this module writes:

- ``runs.csv``      long format: one row per (run, metric), with the run's provenance (batch, LR and
                    iterations after any scaling, protocol, GPUs, versions, git commit);
                    a failed run is one row with its error and no metric.
- ``summary.csv``   per weights x task x schedule x metric: mean, std, n (trials that have the
                    metric), the mean's 95% interval, failed (trials that failed), no_predictions
                    (trials whose model predicted nothing, averaged with their AP of 0); against the
                    supervised baseline the delta, its 95% interval, p-value, test and whether it is
                    significant (transfer/stats.py); the published numbers of the same task,
                    schedule and protocol.
- ``per_class.csv`` per weights x task x schedule x class: mean AP (IoU) over trials, delta vs baseline.
- ``summary.md``    the table in Markdown, the published numbers, the classes that gained or lost
                    most, the failed runs and the runs without predictions.
- ``deltas.png``    a bar chart of the deltas against the baseline (the paper's green / red).
- ``label_efficiency.png`` when a task ran several label fractions: the headline metric against
                    the fraction, per weights file, with the deltas (transfer/label_efficiency.py),
                    and its section in summary.md.

Failed runs are never averaged, and a metric a run did not report stays missing (never zero). A
run whose model predicted nothing did report its metrics: AP 0 (``no_predictions`` in its
metrics.json); it is averaged like any other run, and marked.
A run that fell back to another task (LVIS v1 -> v0.5) is reported under the task that ran.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from transfer import REPO, label_efficiency, regimes, stats
from transfer.fileio import atomic_write_bytes, atomic_write_text
from transfer.runs import BASELINE, recorded_runs

PUBLISHED_CSV = REPO / "results" / "published_results.csv"
KEYS = ["weights", "task", "schedule", "fraction", "backbone"]
SETTING = KEYS[1:]  # what two weights files are compared at: the same task, schedule and regime

# metrics.json fields copied into runs.csv beside each metric (absent fields stay empty).
RUN_FIELDS = ["s_per_iter", "wall_time_s", "iterations", "num_gpus", "precision", "peak_memory_mb",
              "weights_path", "weights_sha256", "same_run_as", "no_predictions", "images_evaluated",
              "images_kept", "classes_without_images"]
# metrics.json "provenance" fields (transfer/finetune.py): what the run really trained with.
PROVENANCE = ["protocol", "subset_seed", "schedule_factor", "norm", "freeze_at", "ims_per_batch", "base_lr",
              "max_iter", "warmup_iters",
              "precise_bn_iters", "bn_group_images", "small_batch", "gpu_model", "detectron2_compiled", "git_commit"]
HATCHES = ["", "//", "..", "xx", "\\\\", "++"]
VERSIONS = ["python", "torch", "torchvision", "detectron2", "moco_transfer"]
SUMMARY = KEYS + ["metric", "mean", "std", "n", "ci_low", "ci_high", "failed", "no_predictions",
                  "delta", "delta_ci_low", "delta_ci_high", "p_value", "test", "significant"]
TOP_CLASSES = 5  # per task and weights, the classes with the largest gains and losses in summary.md


@dataclass
class Report:
    runs: Path
    summary_csv: Path
    summary_md: Path
    chart: Path
    per_class: Path
    label_efficiency: Path | None = None  # written when a task ran several label fractions

    def __str__(self) -> str:
        return ", ".join(str(path) for path in (self.runs, self.summary_csv, self.summary_md,
                                                self.per_class, self.chart, self.label_efficiency) if path)


# ---------------------------------------------------------------------------------------------
# Reading the runs

def _number(value):
    """A metric value as float, or None when it is missing or not a finite number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def read_records(output) -> list[tuple[dict, dict]]:
    """(the run's identity, its metrics.json) for every run folder under ``output`` (transfer.runs).

    The task is the one that ran (``task_variant`` when the run fell back to another task). An
    unreadable file gives a failed record that says why.
    """
    return [({"weights": key.weights, "task": record.get("task_variant") or key.task, "schedule": key.schedule,
              "fraction": key.fraction, "backbone": key.backbone, "seed": key.seed, "run_dir": key.name}, record)
            for key, record in recorded_runs(output)]


def _subset_fields(record: dict) -> dict:
    """runs.csv's view of a labelled subset (metrics.json's ``label_subset``): the training
    images kept, and the classes some subset left without any image (comma-separated)."""
    subsets = (record.get("label_subset") or {}).values()
    if not subsets:
        return {}
    missing = dict.fromkeys(c for s in subsets for c in s.get("classes_without_images") or [])
    return {"images_kept": sum(s.get("kept") or 0 for s in subsets), "classes_without_images": ", ".join(missing)}


def _run_rows(run: dict, record: dict) -> list[dict]:
    run = dict(run, status=record.get("status", "failed"), error=record.get("error"),
               task_variant=record.get("task_variant"), weights_path=record.get("weights"))
    run.update({k: record.get(k) for k in RUN_FIELDS if k != "weights_path"})
    run.update(_subset_fields(record))
    provenance = record.get("provenance") or {}
    run.update({k: provenance.get(k) for k in PROVENANCE})
    versions = record.get("versions") or {}
    run.update({f"version_{k}": versions.get(k) for k in VERSIONS})

    metrics = (record.get("metrics") or {}) if run["status"] == "ok" else {}
    rows = [{**run, "metric": name, "value": _number(value)} for name, value in metrics.items()]
    return rows or [{**run, "metric": None, "value": None}]


def runs_table(records) -> pd.DataFrame:
    """The long runs table: one row per (run, metric)."""
    rows = [row for run, record in records for row in _run_rows(run, record)]
    columns = (KEYS + ["seed", "status", "metric", "value", "error", "task_variant"] + RUN_FIELDS
               + PROVENANCE + [f"version_{k}" for k in VERSIONS] + ["run_dir"])
    runs = pd.DataFrame(rows, columns=columns)
    runs["value"] = runs["value"].astype(float)
    return runs


def load_runs(output) -> pd.DataFrame:
    """The long runs table of every ``<weights>/<task>/<schedule>/seed<N>/metrics.json`` under output."""
    return runs_table(read_records(output))


# ---------------------------------------------------------------------------------------------
# Aggregating

def load_published(path=PUBLISHED_CSV) -> pd.DataFrame:
    return pd.read_csv(path)


def reference_for(task: str, schedule: str, fraction: float = regimes.FULL, backbone: str = regimes.FINETUNE):
    """(published task key, published schedule, protocol) for one of our (task, schedule, regime),
    or the reason there is no comparable published number (a string).

    Published numbers exist only for the papers' full schedules; the task registry says which
    published rows a task matches (dataset version, split, schedule) and under which protocol; a
    regime makes the protocol its own (``regimes.protocol``: "frozen backbone", "fine-tune, 10%
    labels (subset seed 0)"), which a published row must name to stand beside it.
    """
    if schedule != "full":
        return f"the {schedule} schedule is not a published one"
    from transfer.errors import UserError
    from transfer.tasks import get_task

    try:
        task_entry = get_task(task)
    except UserError:  # a custom or since-removed task
        return "no published number for this dataset"
    if not task_entry.reference:
        return f"no published number for {task_entry.description}"
    return (*task_entry.reference, regimes.protocol(task_entry.protocol, backbone, fraction))


def _published_rows(settings, published: pd.DataFrame) -> pd.DataFrame:
    """The published rows that match each of our (task, schedule, fraction, backbone): task key,
    schedule and protocol."""
    rows = []
    for setting in settings:
        reference = reference_for(*setting)
        if isinstance(reference, str):
            continue
        key, published_schedule, protocol = reference
        match = published[(published["task"] == key) & (published["schedule"] == published_schedule)
                          & (published["protocol"] == protocol)]
        rows += [{**dict(zip(SETTING, setting)), "metric": r.metric, "pretrain": r.pretrain,
                  "value": r.value, "source": r.source} for r in match.itertuples(index=False)]
    return pd.DataFrame(rows, columns=SETTING + ["metric", "pretrain", "value", "source"])


def _published_columns(summary: pd.DataFrame, published: pd.DataFrame) -> pd.DataFrame:
    """Published values as one column per pre-training ("published: supervised IN-1M", ...)."""
    rows = _published_rows(summary[SETTING].drop_duplicates().itertuples(index=False), published)
    if rows.empty:
        return summary
    rows["column"] = "published: " + rows["pretrain"]
    wide = rows.pivot_table(index=SETTING + ["metric"], columns="column",
                            values="value", aggfunc="first", sort=False)
    return summary.merge(wide.reset_index(), on=SETTING + ["metric"], how="left")


def _task_rank(tasks) -> dict:
    """Tasks in the registry's order (VOC, COCO, LVIS, Cityscapes, ...), unknown ones after, by name."""
    try:
        from transfer.tasks import TASKS

        known = [t for t in TASKS if t in tasks]
    except ImportError:
        known = []
    ordered = known + sorted(set(tasks) - set(known))
    return {t: i for i, t in enumerate(ordered)}


def _by_seed(ok: pd.DataFrame, weights, setting: tuple, metric) -> pd.Series:
    """The values of ``weights`` at ``setting`` (task, schedule, fraction, backbone), by seed."""
    rows = ok[(ok["weights"] == weights) & (ok["metric"] == metric)]
    for column, value in zip(SETTING, setting):
        rows = rows[rows[column] == value]
    return rows.set_index("seed")["value"].dropna()


def summarize(runs: pd.DataFrame, baseline: str = BASELINE, published: pd.DataFrame | None = None):
    """Per weights x task x schedule x metric: mean, std, n, its interval, failed, no_predictions
    (successful trials whose model predicted nothing: counted in n with their values); the delta vs
    the baseline with its interval and test (see transfer/stats.py); published numbers.

    The metrics of a (task, schedule) are those any successful run of it reported; a weights whose
    runs lack one of them gets that row with n = 0 and no mean. A (weights, task, schedule) whose
    runs all failed gets one row with no metric, n = 0 and its failed count.
    """
    if runs.empty:
        return pd.DataFrame(columns=SUMMARY)
    ok = runs[runs["status"] == "ok"]
    one_per_run = runs.drop_duplicates(KEYS + ["seed"])
    failed = (one_per_run[one_per_run["status"] != "ok"].groupby(KEYS).size().rename("failed"))
    empty = _without_predictions(one_per_run).groupby(KEYS).size()
    metrics_of = ok.dropna(subset=["metric"]).groupby(["task", "schedule"], sort=False)["metric"].unique()

    rows = []
    for key, _ in one_per_run.groupby(KEYS, sort=False):
        weights, setting = key[0], key[1:]
        for name in list(metrics_of.get(setting[:2], [])) or [None]:
            values = _by_seed(ok, weights, setting, name)
            low, high = stats.mean_interval(values)
            row = {**dict(zip(KEYS, key)), "metric": name,
                   "mean": values.mean() if len(values) else math.nan,
                   "std": values.std(ddof=1) if len(values) > 1 else math.nan,
                   "n": len(values), "ci_low": low, "ci_high": high,
                   "failed": int(failed.get(key, 0)), "no_predictions": int(empty.get(key, 0))}
            if weights != baseline:
                row.update(_against(values, _by_seed(ok, baseline, setting, name)))
            rows.append(row)
    summary = pd.DataFrame(rows).reindex(columns=SUMMARY)

    # Within a task and schedule: the paper's regime first (fine-tuned, then the label fractions
    # from all down), the frozen backbone after; the baseline first, then the other weights in
    # the order they were given.
    order = {w: i for i, w in enumerate(dict.fromkeys([baseline] + list(runs["weights"])))}
    summary["_order"] = summary["weights"].map(order)
    summary["_task"] = summary["task"].map(_task_rank(set(summary["task"])))
    summary["_frozen"] = summary["backbone"] == regimes.FROZEN
    summary["_labels"] = -summary["fraction"]
    summary = summary.sort_values(["_task", "schedule", "_frozen", "_labels", "_order"], kind="stable")
    summary = summary.drop(columns=["_order", "_task", "_frozen", "_labels"]).reset_index(drop=True)
    if published is not None:
        summary = _published_columns(summary, published)
    return summary


def _without_predictions(runs: pd.DataFrame) -> pd.DataFrame:
    """The rows of successful runs whose model predicted nothing (older records lack the field)."""
    return runs[(runs["status"] == "ok") & runs["no_predictions"].eq(True)]


def _against(values: pd.Series, base: pd.Series) -> dict:
    """The delta columns of a row: nothing (NaN) when the baseline has no value for the metric."""
    if base.empty or values.empty:
        return {}
    c = stats.compare(values, base)
    return {"delta": c.delta, "delta_ci_low": c.low, "delta_ci_high": c.high, "p_value": c.p_value,
            "test": c.test, "significant": {True: "yes", False: "no", None: None}[c.significant]}


def per_class_table(records, baseline: str = BASELINE) -> pd.DataFrame:
    """Per weights x task x schedule x section x class: mean over the successful trials, n, and
    the delta against the baseline's mean (per-class AP, or IoU for semantic segmentation)."""
    rows = [{**{k: run[k] for k in KEYS}, "seed": run["seed"], "section": section, "class": name,
             "value": _number(value)}
            for run, record in records if record.get("status") == "ok"
            for section, classes in (record.get("per_class") or {}).items()
            for name, value in classes.items()]
    columns = KEYS + ["section", "class", "mean", "n", "baseline_mean", "delta"]
    if not rows:
        return pd.DataFrame(columns=columns)
    table = (pd.DataFrame(rows).groupby(KEYS + ["section", "class"], sort=False)["value"]
             .agg(mean="mean", n="count").reset_index())
    base = table[table["weights"] == baseline].set_index(SETTING + ["section", "class"])["mean"]
    table["baseline_mean"] = [base.get(tuple(k), math.nan) for k in
                              table[SETTING + ["section", "class"]].itertuples(index=False)]
    table["delta"] = table["mean"] - table["baseline_mean"]
    table.loc[table["weights"] == baseline, "delta"] = math.nan
    return table[columns]


# ---------------------------------------------------------------------------------------------
# Writing

def _cell(value, signed=False):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return f"{value:+.2f}" if signed else f"{value:.2f}"
    return str(value)


def _interval(low, high, signed=False) -> str:
    return "" if math.isnan(low) or math.isnan(high) else f"[{_cell(low, signed)}, {_cell(high, signed)}]"


def _p(value) -> str:
    return "" if value is None or math.isnan(value) else ("< 0.001" if value < 0.001 else f"{value:.3f}")


def _regime_text(fraction: float, backbone: str) -> str:
    """'' for the paper's regime, else e.g. ', 10% labels, frozen backbone'."""
    return (f", {regimes.percent(fraction)} labels" if fraction < regimes.FULL else "") + \
        (", frozen backbone" if backbone == regimes.FROZEN else "")


def _regime_columns(summary: pd.DataFrame) -> dict:
    """summary.md's regime columns: shown only when some run is not in the paper's regime."""
    if ((summary["fraction"] == regimes.FULL) & (summary["backbone"] == regimes.FINETUNE)).all():
        return {}
    return {"labels": [regimes.percent(f) for f in summary["fraction"]], "backbone": summary["backbone"]}


def _main_table(summary: pd.DataFrame, baseline: str) -> str:
    table = pd.DataFrame({
        **{k: summary[k] for k in ["weights", "task", "schedule"]}, **_regime_columns(summary),
        "metric": summary["metric"],
        "mean": [_cell(v) for v in summary["mean"]], "std": [_cell(v) for v in summary["std"]],
        "n": summary["n"], "95% CI": [_interval(lo, hi) for lo, hi in zip(summary["ci_low"], summary["ci_high"])],
        "failed": summary["failed"], "no predictions": summary["no_predictions"],
        f"delta vs {baseline}": [_cell(v, signed=True) for v in summary["delta"]],
        "delta 95% CI": [_interval(lo, hi, True) for lo, hi in zip(summary["delta_ci_low"], summary["delta_ci_high"])],
        "p": [_p(v) for v in summary["p_value"]],
        "test": [_cell(v) for v in summary["test"]],
        "significant": [_cell(v) for v in summary["significant"]],
    })
    return table.to_markdown(index=False, disable_numparse=True)


def _small_batch_note(runs: pd.DataFrame) -> list[str]:
    """Runs whose BN saw fewer images than the protocol's minimum are marked, never silently mixed."""
    from transfer.tasks import MIN_BN_GROUP

    small = runs[runs["small_batch"].fillna(False).astype(bool)].drop_duplicates(["task", "schedule"])
    if small.empty:
        return []
    cells = ", ".join(f"`{t}` ({s})" for t, s in small[["task", "schedule"]].itertuples(index=False))
    return [f"Small batches: runs of {cells} trained with fewer than {MIN_BN_GROUP} images per BN group "
            "(`bn_group_images` and `small_batch` in runs.csv), which is not the papers' protocol.", ""]


def _published_section(summary: pd.DataFrame, published: pd.DataFrame | None) -> list[str]:
    """Per (task, schedule): the matching published numbers with their sources, or why there are none."""
    if published is None or summary.empty:
        return []
    lines, missing = ["## Published numbers", ""], {}
    for task, schedule, fraction, backbone in summary[SETTING].drop_duplicates().itertuples(index=False):
        rows = _published_rows([(task, schedule, fraction, backbone)], published)
        regime = _regime_text(fraction, backbone)
        if rows.empty:
            reason = reference_for(task, schedule, fraction, backbone)
            missing.setdefault(reason if isinstance(reason, str) else "no published number for this "
                               "task's dataset version, split, schedule and protocol", []).append(
                f"`{task}`" + (f" ({regime[2:]})" if regime else ""))
            continue
        wide = rows.pivot_table(index="metric", columns="pretrain", values="value", aggfunc="first", sort=False)
        lines += [f"`{task}` ({schedule}{regime}):", "", wide.reset_index().to_markdown(index=False), "",
                  "Sources: " + "; ".join(f"{r.pretrain}: {r.source}"
                                          for r in rows.drop_duplicates("pretrain").itertuples(index=False)), ""]
    lines += [f"- {', '.join(dict.fromkeys(tasks))}: {reason}" for reason, tasks in missing.items()]
    return lines + [""]


def _per_class_section(per_class: pd.DataFrame, baseline: str) -> list[str]:
    """For each task and weights: the classes that gained and lost most against the baseline."""
    deltas = per_class.dropna(subset=["delta"])
    if deltas.empty:
        return []
    lines = ["## Per-class results", "",
             f"Mean per-class AP (IoU for semantic segmentation) minus `{baseline}`'s, the {TOP_CLASSES} "
             "largest gains and losses; every class is in per_class.csv.", ""]
    for (weights, task, schedule, fraction, backbone, section), rows in deltas.groupby(KEYS + ["section"], sort=False):
        ranked = rows.sort_values("delta", ascending=False)
        gains = ranked[ranked["delta"] > 0].head(TOP_CLASSES)
        losses = ranked[ranked["delta"] < 0].iloc[::-1].head(TOP_CLASSES)
        shown = {label: ", ".join(f"{c} {d:+.1f}" for c, d in zip(part["class"], part["delta"])) or "none"
                 for label, part in (("gains", gains), ("losses", losses))}
        lines.append(f"- `{weights}` on `{task}` ({schedule}{_regime_text(fraction, backbone)}, {section}): "
                     f"gains {shown['gains']}; "
                     f"losses {shown['losses']}")
    return lines + [""]


def to_markdown(summary: pd.DataFrame, runs: pd.DataFrame, baseline: str = BASELINE,
                published: pd.DataFrame | None = None, per_class: pd.DataFrame | None = None,
                efficiency: pd.DataFrame | None = None) -> str:
    """summary.md; ``efficiency``: label_efficiency.efficiency_table(runs, baseline), when the caller has it."""
    if efficiency is None:
        efficiency = label_efficiency.efficiency_table(runs, baseline)
    lines = ["# Transfer results", "",
             f"Mean and std over trials (seeds); n = trials with the metric; 95% CI = the mean's "
             f"confidence interval (t distribution); failed = trials that failed (never averaged); "
             f"no predictions = trials whose model predicted nothing (averaged, with AP 0); "
             f"delta = mean minus the mean of `{baseline}`, with its 95% interval and the p-value of a "
             f"paired t-test (both ran the same seeds) or Welch's t-test; significant = p < {stats.ALPHA:.2f}; "
             f"{stats.NO_TEST} with fewer than {stats.MIN_TRIALS} trials on either side.", "",
             _main_table(summary, baseline), ""]
    lines += _small_batch_note(runs)
    lines += _published_section(summary, published)
    lines += _per_class_section(per_class if per_class is not None else pd.DataFrame(columns=["delta"]), baseline)
    lines += label_efficiency.markdown(efficiency, runs, baseline)

    failures = runs[runs["status"] != "ok"].drop_duplicates(KEYS + ["seed"])
    if len(failures):
        lines += ["## Failed runs", ""]
        for r in failures.itertuples(index=False):
            error = str(r.error or "no error recorded").strip().splitlines()
            lines.append(f"- `{r.run_dir}`: {error[-1] if error else ''}")
        lines.append("")
    lines += _no_predictions_section(runs)
    return "\n".join(lines)


def _no_predictions_section(runs: pd.DataFrame) -> list[str]:
    """Runs that count with AP 0 because their model predicted nothing, so that a low mean can be
    traced to them."""
    empty = _without_predictions(runs).drop_duplicates(KEYS + ["seed"])
    if empty.empty:
        return []
    lines = ["## Runs without predictions", "",
             "Their model predicted no instance on any test image: AP 0, averaged with the other trials.", ""]
    lines += [f"- `{r.run_dir}`: no predictions on "
              + (f"{int(r.images_evaluated)} test images" if pd.notna(r.images_evaluated) else "the test images")
              for r in empty.itertuples(index=False)]
    return lines + [""]


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
    groups = list(dict.fromkeys(zip(*(deltas[k] for k in SETTING + ["metric"]))))
    others = list(dict.fromkeys(deltas["weights"]))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.5 * len(groups) * max(1, len(others)) + 2), 4))
    if not groups:
        ax.text(0.5, 0.5, f"no deltas: no weights besides '{baseline}' with results",
                ha="center", va="center")
        ax.set_axis_off()
    else:
        width, handles = 0.8 / len(others), []
        for i, weights in enumerate(others):
            mine = deltas[deltas["weights"] == weights].set_index(SETTING + ["metric"])["delta"]
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
        ax.set_xticklabels([f"{t}\n{m}" + ("" if s == "full" else f" ({s})") + _regime_text(f, b).replace(", ", "\n")
                            for t, s, f, b, m in groups],
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
    """(Re)write runs.csv, summary.csv, per_class.csv, summary.md and deltas.png from output's
    metrics.json files, and label_efficiency.png when a task ran several label fractions."""
    output = Path(output)
    records = read_records(output)
    runs = runs_table(records)
    per_class = per_class_table(records, baseline)
    published = load_published(published_path) if published_path else None
    summary = summarize(runs, baseline, published)
    report = Report(output / "runs.csv", output / "summary.csv", output / "summary.md",
                    output / "deltas.png", output / "per_class.csv")
    atomic_write_text(report.runs, runs.to_csv(index=False))
    atomic_write_text(report.summary_csv, summary.to_csv(index=False))
    atomic_write_text(report.per_class, per_class.to_csv(index=False))
    efficiency = label_efficiency.efficiency_table(runs, baseline)  # for summary.md and its figure
    atomic_write_text(report.summary_md, to_markdown(summary, runs, baseline, published, per_class, efficiency))
    plot_deltas(summary, report.chart, baseline)
    if label_efficiency.has_fractions(runs):
        report.label_efficiency = output / label_efficiency.FIGURE
        label_efficiency.plot(efficiency, report.label_efficiency, baseline)
    return report
