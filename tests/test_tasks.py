"""The task registry and config resolution (no training): protocol settings, scaling, norms."""
import csv
import logging
from pathlib import Path

import pytest
import torch

from transfer import finetune as ft
from transfer.d2 import evaluation
from transfer.d2.config import get_cfg, load_yaml
from transfer.errors import UserError
from transfer.tasks import QUICK_FRACTION, REPO, TASKS, get_task, installed


@pytest.fixture(scope="module")
def msra_weights(moco_weights, tmp_path_factory):
    """Weights with the overlay of detectron2's MSRA R-50.pkl (BGR, caffe pixels, FrozenBN)."""
    import yaml

    from transfer.convert import STYLES

    folder = tmp_path_factory.mktemp("msra")
    (folder / "R-50.pkl").write_bytes(Path(moco_weights).read_bytes())
    (folder / "R-50.yaml").write_text(yaml.safe_dump(STYLES["msra"]))
    return folder / "R-50.pkl"


def resolve(task="voc07+12", weights=None, schedule="full", **kw):
    return ft.resolve_config(get_task(task), weights, schedule, **kw)


def test_registry_has_the_papers_tasks():
    expected = {"voc07+12", "voc07", "coco_c4_1x", "coco_c4_2x", "coco_fpn_1x", "coco_fpn_2x", "coco_kp_2x",
                "lvis_1x", "lvis_2x", "cityscapes_inst"}
    assert expected <= set(TASKS)
    with pytest.raises(UserError, match="unknown task"):
        get_task("voc2077")


@pytest.mark.parametrize("name", sorted(TASKS))
def test_every_task_is_consistent(name, moco_weights):
    task = TASKS[name]
    if not installed(task):
        pytest.skip(f"{name} needs the DensePose project, not installed here (tests/test_densepose.py: its error line)")
    if task.config.startswith("configs/detection/"):  # each detection YAML reads alone, datasets too
        raw = ft.task_config(task)
        assert tuple(raw.DATASETS.TRAIN) == task.train and tuple(raw.DATASETS.TEST) == task.test
    assert task.evaluator in evaluation.EVALUATORS
    assert set(task.metrics) <= set(evaluation.HEADLINES[task.evaluator])
    for schedule in ("full", "quick", "demo"):
        cfg = resolve(name, moco_weights, schedule)
        assert cfg.TRANSFER.EVALUATOR == task.evaluator and cfg.MODEL.WEIGHTS == str(moco_weights)
        assert cfg.MODEL.BACKBONE.FREEZE_AT == (2 if task.protocol == "frozen BN" else 0)
        assert cfg.INPUT.FORMAT == "RGB"
    if task.reference:
        published = REPO / "results" / "published_results.csv"
        rows = [r for r in csv.DictReader(published.open())
                if (r["task"], r["schedule"], r["protocol"]) == (*task.reference, task.protocol)]
        assert rows and {r["metric"] for r in rows} <= set(task.metrics)


def test_voc_config_matches_the_official_moco_protocol(moco_weights):
    """shared/reference/protocols.md: the official C4 config with MoCo weights, key by key."""
    cfg = resolve("voc07+12", moco_weights)
    assert list(cfg.MODEL.PIXEL_MEAN) == pytest.approx([123.675, 116.280, 103.530])
    assert list(cfg.MODEL.PIXEL_STD) == pytest.approx([58.395, 57.120, 57.375])
    assert cfg.INPUT.FORMAT == "RGB" and cfg.MODEL.RESNETS.STRIDE_IN_1X1 is False
    assert cfg.MODEL.RESNETS.DEPTH == 50 and cfg.MODEL.RESNETS.NORM == "naiveSyncBN"
    assert cfg.MODEL.BACKBONE.FREEZE_AT == 0
    assert cfg.MODEL.ROI_HEADS.NAME == "Res5ROIHeadsExtraNorm" and cfg.MODEL.ROI_HEADS.NUM_CLASSES == 20
    assert cfg.MODEL.MASK_ON is False and cfg.MODEL.META_ARCHITECTURE == "GeneralizedRCNN"
    assert (cfg.MODEL.RPN.PRE_NMS_TOPK_TEST, cfg.MODEL.RPN.POST_NMS_TOPK_TEST) == (6000, 1000)
    assert cfg.TEST.PRECISE_BN.ENABLED is True
    assert (cfg.SOLVER.IMS_PER_BATCH, cfg.SOLVER.BASE_LR) == (16, 0.02)
    assert (cfg.SOLVER.STEPS, cfg.SOLVER.MAX_ITER, cfg.SOLVER.WARMUP_ITERS) == ((18000, 22000), 24000, 100)
    assert tuple(cfg.INPUT.MIN_SIZE_TRAIN) == tuple(range(480, 801, 32)) and cfg.INPUT.MIN_SIZE_TEST == 800
    assert cfg.DATASETS.TRAIN == ("voc_2007_trainval", "voc_2012_trainval") and cfg.DATASETS.TEST == ("voc_2007_test",)


def test_extra_norm_head_is_built(moco_weights):
    from detectron2.modeling import build_model

    cfg = resolve("voc07+12", moco_weights, "demo").clone()
    cfg.defrost()
    cfg.MODEL.WEIGHTS = ""
    model = build_model(cfg)
    res5 = model.roi_heads.res5
    assert isinstance(res5[-1], torch.nn.BatchNorm2d) and res5[-1].num_features == 2048
    assert len(res5) == 4  # three bottleneck blocks, then the norm


@pytest.fixture(scope="module")
def torchvision_weights(tmp_path_factory):
    """A plain torchvision ResNet-50 state dict (supervised style), converted by our converter."""
    import torchvision

    from transfer.convert import convert

    folder = tmp_path_factory.mktemp("torchvision")
    torch.save(torchvision.models.resnet50().state_dict(), folder / "resnet50.pth")
    return convert(folder / "resnet50.pth").weights_path


WEIGHTS_OWNED = {"MODEL.WEIGHTS", "MODEL.PIXEL_MEAN", "MODEL.PIXEL_STD", "INPUT.FORMAT",
                 "MODEL.RESNETS.STRIDE_IN_1X1"}


@pytest.mark.parametrize("task", ["voc07+12", "coco_c4_2x"])
def test_every_weights_file_fine_tunes_under_the_tasks_protocol(task, moco_weights, torchvision_weights,
                                                                msra_weights):
    """MSRA, torchvision and MoCo weights: the same config apart from how pixels are fed, and that
    config is the official moco/detection one (naiveSyncBN, FREEZE_AT 0, an extra trained norm)."""
    from detectron2.modeling import build_model

    from transfer.convert import flatten

    configs = {name: resolve(task, weights) for name, weights in
               (("msra", msra_weights), ("torchvision", torchvision_weights), ("moco", moco_weights))}
    flat = {name: {k: v for k, v in flatten(cfg).items() if k not in WEIGHTS_OWNED}
            for name, cfg in configs.items()}
    assert flat["msra"] == flat["torchvision"] == flat["moco"]
    assert configs["msra"].INPUT.FORMAT == "BGR" and configs["msra"].MODEL.RESNETS.STRIDE_IN_1X1 is True
    assert configs["moco"].INPUT.FORMAT == configs["torchvision"].INPUT.FORMAT == "RGB"
    for cfg in configs.values():  # the official Base-RCNN-C4-BN.yaml's protocol keys
        assert cfg.MODEL.RESNETS.NORM == "naiveSyncBN" and cfg.MODEL.BACKBONE.FREEZE_AT == 0
        assert cfg.MODEL.ROI_HEADS.NAME == "Res5ROIHeadsExtraNorm" and cfg.TEST.PRECISE_BN.ENABLED
        assert (cfg.SOLVER.IMS_PER_BATCH, cfg.SOLVER.BASE_LR) == (16, 0.02)
    # The extra norm after res5 is a trained BN, never an identity FrozenBatchNorm, for MSRA weights too.
    cfg = configs["msra"].clone()
    cfg.defrost()
    cfg.MODEL.WEIGHTS = ""
    model = build_model(cfg)
    extra = model.roi_heads.res5[-1]
    assert isinstance(extra, torch.nn.BatchNorm2d) and extra.weight.requires_grad
    assert all(p.requires_grad for p in model.backbone.parameters())  # FREEZE_AT 0: nothing frozen


def test_a_frozen_bn_protocol_is_an_explicit_task_variant(moco_weights, msra_weights):
    frozen = [resolve("lvis_v0.5_2x_frozenbn", w) for w in (moco_weights, msra_weights)]
    for cfg in frozen:
        assert cfg.MODEL.RESNETS.NORM == "FrozenBN" and cfg.MODEL.BACKBONE.FREEZE_AT == 2
    tuned = resolve("lvis_v0.5_2x", msra_weights)
    assert tuned.MODEL.RESNETS.NORM == "BN" and tuned.MODEL.BACKBONE.FREEZE_AT == 0  # SyncBN on one process
    assert get_task("lvis_v0.5_2x_frozenbn").protocol != get_task("lvis_v0.5_2x").protocol


def test_fpn_tasks_train_norm_in_backbone_and_fpn(moco_weights, caplog, monkeypatch):
    raw = load_yaml(get_task("coco_fpn_1x").config_path)
    assert raw["MODEL"]["RESNETS"]["NORM"] == "SyncBN" and raw["MODEL"]["FPN"]["NORM"] == "SyncBN"
    from transfer import errors

    monkeypatch.setattr(errors, "_SAID", set())  # a process says each warning once; earlier tests said it
    with caplog.at_level(logging.WARNING, logger="transfer.finetune"):
        cfg = resolve("coco_kp_2x", moco_weights)
    # one process: SyncBN has no process group, BN computes the same
    assert cfg.MODEL.RESNETS.NORM == "BN" and cfg.MODEL.FPN.NORM == "BN"
    assert "MODEL.FPN.NORM: SyncBN needs a process group" in caplog.text and "using BN" in caplog.text
    assert cfg.MODEL.KEYPOINT_ON and cfg.MODEL.ROI_KEYPOINT_HEAD.NUM_KEYPOINTS == 17
    assert (cfg.SOLVER.STEPS, cfg.SOLVER.MAX_ITER) == ((120000, 160000), 180000)


def test_quick_schedule_is_a_fraction_of_full(moco_weights):
    full, quick = resolve("coco_c4_2x", moco_weights), resolve("coco_c4_2x", moco_weights, "quick")
    assert quick.SOLVER.MAX_ITER == round(full.SOLVER.MAX_ITER * QUICK_FRACTION)
    assert quick.SOLVER.STEPS == tuple(round(s * QUICK_FRACTION) for s in full.SOLVER.STEPS)
    assert quick.SOLVER.BASE_LR == full.SOLVER.BASE_LR and quick.SOLVER.IMS_PER_BATCH == 16


def test_gpu_scaling_follows_kaiming_hes_rule(moco_weights):
    kept = get_cfg()
    kept.SOLVER.IMS_PER_BATCH, kept.SOLVER.BASE_LR = 16, 0.02
    kept.SOLVER.STEPS, kept.SOLVER.MAX_ITER = (18000, 22000), 24000
    kept.SOLVER.WARMUP_ITERS, kept.MODEL.RESNETS.NORM = 100, "naiveSyncBN"
    scaled, small = kept.clone(), kept.clone()
    assert ft.scale_for_gpus(kept, 4, None) == 1  # memory allows: batch 16 over 4 GPUs, unchanged
    assert (kept.SOLVER.IMS_PER_BATCH, kept.SOLVER.BASE_LR, kept.SOLVER.MAX_ITER) == (16, 0.02, 24000)
    assert ft.scale_for_gpus(scaled, 1, 8) == 2  # one GPU holding 8 images: batch 8, LR 0.01, 2x schedule
    assert (scaled.SOLVER.IMS_PER_BATCH, scaled.SOLVER.BASE_LR) == (8, 0.01)
    assert (scaled.SOLVER.STEPS, scaled.SOLVER.MAX_ITER, scaled.SOLVER.WARMUP_ITERS) == ((36000, 44000), 48000, 200)
    with pytest.raises(UserError, match="--num-gpus 3"):
        ft.scale_for_gpus(get_cfg(), 3, None)
    # Below 8 images per BN group only when asked for; then every halving scales LR and schedule.
    with pytest.raises(UserError, match=r"batch 2, 2 images per BN group .*--allow-small-batch"):
        ft.scale_for_gpus(small.clone(), 1, 2)
    assert ft.scale_for_gpus(small, 1, 2, allow_small_batch=True) == 8
    assert (small.SOLVER.IMS_PER_BATCH, small.SOLVER.BASE_LR, small.SOLVER.WARMUP_ITERS) == (2, 0.0025, 800)
    assert ft.bn_group_images(small, 1) == 2


def test_images_per_bn_group_follow_the_norm_kind():
    cfg = get_cfg()
    cfg.SOLVER.IMS_PER_BATCH = 16
    cfg.MODEL.RESNETS.NORM, cfg.MODEL.FPN.NORM = "FrozenBN", ""
    assert ft.bn_group_images(cfg, 8) is None  # no batch statistics anywhere
    cfg.MODEL.FPN.NORM = "SyncBN"
    assert ft.bn_group_images(cfg, 8) == 16  # synced over all GPUs
    cfg.MODEL.RESNETS.NORM = "BN"
    assert ft.bn_group_images(cfg, 8) == 2 and ft.bn_group_images(cfg, 1) == 16  # BN: one process's images


def test_a_run_records_what_it_really_trained_with(moco_weights):
    cfg = resolve("voc07+12", moco_weights, max_ims_per_gpu=8)
    record = ft.provenance(cfg, get_task("voc07+12"), 1)
    assert record["ims_per_batch"] == 8 and record["base_lr"] == 0.01 and record["warmup_iters"] == 200
    assert record["max_iter"] == 48000 and record["steps"] == [36000, 44000]
    assert record["protocol"] == "fine-tune" and record["norm"] == "naiveSyncBN" and record["freeze_at"] == 0
    assert record["bn_group_images"] == 8 and record["small_batch"] is False
    assert record["gpu_model"] == (torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu")
    assert isinstance(record["detectron2_compiled"], bool)
    assert record["git_commit"] is None or len(record["git_commit"].removesuffix("-dirty")) == 40


def test_user_opts_come_last_and_bad_ones_are_clear(moco_weights):
    cfg = resolve("voc07", moco_weights, "demo", opts=["SOLVER.BASE_LR", "0.005", "SEED", "3"])
    assert cfg.SOLVER.BASE_LR == 0.005
    with pytest.raises(UserError, match="opts"):
        resolve("voc07", moco_weights, "demo", opts=["SOLVER.NO_SUCH_KEY", "1"])
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="--amp"):
            resolve("voc07", moco_weights, "demo", amp=True)


def test_headline_metrics_map_each_evaluator():
    lvis = {"segm": {"AP": 20.0, "APr": -100.0, "APc": 10.0, "APf": float("nan")}, "bbox": {"AP": 22.0}}
    assert evaluation.headline_metrics("lvis", lvis, ("APmk", "APr", "APc", "APf", "APbb")) == {
        "APmk": 20.0, "APr": None, "APc": 10.0, "APf": None, "APbb": 22.0}
    voc = {"bbox": {"AP": 50.0, "AP50": 80.0, "AP75": 55.0}}
    assert evaluation.headline_metrics("voc", voc, ("AP", "AP50", "AP75")) == {"AP": 50.0, "AP50": 80.0, "AP75": 55.0}
    with pytest.raises(KeyError):
        evaluation.headline_metrics("voc", voc, ("mIoU",))
    assert evaluation.json_safe({"a": float("nan"), "b": [torch.tensor(1.5)]}) == {"a": None, "b": [1.5]}
