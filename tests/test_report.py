"""Reports from hand-made metrics.json files: aggregation, missing metrics, failed runs, round trips."""
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from transfer import report

REPO = Path(__file__).resolve().parent.parent


def write_run(output, weights, task, seed, metrics=None, status="ok", error=None, schedule="demo", **fields):
    folder = Path(output) / weights / task / schedule / f"seed{seed}"
    folder.mkdir(parents=True)
    record = {"status": status, "error": error, "task": task, "schedule": schedule, "seed": seed,
              "weights": f"/w/{weights}.pkl", "weights_sha256": weights * 4, "metrics": metrics or {},
              "s_per_iter": 0.5, "wall_time_s": 12.0, "iterations": 20, "num_gpus": 1,
              "precision": "fp32", "peak_memory_mb": None,
              "versions": {"python": "3.11.9", "torch": "2.14.1", "detectron2": "0.6"}, **fields}
    (folder / "metrics.json").write_text(json.dumps(record))


def row(summary, weights, task, metric):
    match = summary[(summary["weights"] == weights) & (summary["task"] == task)
                    & (summary["metric"] == metric)]
    assert len(match) == 1, match
    return match.iloc[0]


@pytest.fixture
def suite_dir(tmp_path):
    sup = {"AP": [50.0, 52.0, 54.0], "AP50": [80.0, 81.0, 82.5], "AP75": [55.0, 56.0, 57.0]}
    moco = {"AP": [53.0, 55.5, 57.0], "AP50": [80.5, 82.0, 83.0], "AP75": [60.0, 61.0, 62.0]}
    for seed in range(3):
        write_run(tmp_path, "supervised", "voc07", seed, {k: v[seed] for k, v in sup.items()})
        metrics = {k: v[seed] for k, v in moco.items()}
        if seed == 1:
            del metrics["AP75"]  # this run did not report AP75
        write_run(tmp_path, "moco", "voc07", seed, metrics)
    # COCO: one moco trial failed after reporting numbers; the failed run must not be averaged.
    write_run(tmp_path, "supervised", "coco_fpn_1x", 0, {"APbb": 30.0, "APmk": 27.0})
    write_run(tmp_path, "supervised", "coco_fpn_1x", 1, {"APbb": 31.0, "APmk": 28.0})
    write_run(tmp_path, "moco", "coco_fpn_1x", 0, {"APbb": 32.0, "APmk": 29.0})
    write_run(tmp_path, "moco", "coco_fpn_1x", 1, {"APbb": 0.0, "APmk": 0.0}, status="failed",
              error="Traceback ...\nFloatingPointError: loss became NaN at iteration 7")
    # LVIS: every run of moco failed, and supervised has no APr on either trial.
    write_run(tmp_path, "supervised", "lvis_1x", 0, {"APmk": 20.0, "APr": None})
    write_run(tmp_path, "moco", "lvis_1x", 0, status="failed", error="CUDA out of memory")
    return tmp_path, sup, moco


def test_mean_std_n_and_delta_against_the_baseline(suite_dir):
    output, sup, moco = suite_dir
    summary = report.summarize(report.load_runs(output))
    for metric in ("AP", "AP50"):
        s, m = row(summary, "supervised", "voc07", metric), row(summary, "moco", "voc07", metric)
        assert s["n"] == m["n"] == 3 and s["failed"] == m["failed"] == 0
        assert s["mean"] == pytest.approx(np.mean(sup[metric]))
        assert s["std"] == pytest.approx(np.std(sup[metric], ddof=1))
        assert m["mean"] == pytest.approx(np.mean(moco[metric]))
        assert m["delta"] == pytest.approx(np.mean(moco[metric]) - np.mean(sup[metric]))
        assert math.isnan(s["delta"])  # the baseline has no delta against itself
    # The baseline's rows come first within each task.
    for _, rows in summary.groupby("task"):
        weights = rows["weights"].tolist()
        assert weights == sorted(weights, key=lambda w: w != "supervised")


def test_a_missing_metric_stays_missing(suite_dir):
    output, sup, moco = suite_dir
    runs = report.load_runs(output)
    summary = report.summarize(runs)
    ap75 = row(summary, "moco", "voc07", "AP75")
    assert ap75["n"] == 2 and ap75["mean"] == pytest.approx(np.mean([60.0, 62.0]))  # not /3, no zero
    assert ap75["delta"] == pytest.approx(61.0 - 56.0)
    # A metric with no value in any run is listed with n = 0 and no mean, delta or std.
    apr = row(summary, "supervised", "lvis_1x", "APr")
    assert apr["n"] == 0 and math.isnan(apr["mean"]) and math.isnan(apr["std"])
    assert runs[(runs["weights"] == "moco") & (runs["seed"] == 1) & (runs["task"] == "voc07")][
        "metric"].tolist() == ["AP", "AP50"]


def test_a_failed_run_is_reported_as_failed_not_averaged(suite_dir):
    output, _, _ = suite_dir
    runs = report.load_runs(output)
    summary = report.summarize(runs)
    bb = row(summary, "moco", "coco_fpn_1x", "APbb")
    assert bb["n"] == 1 and bb["failed"] == 1 and bb["mean"] == 32.0 and math.isnan(bb["std"])
    assert bb["delta"] == pytest.approx(32.0 - 30.5)
    # All of moco's LVIS runs failed: its rows say so and hold no numbers.
    lvis = summary[(summary["weights"] == "moco") & (summary["task"] == "lvis_1x")]
    assert (lvis["n"] == 0).all() and (lvis["failed"] == 1).all() and lvis["mean"].isna().all()
    failed = runs[runs["status"] == "failed"]
    assert failed["metric"].isna().all() and failed["value"].isna().all()
    md = report.to_markdown(summary, runs)
    assert "## Failed runs" in md
    assert "`moco/coco_fpn_1x/demo/seed1`: FloatingPointError: loss became NaN at iteration 7" in md
    assert "`moco/lvis_1x/demo/seed0`: CUDA out of memory" in md


def test_runs_without_predictions_are_averaged_with_their_ap_of_0_and_marked(tmp_path):
    aps = [40.0, 42.0, 44.0, 0.0, 0.0]  # trials 3 and 4: the model predicted nothing
    for seed, ap in enumerate(aps):
        write_run(tmp_path, "moco", "coco_fpn_1x", seed, {"APbb": ap, "APmk": ap},
                  no_predictions=seed >= 3, images_evaluated=24)
    for seed in range(2):  # records written before the field existed
        write_run(tmp_path, "supervised", "coco_fpn_1x", seed, {"APbb": 41.0, "APmk": 38.0})
    written = report.write_reports(tmp_path)

    summary = pd.read_csv(written.summary_csv)
    for metric in ("APbb", "APmk"):
        moco = row(summary, "moco", "coco_fpn_1x", metric)
        assert moco["n"] == 5 and moco["mean"] == pytest.approx(np.mean(aps))  # not the mean of the other 3
        assert moco["no_predictions"] == 2 and moco["failed"] == 0
        assert row(summary, "supervised", "coco_fpn_1x", metric)["no_predictions"] == 0
    runs = pd.read_csv(written.runs).drop_duplicates(["weights", "seed"]).set_index(["weights", "seed"])
    assert runs.loc["moco", "no_predictions"].tolist() == [False, False, False, True, True]
    assert runs.loc["supervised", "no_predictions"].isna().all()

    md = written.summary_md.read_text()
    table = report.read_markdown_table(md).set_index(["weights", "metric"])
    assert table.loc[("moco", "APbb"), "no predictions"] == 2 and table.loc[("moco", "APbb"), "mean"] == 25.2
    assert table.loc[("supervised", "APbb"), "no predictions"] == 0
    section = md[md.index("## Runs without predictions"):]
    assert [line for line in section.splitlines() if line.startswith("- ")] == [
        f"- `moco/coco_fpn_1x/demo/seed{seed}`: no predictions on 24 test images" for seed in (3, 4)]
    assert "## Failed runs" not in md


def test_csv_and_markdown_parse_back_to_the_same_numbers(suite_dir):
    output, _, _ = suite_dir
    written = report.write_reports(output)
    summary = report.summarize(report.load_runs(output), published=report.load_published())

    from_csv = pd.read_csv(written.summary_csv)
    pd.testing.assert_frame_equal(from_csv, summary, check_dtype=False)

    from_md = report.read_markdown_table(written.summary_md.read_text())
    assert list(from_md.columns[:4]) == ["weights", "task", "schedule", "metric"]
    assert from_md[["weights", "task", "metric"]].fillna("").values.tolist() == \
        summary[["weights", "task", "metric"]].fillna("").values.tolist()
    for ours, theirs in (("mean", "mean"), ("std", "std"), ("n", "n"), ("failed", "failed"),
                         ("delta", "delta vs supervised")):
        np.testing.assert_allclose(from_md[theirs].astype(float), summary[ours].astype(float).round(2),
                                   atol=1e-9, equal_nan=True)

    runs = pd.read_csv(written.runs)
    assert len(runs) == len(report.load_runs(output))
    value = runs[(runs["weights"] == "moco") & (runs["task"] == "voc07") & (runs["seed"] == 1)
                 & (runs["metric"] == "AP")]["value"]
    assert value.tolist() == [55.5]
    assert {"s_per_iter", "wall_time_s", "version_torch", "weights_sha256"} <= set(runs.columns)

    with Image.open(written.chart) as chart:
        assert chart.format == "PNG" and chart.width > 200


def test_published_numbers_follow_the_task_and_schedule(tmp_path):
    # The task registry says which published rows a task's full schedule corresponds to.
    write_run(tmp_path, "supervised", "voc07+12", 0, {"AP": 53.0, "AP50": 81.0}, schedule="full")
    write_run(tmp_path, "moco", "voc07+12", 0, {"AP": 56.0, "AP50": 82.0}, schedule="full")
    write_run(tmp_path, "moco", "voc07+12", 0, {"AP": 5.0, "AP50": 8.0}, schedule="demo")
    write_run(tmp_path, "moco", "my_shapes", 0, {"APbb": 5.0}, schedule="full")  # a custom task
    summary = report.summarize(report.load_runs(tmp_path), published=report.load_published())
    full = row(summary[summary["schedule"] == "full"], "moco", "voc07+12", "AP50")
    assert full["published: supervised IN-1M"] == 81.3 and full["published: MoCo v2 IN-1M 800ep"] == 82.5
    demo = row(summary[summary["schedule"] == "demo"], "moco", "voc07+12", "AP50")
    assert math.isnan(demo["published: supervised IN-1M"])  # demo data is not the paper's VOC
    custom = row(summary, "moco", "my_shapes", "APbb")
    assert custom[[c for c in summary.columns if c.startswith("published")]].isna().all()


def test_the_projects_copy_holds_every_reference_number_with_its_protocol_and_source():
    shared = REPO.parent / "shared" / "reference" / "published_results.csv"
    ours = report.load_published()
    assert {"task", "schedule", "pretrain", "protocol", "metric", "value", "source"} <= set(ours.columns)
    assert ours["protocol"].notna().all() and ours["source"].notna().all()
    assert not ours.duplicated(["task", "schedule", "pretrain", "protocol", "metric"]).any()
    if shared.is_file():  # only beside the shared reference folder: each of its rows, unchanged
        reference = pd.read_csv(shared)
        merged = reference.merge(ours, on=list(reference.columns), how="left", indicator=True)
        assert (merged["_merge"] == "both").all(), merged[merged["_merge"] != "both"]
    frozen = ours[ours["pretrain"].str.contains("frozen BN")]
    assert len(frozen) and (frozen["protocol"] == "frozen BN").all()


@pytest.mark.slow
def test_make_report_tool(suite_dir, tmp_path_factory):
    output, _, _ = suite_dir
    done = subprocess.run([sys.executable, str(REPO / "tools" / "make_report.py"), str(output)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "| moco" in done.stdout and (output / "summary.csv").is_file()
    empty = tmp_path_factory.mktemp("empty")
    done = subprocess.run([sys.executable, str(REPO / "tools" / "make_report.py"), str(empty)],
                          capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.startswith("error: ") and "metrics.json" in done.stderr


def test_intervals_and_tests_equal_scipys_on_the_same_numbers(suite_dir):
    from scipy import stats as scipy_stats

    output, sup, moco = suite_dir
    summary = report.summarize(report.load_runs(output))
    # The mean's interval: t distribution with n - 1 degrees of freedom.
    s = row(summary, "supervised", "voc07", "AP")
    low, high = scipy_stats.t.interval(0.95, 2, loc=np.mean(sup["AP"]), scale=scipy_stats.sem(sup["AP"]))
    assert (s["ci_low"], s["ci_high"]) == (pytest.approx(low), pytest.approx(high))
    # Both ran seeds 0, 1, 2: the paired test, its p-value and the delta's interval are scipy's.
    m = row(summary, "moco", "voc07", "AP")
    paired = scipy_stats.ttest_rel(moco["AP"], sup["AP"])
    assert m["test"] == "paired t-test" and m["p_value"] == pytest.approx(paired.pvalue)
    interval = paired.confidence_interval(0.95)
    assert (m["delta_ci_low"], m["delta_ci_high"]) == (pytest.approx(interval.low), pytest.approx(interval.high))
    assert m["significant"] == ("yes" if paired.pvalue < 0.05 else "no")
    # moco's AP75 has 2 trials: no test, never a p-value.
    ap75 = row(summary, "moco", "voc07", "AP75")
    assert ap75["test"] == "n < 3, no test" and math.isnan(ap75["p_value"]) and math.isnan(ap75["delta_ci_low"])
    assert ap75["delta"] == pytest.approx(61.0 - 56.0) and not isinstance(ap75["significant"], str)


def test_runs_of_different_seeds_are_compared_with_welchs_test(tmp_path):
    from scipy import stats as scipy_stats

    sup, moco = [40.0, 40.4, 39.8], [41.0, 40.6, 41.3, 40.9]
    for seed, value in enumerate(sup):
        write_run(tmp_path, "supervised", "coco_fpn_1x", seed, {"APbb": value})
    for seed, value in enumerate(moco, start=10):
        write_run(tmp_path, "moco", "coco_fpn_1x", seed, {"APbb": value})
    written = report.write_reports(tmp_path)
    m = row(pd.read_csv(written.summary_csv), "moco", "coco_fpn_1x", "APbb")
    welch = scipy_stats.ttest_ind(moco, sup, equal_var=False)
    assert m["test"] == "Welch t-test" and m["p_value"] == pytest.approx(welch.pvalue)
    assert m["delta_ci_low"] == pytest.approx(welch.confidence_interval(0.95).low)
    assert m["significant"] == "yes" and welch.pvalue < 0.05
    md = written.summary_md.read_text()
    assert "Welch t-test" in md and f"{welch.pvalue:.3f}" in md


def test_a_published_number_stands_only_beside_runs_of_its_dataset_version_and_protocol(tmp_path):
    published = report.load_published()
    for task in ("lvis_1x", "lvis_v0.5_2x", "lvis_v0.5_2x_frozenbn"):
        write_run(tmp_path, "supervised", task, 0, {"APmk": 20.0}, schedule="full")
    summary = report.summarize(report.load_runs(tmp_path), published=published)
    v1 = row(summary, "supervised", "lvis_1x", "APmk")  # LVIS v1: the paper's v0.5 numbers never show
    assert v1[[c for c in summary.columns if c.startswith("published")]].isna().all()
    tuned = row(summary, "supervised", "lvis_v0.5_2x", "APmk")
    assert tuned["published: supervised IN-1M (tuned BN)"] == 23.2 and tuned["published: MoCo v1 IN-1M 200ep"] == 24.1
    assert math.isnan(tuned["published: supervised IN-1M (frozen BN)"])
    frozen = row(summary, "supervised", "lvis_v0.5_2x_frozenbn", "APmk")
    assert frozen["published: supervised IN-1M (frozen BN)"] == 24.4
    assert math.isnan(frozen["published: MoCo v1 IN-1M 200ep"])
    md = report.to_markdown(summary, report.load_runs(tmp_path), published=published)
    assert "`lvis_1x`: no published number for Mask R-CNN R50-FPN, LVIS v1" in md


def test_a_run_that_fell_back_is_reported_under_the_task_that_ran(tmp_path):
    write_run(tmp_path, "supervised", "voc_sem", 0, {"mIoU": 40.0}, schedule="full")
    record = json.loads((tmp_path / "supervised/voc_sem/full/seed0/metrics.json").read_text())
    record["task_variant"] = "voc_sem_train"
    (tmp_path / "supervised/voc_sem/full/seed0/metrics.json").write_text(json.dumps(record))
    summary = report.summarize(report.load_runs(tmp_path), published=report.load_published())
    fallback = row(summary, "supervised", "voc_sem_train", "mIoU")
    assert fallback[[c for c in summary.columns if c.startswith("published")]].isna().all()
    assert "voc_sem" not in set(summary["task"])


def test_per_class_results_rank_the_largest_gains_and_losses(tmp_path):
    classes = {"supervised": {"cat": 50.0, "dog": 40.0, "car": 30.0}, "moco": {"cat": 55.0, "dog": 38.0, "car": 30.5}}
    for weights, values in classes.items():
        for seed in range(2):
            write_run(tmp_path, weights, "voc07", seed, {"AP": 40.0 + seed})
            path = tmp_path / weights / "voc07" / "demo" / f"seed{seed}" / "metrics.json"
            record = json.loads(path.read_text())
            record["per_class"] = {"bbox": {c: v + seed for c, v in values.items()}}
            path.write_text(json.dumps(record))
    written = report.write_reports(tmp_path)
    per_class = pd.read_csv(written.per_class)
    cat = per_class[(per_class["weights"] == "moco") & (per_class["class"] == "cat")].iloc[0]
    assert cat["mean"] == 55.5 and cat["n"] == 2 and cat["baseline_mean"] == 50.5 and cat["delta"] == 5.0
    assert per_class[per_class["weights"] == "supervised"]["delta"].isna().all()
    md = written.summary_md.read_text()
    assert "## Per-class results" in md
    assert "`moco` on `voc07` (demo, bbox): gains cat +5.0, car +0.5; losses dog -2.0" in md


def test_runs_csv_carries_provenance_and_marks_small_batches(tmp_path):
    for seed, small in ((0, False), (1, True)):
        write_run(tmp_path, "moco", "voc07", seed, {"AP": 40.0})
        path = tmp_path / "moco" / "voc07" / "demo" / f"seed{seed}" / "metrics.json"
        record = json.loads(path.read_text())
        record["provenance"] = {"ims_per_batch": 16 if not small else 4, "base_lr": 0.02, "max_iter": 24000,
                                "warmup_iters": 100, "bn_group_images": 16 if not small else 4,
                                "small_batch": small, "gpu_model": "cpu", "git_commit": "abc"}
        path.write_text(json.dumps(record))
    written = report.write_reports(tmp_path)
    runs = pd.read_csv(written.runs)
    assert runs.set_index("seed")["ims_per_batch"].to_dict() == {0: 16, 1: 4}
    assert (runs["gpu_model"] == "cpu").all() and (runs["git_commit"] == "abc").all()
    assert "Small batches: runs of `voc07` (demo) trained with fewer than 8 images per BN group" in \
        written.summary_md.read_text()


@pytest.mark.parametrize("content, why", [("[]", "a JSON list, not a mapping"),
                                          ('{"status": "ok"}', "says ok but holds no metrics"),
                                          ("{\"status\": \"ok\", \"metri", "not JSON")])
def test_a_metrics_file_that_cannot_stand_for_a_run_is_a_failed_run_never_a_trial(tmp_path, content, why):
    write_run(tmp_path, "moco", "voc07", 0, {"AP": 40.0})
    folder = tmp_path / "moco" / "voc07" / "demo" / "seed1"
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(content)
    runs = report.load_runs(tmp_path)
    bad = runs[runs["seed"] == 1].iloc[0]
    assert bad["status"] == "failed" and why in bad["error"]
    ap = row(report.summarize(runs), "moco", "voc07", "AP")
    assert ap["n"] == 1 and ap["failed"] == 1 and ap["mean"] == 40.0
