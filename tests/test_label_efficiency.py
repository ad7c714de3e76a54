"""The label-efficiency table, section and figure, from runs with known values."""
import math

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy import stats as scipy_stats

from transfer import label_efficiency as le
from transfer import report, runs

# voc07 AP per (weights, fraction, backbone): three trials each (seeds 0, 1, 2)
VALUES = {
    ("supervised", 0.1, "finetune"): [20.0, 22.0, 21.0],
    ("moco", 0.1, "finetune"): [25.0, 26.5, 24.5],
    ("supervised", 1.0, "finetune"): [50.0, 52.0, 54.0],
    ("moco", 1.0, "finetune"): [53.0, 55.5, 57.0],
    ("supervised", 1.0, "frozen"): [30.0, 31.0, 32.0],
    ("moco", 1.0, "frozen"): [28.0, 29.0, 30.5],
}


def write_runs(output):
    """One hand-made metrics.json per (weights, fraction, backbone, seed), in the run folders
    transfer/runs.py names."""
    for (weights, fraction, backbone), values in VALUES.items():
        for seed, value in enumerate(values):
            key = runs.RunKey(weights, "voc07", "full", seed, fraction, backbone)
            record = {"status": "ok", "error": None, "task": "voc07", "schedule": "full", "fraction": fraction,
                      "backbone": backbone, "seed": seed, "weights": f"/w/{weights}.pkl", "weights_sha256": weights * 4,
                      "metrics": {"AP": value, "AP50": value + 30},
                      "provenance": {"max_iter": 9000 if fraction == 1 else 900, "protocol": "fine-tune"}}
            if fraction < 1:
                subset = {"kept": 501, "classes_without_images": ["cow", "sheep"]}
                record["label_subset"] = {"voc_2007_trainval@0.1": subset}
            runs.write_record(key.dir(output), record)
    return output


def runs_table(tmp_path):
    return report.load_runs(write_runs(tmp_path))


def test_the_table_has_each_fractions_mean_interval_and_paired_delta(tmp_path):
    table = le.efficiency_table(runs_table(tmp_path))
    assert set(table["metric"]) == {"AP"}  # voc07's first headline metric
    for (weights, fraction, backbone), values in VALUES.items():
        row = table[(table["weights"] == weights) & (table["fraction"] == fraction) & (table["backbone"] == backbone)]
        assert len(row) == 1
        row = row.iloc[0]
        assert row["mean"] == pytest.approx(np.mean(values)) and row["n"] == 3
        low, high = scipy_stats.t.interval(0.95, 2, loc=np.mean(values), scale=scipy_stats.sem(values))
        assert (row["ci_low"], row["ci_high"]) == (pytest.approx(low), pytest.approx(high))
        assert row["iterations"] == (9000 if fraction == 1 else 900)
        if weights == "supervised":
            assert math.isnan(row["delta"])
            continue
        base = VALUES[("supervised", fraction, backbone)]
        paired = scipy_stats.ttest_rel(values, base)
        assert row["delta"] == pytest.approx(np.mean(values) - np.mean(base))
        assert row["p_value"] == pytest.approx(paired.pvalue) and row["test"] == "paired t-test"
        interval = paired.confidence_interval(0.95)
        assert row["delta_ci_low"] == pytest.approx(interval.low)
        assert row["delta_ci_high"] == pytest.approx(interval.high)


def test_runs_without_a_regime_are_the_papers_regime(tmp_path):
    table = runs_table(tmp_path).drop(columns=["fraction", "backbone"])
    table = table[table["seed"] == 0].drop_duplicates(["weights", "seed", "metric"])
    efficiency = le.efficiency_table(table)
    assert set(efficiency["fraction"]) == {1.0} and set(efficiency["backbone"]) == {"finetune"}
    assert not le.has_fractions(table) and le.markdown(efficiency, table) == []
    assert (efficiency["test"].dropna() == "n < 3, no test").all()


def test_the_report_has_the_regime_columns_the_section_and_the_figure(tmp_path):
    written = report.write_reports(write_runs(tmp_path))
    table = pd.read_csv(written.runs)
    assert {"fraction", "backbone", "images_kept", "classes_without_images"} <= set(table.columns)
    assert set(zip(table["fraction"], table["backbone"])) == {key[1:] for key in VALUES}
    summary = pd.read_csv(written.summary_csv)
    frozen = summary[(summary["weights"] == "moco") & (summary["backbone"] == "frozen") & (summary["metric"] == "AP")]
    assert len(frozen) == 1 and frozen["delta"].iloc[0] == pytest.approx(
        np.mean(VALUES[("moco", 1.0, "frozen")]) - np.mean(VALUES[("supervised", 1.0, "frozen")]))
    lines = written.summary_md.read_text()
    assert "## Label efficiency" in lines and "label_efficiency.png" in lines
    assert "`voc07` (full, fine-tuned backbone), AP:" in lines and "`voc07` (full, frozen backbone), AP:" in lines
    delta = np.mean(VALUES[("moco", 0.1, "finetune")]) - np.mean(VALUES[("supervised", 0.1, "finetune")])
    section = lines[lines.index("## Label efficiency"):]
    ten = next(line for line in section.splitlines() if line.startswith("| 10%"))
    assert "| 900 " in ten and f"| {delta:+.2f} [" in ten
    assert "- `voc07` at 10%: cow, sheep" in lines
    # a published number stands only beside the paper's regime
    published = [c for c in summary.columns if c.startswith("published")]
    regimes_shown = summary.dropna(subset=published, how="all")[["fraction", "backbone"]].drop_duplicates()
    assert published and regimes_shown.values.tolist() == [[1.0, "finetune"]]
    assert written.label_efficiency == tmp_path / le.FIGURE
    with Image.open(written.label_efficiency) as image:
        assert image.format == "PNG" and image.size[0] >= 600
