"""The label-efficiency part of a report: a task's headline metric against the label fraction.

From the long runs table (``transfer.report.load_runs``: one row per run and metric, with the
run's ``fraction`` and ``backbone``), per task, schedule and backbone mode:

- ``efficiency_table``: per fraction and weights file, the mean over trials with its 95% interval
  and n, and against the baseline at the same fraction (the same labelled images: the subset does
  not depend on the weights) the delta with its interval, p-value and test (transfer/stats.py);
- ``plot``: ``label_efficiency.png``, one panel per task: the metric against the fraction on a
  log-scale x axis, one line per weights file (dashed: the frozen backbone), the mean's interval
  as error bars and each delta against the baseline written beside its point;
- ``markdown``: the section of summary.md: the rule, one table per task, the classes a fraction
  left without any training image.

Runs recorded before the regimes existed have no ``fraction`` / ``backbone``: they are the paper's
regime, all labels and the backbone fine-tuned.
"""
from __future__ import annotations

import io
import math

import pandas as pd

from transfer import stats
from transfer.regimes import FINETUNE, FROZEN, FULL, SUBSET_RULE, percent
from transfer.runs import BASELINE

FIGURE = "label_efficiency.png"
GROUP = ["task", "schedule", "backbone"]
COLUMNS = GROUP + ["metric", "fraction", "weights", "mean", "n", "ci_low", "ci_high", "iterations",
                   "delta", "delta_ci_low", "delta_ci_high", "p_value", "test"]


def with_regimes(runs: pd.DataFrame) -> pd.DataFrame:
    """``runs`` with ``fraction`` and ``backbone`` filled in (the paper's regime where missing)."""
    runs = runs.copy()
    for column, default in (("fraction", FULL), ("backbone", FINETUNE)):
        runs[column] = runs[column].fillna(default) if column in runs else default
    runs["fraction"] = runs["fraction"].astype(float)
    return runs


def has_fractions(runs: pd.DataFrame) -> bool:
    """True when some task ran at more than one label fraction (else there is nothing to plot)."""
    ok = with_regimes(runs)
    ok = ok[ok["status"] == "ok"]
    return bool(len(ok)) and bool((ok.groupby(["task", "schedule"])["fraction"].nunique() > 1).any())


def headline(task: str, metrics) -> str | None:
    """The metric a task is plotted by: its registry entry's first headline metric the runs have,
    else the first metric they have."""
    metrics = [m for m in metrics if isinstance(m, str)]
    try:
        from transfer.tasks import get_task

        first = [m for m in get_task(task).metrics if m in metrics]
    except Exception:  # noqa: BLE001  (a custom or since-removed task: its runs say what it has)
        first = []
    return (first or metrics or [None])[0]


def _values(ok: pd.DataFrame, weights: str, metric: str) -> pd.Series:
    rows = ok[(ok["weights"] == weights) & (ok["metric"] == metric)]
    return rows.set_index("seed")["value"].dropna()


def efficiency_table(runs: pd.DataFrame, baseline: str = BASELINE) -> pd.DataFrame:
    """One row per (task, schedule, backbone, fraction, weights) for each task's headline metric."""
    runs = with_regimes(runs)
    ok = runs[runs["status"] == "ok"]
    rows = []
    for (task, schedule, backbone), group in ok.groupby(GROUP, sort=False):
        metric = headline(task, group["metric"].unique())
        if metric is None:
            continue
        order = list(dict.fromkeys([baseline] + list(group["weights"])))
        for fraction in sorted(group["fraction"].unique()):
            at = group[group["fraction"] == fraction]
            base = _values(at, baseline, metric)
            for weights in (w for w in order if w in set(at["weights"])):
                values = _values(at, weights, metric)
                low, high = stats.mean_interval(values)
                iterations = at.loc[at["weights"] == weights, "max_iter"].dropna() if "max_iter" in at else []
                row = {"task": task, "schedule": schedule, "backbone": backbone, "metric": metric,
                       "fraction": fraction, "weights": weights, "mean": values.mean() if len(values) else math.nan,
                       "n": len(values), "ci_low": low, "ci_high": high,
                       "iterations": int(iterations.iloc[0]) if len(iterations) else None}
                if weights != baseline and len(base) and len(values):
                    c = stats.compare(values, base)
                    row.update(delta=c.delta, delta_ci_low=c.low, delta_ci_high=c.high, p_value=c.p_value, test=c.test)
                rows.append(row)
    return pd.DataFrame(rows).reindex(columns=COLUMNS)


def _number(value, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return f"{value:+.2f}" if signed else f"{value:.2f}"


def _cell(row: pd.Series) -> str:
    interval = "" if math.isnan(row["ci_low"]) else f" [{_number(row['ci_low'])}, {_number(row['ci_high'])}]"
    return f"{_number(row['mean'])}{interval} (n={row['n']})" if row["n"] else "no result"


def _delta_cell(row: pd.Series) -> str:
    if pd.isna(row["delta"]):
        return ""
    if row["test"] == stats.NO_TEST:
        return f"{_number(row['delta'], True)} ({stats.NO_TEST})"
    p = "< 0.001" if row["p_value"] < 0.001 else f"{row['p_value']:.3f}"
    interval = f"[{_number(row['delta_ci_low'], True)}, {_number(row['delta_ci_high'], True)}]"
    return f"{_number(row['delta'], True)} {interval} p {p}"


def _task_table(rows: pd.DataFrame, baseline: str) -> str:
    """Rows: fractions; columns: each weights file's mean, and each other one's delta vs the baseline."""
    weights = list(dict.fromkeys(rows["weights"]))
    table = []
    for fraction, at in rows.groupby("fraction", sort=True):
        line = {"labels": percent(fraction), "iterations": ", ".join(
            str(i) for i in dict.fromkeys(at["iterations"].dropna().astype(int)))}
        for w in weights:
            mine = at[at["weights"] == w]
            line[w] = _cell(mine.iloc[0]) if len(mine) else ""
        for w in (w for w in weights if w != baseline):
            mine = at[at["weights"] == w]
            line[f"{w} - {baseline}"] = _delta_cell(mine.iloc[0]) if len(mine) else ""
        table.append(line)
    return pd.DataFrame(table).to_markdown(index=False, disable_numparse=True)


def classes_without_images(runs: pd.DataFrame) -> list[tuple[str, float, str]]:
    """(task, fraction, the classes some subset left without any image) from the runs table's
    ``classes_without_images`` column (comma-separated names per run)."""
    if "classes_without_images" not in runs:
        return []
    runs = with_regimes(runs)
    found = runs.dropna(subset=["classes_without_images"])
    found = found[found["classes_without_images"].astype(str).str.len() > 0]
    out = []
    for (task, fraction), rows in found.groupby(["task", "fraction"], sort=True):
        names = dict.fromkeys(n.strip() for value in rows["classes_without_images"] for n in str(value).split(","))
        out.append((task, fraction, ", ".join(n for n in names if n)))
    return out


def markdown(table: pd.DataFrame, runs: pd.DataFrame, baseline: str = BASELINE, figure: str = FIGURE) -> list[str]:
    """The label-efficiency section of summary.md (no lines when no task ran several fractions)."""
    if table.empty or not has_fractions(runs):
        return []
    lines = ["## Label efficiency", "",
             f"Each task's headline metric against the share of training images with labels: the mean over "
             f"trials, its 95% interval and n, and against `{baseline}` at the same fraction (the same images) "
             f"the delta with its 95% interval and p-value (no test with fewer than {stats.MIN_TRIALS} trials on "
             f"either side). "
             f"Subset and schedule: {SUBSET_RULE}; iterations = what the runs trained. Figure: `{figure}`.", ""]
    for (task, schedule, backbone), rows in table.groupby(GROUP, sort=False):
        mode = "frozen backbone" if backbone == FROZEN else "fine-tuned backbone"
        lines += [f"`{task}` ({schedule}, {mode}), {rows['metric'].iloc[0]}:", "", _task_table(rows, baseline), ""]
    missing = classes_without_images(runs)
    if missing:
        lines += ["Classes a fraction left without any training image (the model saw no labelled example of them):", ""]
        lines += [f"- `{task}` at {percent(fraction)}: {names}" for task, fraction, names in missing]
        lines.append("")
    return lines


def plot(table: pd.DataFrame, path, baseline: str = BASELINE) -> None:
    """``label_efficiency.png`` (see the module docstring), written atomically."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    from transfer.fileio import atomic_write_bytes

    panels = list(dict.fromkeys(zip(table["task"], table["schedule"])))
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(max(7.0, 5.5 * len(panels)), 4.5), squeeze=False)
    weights = list(dict.fromkeys([baseline] + list(table["weights"])))
    colours = {w: f"C{i}" for i, w in enumerate(w for w in weights if w in set(table["weights"]))}
    for ax, (task, schedule) in zip(axes[0], panels):
        rows = table[(table["task"] == task) & (table["schedule"] == schedule)]
        for (w, backbone), line in rows.groupby(["weights", "backbone"], sort=False):
            line = line.sort_values("fraction")
            errors = [(line["mean"] - line["ci_low"]).fillna(0).clip(lower=0).to_numpy(),
                      (line["ci_high"] - line["mean"]).fillna(0).clip(lower=0).to_numpy()]
            ax.errorbar(line["fraction"].to_numpy(), line["mean"].to_numpy(), yerr=errors, color=colours[w], capsize=3,
                        marker="s" if backbone == FROZEN else "o", fillstyle="none" if backbone == FROZEN else "full",
                        linestyle="--" if backbone == FROZEN else "-",
                        label=f"{w}" + (" (frozen backbone)" if backbone == FROZEN else ""))
            for r in line.itertuples(index=False):
                if not (r.delta is None or math.isnan(r.delta)):
                    ax.annotate(f"{r.delta:+.1f}", (r.fraction, r.mean), textcoords="offset points", xytext=(6, 6),
                                fontsize=8, color=colours[w])
        fractions = sorted(rows["fraction"].unique())
        ax.set_xscale("log")
        ax.set_xticks(fractions)
        ax.set_xticklabels([percent(f) for f in fractions])
        ax.minorticks_off()
        ax.set_xlim(fractions[0] / 1.6, fractions[-1] * 1.6)  # room for the deltas written beside the points
        ax.margins(y=0.12)
        ax.set_xlabel("labelled training images (log scale)")
        ax.set_ylabel(rows["metric"].iloc[0])
        ax.set_title(f"{task}" + ("" if schedule == "full" else f" ({schedule} schedule)"))
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, title=f"numbers: delta vs {baseline}", title_fontsize=8)
    if not panels:
        axes[0][0].text(0.5, 0.5, "no results", ha="center", va="center")
        axes[0][0].set_axis_off()
    fig.suptitle("Label efficiency (error bars: 95% interval of the mean over trials)", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
