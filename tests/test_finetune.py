"""Fine-tuning runs on the demo data (CPU): every task's demo schedule, errors, custom datasets.

Weights: a random torchvision ResNet-50 in MoCo's layout, converted by our converter. Random
weights still learn the demo's shapes: the VOC and COCO runs must reach clearly non-zero AP.
"""
import json
import math
import pickle
import shutil
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from transfer import fileio, suite
from transfer import finetune as ft
from transfer.d2 import evaluation
from transfer.datasets import demo
from transfer.errors import UserError
from transfer.tasks import TASKS, get_task

pytestmark = pytest.mark.slow  # trains, evaluates or runs tools on generated data: not in `make test-fast`

SCHEMA = {"status", "error", "task", "schedule", "seed", "weights", "weights_sha256", "metrics", "all_metrics",
          "s_per_iter", "wall_time_s", "peak_memory_mb", "precision", "iterations", "num_gpus", "versions",
          "config", "dataset_split", "per_class", "no_predictions", "images_evaluated", "predicted_instances",
          "not_measured"}
# Tasks whose demo runs must show learning, and the headline metric that must show it
# (measured with make demo's weights: voc07 AP50 4-9, coco_fpn_1x APbb50 13-18; a custom COCO-json
# FPN run APbb50 18 after 40 iterations).
LEARNS = {"voc07+12": "AP50", "voc07": "AP50", "coco_c4_1x": "APbb50", "coco_fpn_1x": "APbb50"}
# A 2x task's demo is its 1x task's demo (the demo overlay sets the schedule): the suite trains it once.
SAME_DEMO = {"coco_c4_2x": "coco_c4_1x", "coco_fpn_2x": "coco_fpn_1x", "lvis_2x": "lvis_1x"}
DETECTION = sorted(name for name, task in TASKS.items() if task.config.startswith("configs/detection/"))
# LVIS v0.5 has no demo data: its tasks are checked by config only (tests/test_tasks.py).
DEMO_TASKS = [name for name in DETECTION if name not in SAME_DEMO and not TASKS[name].train[0].startswith("lvis_v0.5")]


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory):
    return demo.generate(tmp_path_factory.mktemp("demo_datasets"))


def read_record(folder):
    return json.loads((Path(folder) / "metrics.json").read_text())


@pytest.mark.parametrize("name", DEMO_TASKS)
def test_demo_schedule_trains_evaluates_and_records(name, moco_weights, demo_root, tmp_path):
    start = time.time()
    record = ft.finetune(name, moco_weights, "demo", 0, tmp_path, demo_root)
    seconds = time.time() - start
    assert record == read_record(tmp_path)
    assert SCHEMA <= set(record) and record["status"] == "ok" and record["error"] is None
    task = TASKS[name]
    assert set(record["metrics"]) == set(task.metrics)
    assert record["iterations"] == yaml.safe_load(record["config"])["SOLVER"]["MAX_ITER"]
    assert record["s_per_iter"] > 0 and record["precision"] == "fp32" and record["num_gpus"] == 1
    assert record["weights_sha256"] == fileio.sha256_of(moco_weights)
    assert record["all_metrics"] and set(record["versions"]) >= {"torch", "detectron2", "python"}
    headline_sections = {evaluation.HEADLINES[task.evaluator][m][0] for m in task.metrics}
    assert headline_sections <= set(record["per_class"]), record["per_class"].keys()
    assert record["per_class"] == evaluation.per_class(task.evaluator, record["all_metrics"])
    assert not list(tmp_path.glob("model_*.pth"))  # checkpoints removed after success
    if name in LEARNS:
        assert record["metrics"][LEARNS[name]] > 2.0, record["metrics"]
    print(f"\n{name}: {seconds:.0f} s, {record['metrics']}")


# One iteration, then a score threshold no detection reaches: the model predicts nothing.
PREDICTS_NOTHING = ["MODEL.ROI_HEADS.SCORE_THRESH_TEST", "1.01", "SOLVER.MAX_ITER", "1", "SOLVER.STEPS", "()",
                    "TEST.PRECISE_BN.ENABLED", "False"]


@pytest.mark.parametrize("name", ["voc07", "coco_fpn_1x", "lvis_1x", "cityscapes_inst"])
def test_a_run_that_predicts_nothing_records_ap_0_with_the_flag(name, moco_weights, demo_root, tmp_path):
    from detectron2.data import DatasetCatalog

    record = ft.finetune(name, moco_weights, "demo", 0, tmp_path, demo_root, opts=PREDICTS_NOTHING)
    assert record == read_record(tmp_path) and record["status"] == "ok" and record["iterations"] == 1
    images = len(DatasetCatalog.get(TASKS[name].test[0]))
    assert (record["no_predictions"], record["images_evaluated"], record["predicted_instances"]) == (True, images, 0)
    # 0 where the ground truth has instances; missing, with the reason, where it has none
    measured = {name: value for name, value in record["metrics"].items() if value is not None}
    assert measured and set(measured.values()) == {0.0}, record["metrics"]
    assert set(record["not_measured"]["metrics"]) == set(record["metrics"]) - set(measured)
    for section, classes in record["per_class"].items():
        assert {value for value in classes.values() if value is not None} == {0.0}, section
        absent = [c for c, value in classes.items() if value is None]
        why = record["not_measured"]["per_class"].get(section)
        assert why == ({evaluation.NO_GROUND_TRUTH: absent} if absent else None), section
    log = (tmp_path / "log.txt").read_text()
    assert f"no predictions: the model predicted no instance on the {images} test images" in log


def test_the_suite_runs_a_2x_demo_once_as_its_1x_demo(moco_weights, demo_root, tmp_path):
    weights = suite.prepare_weights(f"moco={moco_weights}", tmp_path)
    runs = suite.plan([weights], suite.resolve_tasks("all", "demo", demo_root), "demo", 2, tmp_path / "out")
    repeats = suite.repeated_runs(runs, datasets=demo_root)
    assert {(r.task, r.seed): (o.task, o.seed) for r, o in repeats.items()} == {
        (task, seed): (SAME_DEMO[task], seed) for task in SAME_DEMO for seed in (0, 1)}
    # Their full schedules differ (and so do a task's schedules).
    key = ft.experiment_key
    assert key("coco_fpn_2x", moco_weights, "full") != key("coco_fpn_1x", moco_weights, "full")
    assert key("coco_fpn_1x", moco_weights, "quick") != key("coco_fpn_1x", moco_weights, "full")


def test_wrong_num_classes_is_a_clear_error(moco_weights, demo_root, tmp_path):
    with pytest.raises(UserError, match=r"MODEL.ROI_HEADS.NUM_CLASSES 5: dataset voc_2007_trainval has 20 classes"):
        ft.finetune("voc07", moco_weights, "demo", 0, tmp_path, demo_root, opts=["MODEL.ROI_HEADS.NUM_CLASSES", "5"])
    record = read_record(tmp_path)
    assert record["status"] == "failed" and "NUM_CLASSES" in record["error"]


def test_missing_dataset_is_a_clear_error(moco_weights, tmp_path):
    root = tmp_path / "datasets"
    (root / "coco").mkdir(parents=True)
    with pytest.raises(UserError, match=r"coco/train2017: missing; expected"):
        ft.finetune("coco_c4_1x", moco_weights, "demo", 0, tmp_path / "run", root)
    assert read_record(tmp_path / "run")["status"] == "failed"


def test_nan_loss_stops_the_run_with_a_clear_message(moco_weights, demo_root, tmp_path):
    broken = tmp_path / "nan.pkl"
    data = pickle.loads(Path(moco_weights).read_bytes())
    data["model"]["stem.conv1.weight"] = np.full_like(data["model"]["stem.conv1.weight"], np.nan)
    broken.write_bytes(pickle.dumps(data))
    shutil.copy(Path(moco_weights).with_suffix(".yaml"), broken.with_suffix(".yaml"))
    with pytest.raises(ft.RunFailed, match="training diverged at iteration 0: the loss is NaN"):
        ft.finetune("voc07", broken, "demo", 0, tmp_path / "run", demo_root, opts=["SOLVER.MAX_ITER", "3"])
    record = read_record(tmp_path / "run")
    assert record["status"] == "failed" and "diverged" in record["error"] and record["metrics"] == {}


# ------------------------------------------------------------------------- custom datasets
def _coco_custom(demo_root, folder):
    """The demo's COCO val images as a user's COCO json: ids from 0, a background category,
    file names with a sub-folder."""
    source = json.loads((demo_root / "coco/annotations/instances_train2017.json").read_text())
    used = sorted({a["category_id"] for a in source["annotations"]})
    categories = [{"id": 0, "name": "_background_"}] + [
        {"id": i + 1, "name": next(c["name"] for c in source["categories"] if c["id"] == cid)}
        for i, cid in enumerate(used)]
    remap = {cid: i + 1 for i, cid in enumerate(used)}
    (folder / "images" / "pics").mkdir(parents=True)
    images = []
    for i, image in enumerate(source["images"]):
        shutil.copy(demo_root / "coco/train2017" / image["file_name"], folder / "images" / "pics" / image["file_name"])
        images.append({**image, "id": i, "file_name": f"pics/{image['file_name']}"})
    ids = {image["id"]: i for i, image in enumerate(source["images"])}
    annotations = [{**a, "id": k, "image_id": ids[a["image_id"]], "category_id": remap[a["category_id"]]}
                   for k, a in enumerate(source["annotations"])]
    coco = {"images": images, "annotations": annotations, "categories": categories}
    (folder / "train.json").write_text(json.dumps(coco))
    (folder / "shapes.yaml").write_text(yaml.safe_dump({
        "name": "shapes", "format": "coco", "model": "FPN", "masks": True, "classes": "from_annotations",
        "train": {"json": "train.json", "images": "images"}, "test": {"json": "train.json", "images": "images"},
        "schedule": "demo"}))
    return folder / "shapes.yaml"


def _voc_custom(demo_root, folder):
    """The demo's VOC2007 as a user's folder: float coordinates, empty <difficult/>, no ImageSets."""
    shutil.copytree(demo_root / "VOC2007" / "JPEGImages", folder / "voc" / "JPEGImages")
    (folder / "voc" / "Annotations").mkdir()
    for xml in sorted((demo_root / "VOC2007" / "Annotations").glob("*.xml")):
        tree = ET.parse(xml)
        for obj in tree.iter("object"):
            for tag in ("xmin", "ymin", "xmax", "ymax"):
                node = obj.find(f"bndbox/{tag}")
                node.text = f"{float(node.text) + 0.4:.1f}"
            difficult = obj.find("difficult")
            if difficult is not None:
                difficult.text = None
        tree.write(folder / "voc" / "Annotations" / xml.name)
    (folder / "boxes.yaml").write_text(yaml.safe_dump({
        "name": "boxes", "format": "voc", "model": "C4", "classes": "from_annotations",
        "train": {"root": "voc", "split": "trainval"}, "test": {"root": "voc", "split": "test"},
        "schedule": {"max_iter": 40, "steps": [30], "base_lr": 0.02, "ims_per_batch": 4}}))
    return folder / "boxes.yaml"


@pytest.mark.parametrize("make", [_coco_custom, _voc_custom], ids=["coco_json", "voc_folder"])
def test_custom_dataset_trains_and_evaluates(make, moco_weights, demo_root, tmp_path):
    spec = make(demo_root, tmp_path)
    task = get_task(str(spec))
    if make is _voc_custom:  # the YAML's own schedule is the task's default
        assert task.default_schedule == "custom"
        cfg = ft.resolve_config(task, moco_weights, "custom")
        solver = cfg.SOLVER
        assert (solver.MAX_ITER, solver.STEPS, solver.BASE_LR, solver.IMS_PER_BATCH) == (40, (30,), 0.02, 4)
        assert cfg.MODEL.ROI_HEADS.NAME == "Res5ROIHeadsExtraNorm" and cfg.MODEL.ROI_HEADS.NUM_CLASSES == 20
    # trained with the demo's sizes (the user's images here are demo images), 40 iterations
    record = ft.finetune(str(spec), moco_weights, "demo", 0, tmp_path / "run", demo_root,
                         opts=["SOLVER.MAX_ITER", "40", "SOLVER.STEPS", "(30,)"])
    assert record["status"] == "ok" and record["iterations"] == 40 and record["notes"]
    assert {"APbb", "APbb50"} <= set(record["metrics"])
    assert all(v is None or 0 <= v <= 100 for v in record["metrics"].values())
    assert ("APmk" in record["metrics"]) == (make is _coco_custom)


@pytest.mark.parametrize("name, heads", [("coco_fpn_1x", "SyncFreeStandardROIHeads"),
                                         ("coco_c4_1x", "SyncFreeRes5ROIHeadsExtraNorm")])
def test_mask_rcnn_trains_with_the_sync_free_rpn_and_roi_heads(name, heads, moco_weights, demo_root, tmp_path):
    opts = ["MODEL.PROPOSAL_GENERATOR.NAME", "SyncFreeRPN", "MODEL.ROI_HEADS.NAME", heads,
            "SOLVER.MAX_ITER", "5", "SOLVER.STEPS", "(4,)", "TEST.PRECISE_BN.ENABLED", "False",
            "DATALOADER.NUM_WORKERS", "2"]  # with workers, batches are drawn ahead in a thread (prefetch.py)
    record = ft.finetune(name, moco_weights, "demo", 0, tmp_path, demo_root, opts=opts)
    assert record["status"] == "ok" and record["iterations"] == 5
    assert not [t for t in threading.enumerate() if t.name == "prefetch"]  # stopped at the last iteration
    assert "SyncFreeRPN" in record["config"] and heads in record["config"]
    assert all(v is None or 0 <= v <= 100 for v in record["metrics"].values())
    # The losses and the heads' statistics, read back once per step, are logged as detectron2 logs them.
    log = (tmp_path / "train_log.json").read_text().splitlines()
    last = [json.loads(line) for line in log if "total_loss" in line][-1]
    assert last["iteration"] == 4 and math.isfinite(last["total_loss"]) and last["total_loss"] > 0
    assert {"loss_mask", "fast_rcnn/cls_accuracy", "fast_rcnn/fg_cls_accuracy", "mask_rcnn/accuracy",
            "mask_rcnn/false_negative", "roi_head/num_fg_samples", "data_time"} <= set(last)
    assert 0 <= last["fast_rcnn/cls_accuracy"] <= 1 and 0 <= last["mask_rcnn/accuracy"] <= 1


def test_two_cpu_processes_and_resume(moco_weights, demo_root, tmp_path):
    """--num-gpus 2 without GPUs: two gloo processes (naiveSyncBN); then a longer run resumes."""
    if torch.cuda.is_available():
        pytest.skip("the CPU multi-process path runs only without GPUs")
    opts = ["SOLVER.MAX_ITER", "4", "SOLVER.STEPS", "()", "SOLVER.CHECKPOINT_PERIOD", "2",
            "TEST.PRECISE_BN.ENABLED", "False"]
    record = ft.finetune("voc07", moco_weights, "demo", 0, tmp_path, demo_root, num_gpus=2, opts=opts,
                         keep_checkpoints=True)
    assert record["status"] == "ok" and record["num_gpus"] == 2 and record["iterations"] == 4
    assert (tmp_path / "model_final.pth").is_file()
    opts[1] = "6"  # same folder, longer schedule: continues from the checkpoint at iteration 4
    record = ft.finetune("voc07", moco_weights, "demo", 0, tmp_path, demo_root, opts=opts)
    assert record["status"] == "ok" and record["iterations"] == 6
    log = (tmp_path / "log.txt").read_text()
    assert "Starting training from iteration 4" in log


def test_a_disk_error_raised_in_a_spawned_training_process_is_recognised_like_one_raised_here(tmp_path):
    # Only the text of a spawned process's exception comes back (torch.multiprocessing's ProcessRaisedException).
    spawned = Exception("\n\n-- Process 1 terminated with the following error:\nTraceback (most recent call last):\n"
                        '  File "x.py", line 1, in <module>\n'
                        f"transfer.fileio.DiskError: {tmp_path}/model_final.pth: cannot write it: no space left "
                        "(3 MiB free)\n")
    disk = ft._disk_error(spawned, tmp_path)
    assert isinstance(disk, fileio.DiskError)
    assert str(disk) == f"{tmp_path}/model_final.pth: cannot write it: no space left (3 MiB free)"
    no_room = Exception("Traceback (most recent call last):\nOSError: [Errno 28] No space left on device: 'x'\n")
    assert str(ft._disk_error(no_room, tmp_path)).startswith(f"{tmp_path}: cannot write in it: no space left")
    other = Exception("Traceback (most recent call last):\nValueError: not a disk error\n")
    assert ft._disk_error(other, tmp_path) is None and ft._one_line(other) == "ValueError: not a disk error"
