"""Transfer regimes: the labelled subset, the schedule that shrinks with it, the frozen backbone."""
import json
from pathlib import Path

import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog

from transfer import finetune as ft
from transfer import regimes
from transfer.d2.config import get_cfg
from transfer.datasets import catalog, demo
from transfer.errors import UserError
from transfer.tasks import get_task

pytestmark = pytest.mark.slow  # trains, evaluates or runs tools on generated data: not in `make test-fast`

VOC = "voc_2007_trainval"


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    root = demo.generate(tmp_path_factory.mktemp("demo_datasets"))
    catalog.register_all(root)
    return root


def test_a_subset_is_a_function_of_dataset_fraction_and_subset_seed_and_is_nested():
    ids = [f"{i:06d}" for i in range(1000)]
    one, ten, all_ = (regimes.kept_ids(VOC, ids, f) for f in (0.01, 0.1, 1.0))
    assert (len(one), len(ten), len(all_)) == (10, 100, 1000) and set(all_) == set(ids)
    assert set(one) < set(ten) < set(all_) and ten[:10] == one  # nested: the 1% are the first of the 10%
    # the order the ids come in does not matter; the subset seed and the dataset do
    assert regimes.kept_ids(VOC, reversed(ids), 0.1) == ten
    assert set(regimes.kept_ids(VOC, ids, 0.1, seed=1)) != set(ten)
    assert set(regimes.kept_ids("voc_2012_trainval", ids, 0.1)) != set(ten)
    # not the first ids in file order: a random-looking draw
    assert ten != sorted(ten) or ten[0] != ids[0]
    assert regimes.kept_count(80, 0.1) == 8 and regimes.kept_count(7, 0.01) == 1  # ceil, at least one image


def test_a_subset_is_registered_as_a_dataset_of_its_own_with_its_base_metadata(demo_root):
    name = regimes.subset_name(VOC, 0.1)
    assert name == "voc_2007_trainval@0.1" and regimes.parse_subset_name(name) == (VOC, 0.1, 0)
    assert regimes.parse_subset_name(regimes.subset_name(VOC, 0.25, 3)) == (VOC, 0.25, 3)
    assert regimes.parse_subset_name(VOC) is None
    assert regimes.register_subsets([name, "voc_2007_test"]) == [name]
    full, subset = DatasetCatalog.get(VOC), DatasetCatalog.get(name)
    assert len(full) == 80 and len(subset) == 8
    kept = set(regimes.kept_ids(VOC, [r["image_id"] for r in full], 0.1))
    assert [r["image_id"] for r in subset] == [r["image_id"] for r in full if r["image_id"] in kept]
    assert MetadataCatalog.get(name).thing_classes == MetadataCatalog.get(VOC).thing_classes
    with pytest.raises(UserError, match="voc_2099_trainval@0.1: a subset of voc_2099_trainval, which is not a"):
        regimes.register_subsets(["voc_2099_trainval@0.1"])


def test_the_kept_ids_and_the_classes_left_without_images_are_written_to_the_run_folder(demo_root, tmp_path):
    names = [regimes.subset_name(VOC, 0.1), regimes.subset_name("coco_2017_train", 0.1), "voc_2007_test"]
    regimes.register_subsets(names)
    summary = regimes.write_subsets(names, tmp_path)
    on_disk = json.loads((tmp_path / regimes.SUBSET_FILE).read_text())
    assert set(summary) == set(on_disk) == set(names[:2])
    voc = on_disk[names[0]]
    assert voc["kept_ids"] == [r["image_id"] for r in DatasetCatalog.get(names[0])]
    assert (voc["images"], voc["kept"], voc["fraction"], voc["subset_seed"]) == (80, 8, 0.1, 0)
    # 8 of 80 images cannot hold all 20 VOC classes: the ones they miss are named, and only those
    per_class = voc["images_per_class"]
    missing = [c for c, n in per_class.items() if n["kept"] == 0 and n["images"] > 0]
    assert missing and voc["classes_without_images"] == missing == summary[names[0]]["classes_without_images"]
    kept_classes = {MetadataCatalog.get(VOC).thing_classes[a["category_id"]]
                    for r in DatasetCatalog.get(names[0]) for a in r["annotations"]}
    assert kept_classes.isdisjoint(missing)
    assert kept_classes | set(missing) == {c for c, n in per_class.items() if n["images"]}
    assert "kept_ids" not in summary[names[0]]  # metrics.json keeps the sizes and the missing classes only


def test_the_schedule_shrinks_with_the_labels_down_to_a_floor():
    def scaled(fraction, **solver):
        cfg = get_cfg()
        cfg.SOLVER.MAX_ITER, cfg.SOLVER.STEPS, cfg.SOLVER.WARMUP_ITERS = 9000, (6750, 8250), 100
        cfg.TEST.EVAL_PERIOD = 3000
        regimes.apply_label_fraction(cfg, fraction)
        return cfg

    half = scaled(0.5)
    assert (half.SOLVER.MAX_ITER, half.SOLVER.STEPS, half.SOLVER.WARMUP_ITERS) == (4500, (3375, 4125), 100)
    assert half.TEST.EVAL_PERIOD == 1500 and half.TRANSFER.LABELS.SCHEDULE == 0.5
    assert half.DATASETS.TRAIN == tuple(regimes.subset_name(n, 0.5) for n in get_cfg().DATASETS.TRAIN)
    tiny = scaled(0.01)  # 90 iterations would be too few: the floor keeps a tenth of the schedule
    assert (tiny.SOLVER.MAX_ITER, tiny.SOLVER.STEPS, tiny.SOLVER.WARMUP_ITERS) == (900, (675, 825), 90)
    assert tiny.TRANSFER.LABELS.SCHEDULE == regimes.MIN_SCHEDULE == tiny.TRANSFER.LABELS.MIN_SCHEDULE
    full = scaled(1.0)
    assert (full.SOLVER.MAX_ITER, full.SOLVER.STEPS, full.TRANSFER.LABELS.SCHEDULE) == (9000, (6750, 8250), 1.0)
    with pytest.raises(ValueError, match="scaled already"):
        regimes.scale_schedule(half)


@pytest.mark.parametrize("task", ["voc07", "coco_fpn_1x", "cityscapes_sem"])
def test_the_frozen_backbone_freezes_every_backbone_parameter_and_nothing_else(task, moco_weights):
    from detectron2.layers import FrozenBatchNorm2d
    from detectron2.modeling import build_model

    from transfer.convert import flatten

    tuned, frozen = (ft.resolve_config(get_task(task), moco_weights, "demo", backbone=b).clone()
                     for b in ("finetune", "frozen"))
    for cfg in (tuned, frozen):
        cfg.defrost()
        cfg.MODEL.WEIGHTS = ""
    assert frozen.MODEL.BACKBONE.FREEZE_AT == 5 and frozen.TRANSFER.BACKBONE == "frozen"
    model = build_model(frozen)
    backbone = model.backbone.bottom_up if hasattr(model.backbone, "bottom_up") else model.backbone
    assert not any(p.requires_grad for p in backbone.parameters())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in backbone.modules())
    assert any(isinstance(m, FrozenBatchNorm2d) for m in backbone.modules())
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    everything = {n for n, _ in build_model(tuned).named_parameters()}
    backbone_names = ("backbone.bottom_up.", "backbone.stem", "backbone.res")
    assert trained == {n for n in everything if not n.startswith(backbone_names)}
    if task == "voc07":  # C4: res5 is the box head's, trained with the task's norm
        assert frozen.MODEL.RESNETS.NORM == tuned.MODEL.RESNETS.NORM
        assert any(n.startswith("roi_heads.res5") for n in trained)
    else:
        assert frozen.MODEL.RESNETS.NORM == "FrozenBN"
    # Everything else is the task's.
    differ = {k for k, v in flatten(frozen).items() if flatten(tuned).get(k) != v}
    assert differ <= {"MODEL.BACKBONE.FREEZE_AT", "MODEL.RESNETS.NORM", "TRANSFER.BACKBONE"}


def test_the_subset_is_the_same_for_every_weights_file_and_trial(moco_weights, demo_root, tmp_path):
    """What a run trains on, resolved as tools/finetune.py resolves it, for two weights files and two seeds."""
    import shutil

    other = tmp_path / "other.pkl"
    shutil.copy(moco_weights, other)
    shutil.copy(Path(moco_weights).with_suffix(".yaml"), other.with_suffix(".yaml"))
    written = []
    for weights in (moco_weights, other):
        for seed in (0, 1):
            cfg = ft.resolve_config(get_task("voc07"), weights, "demo", seed, fraction=0.1)
            assert cfg.DATASETS.TRAIN == ("voc_2007_trainval@0.1",) and cfg.SEED == seed
            folder = tmp_path / f"{Path(weights).stem}-seed{seed}"
            regimes.register_subsets(cfg.DATASETS.TRAIN)
            regimes.write_subsets(cfg.DATASETS.TRAIN, folder)
            written.append(json.loads((folder / regimes.SUBSET_FILE).read_text()))
    assert all(w == written[0] for w in written) and len(written[0]["voc_2007_trainval@0.1"]["kept_ids"]) == 8


def test_a_regime_is_part_of_a_runs_identity_and_the_papers_runs_keep_their_folders(tmp_path):
    from transfer import runs, suite

    weights = [runs.Weights(label, tmp_path / f"{label}.pkl", label[0] * 64) for label in ("supervised", "moco")]
    plan = suite.plan(weights, ["voc07"], "demo", 2, tmp_path, fractions=(0.1, 1.0), backbones=("finetune", "frozen"))
    assert len(plan) == 2 * 2 * 2 * 2 and len({r.dir for r in plan}) == len(plan)
    folders = {r.dir.relative_to(tmp_path).as_posix() for r in plan if r.weights.label == "moco" and r.seed == 1}
    assert folders == {"moco/voc07/demo/seed1", "moco/voc07/demo@labels0.1/seed1", "moco/voc07/demo@frozen/seed1",
                       "moco/voc07/demo@labels0.1-frozen/seed1"}
    for run in plan:
        assert runs.RunKey.of_dir(tmp_path, run.dir) == run.key
        command = suite.finetune_command(run, 1)
        regime = [] if (run.fraction, run.backbone) == (1.0, "finetune") else \
            ["--fraction", repr(run.fraction), "--backbone", run.backbone]
        assert command[command.index("--num-gpus") + 2:] == regime
    # the paper's regime: the folder every run had before regimes existed
    old = suite.plan(weights, ["voc07"], "demo", 1, tmp_path)
    assert [r.dir for r in old] == [tmp_path / w.label / "voc07" / "demo" / "seed0" for w in weights]
    assert runs.RunKey.of_dir(tmp_path, tmp_path / "moco" / "voc07" / "demo@warm" / "seed0") is None


def test_a_frozen_demo_run_changes_the_heads_and_not_the_backbone_and_keeps_its_subset(moco_weights, demo_root,
                                                                                     tmp_path):
    """A real demo run of voc07 on 10% of its images with the backbone frozen (8 iterations)."""
    import yaml
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.config import CfgNode
    from detectron2.modeling import build_model

    record = ft.finetune("voc07", moco_weights, "demo", 0, tmp_path, demo_root, fraction=0.1, backbone="frozen",
                         keep_checkpoints=True)
    assert record["status"] == "ok" and (record["fraction"], record["backbone"]) == (0.1, "frozen")
    assert record["iterations"] == 8 and record["provenance"]["schedule_factor"] == 0.1  # 80 x 0.1
    assert record["provenance"]["protocol"] == "frozen backbone, 10% labels (subset seed 0)"
    subset = json.loads((tmp_path / regimes.SUBSET_FILE).read_text())["voc_2007_trainval@0.1"]
    ids = [r["image_id"] for r in DatasetCatalog.get(VOC)]
    assert sorted(subset["kept_ids"]) == sorted(regimes.kept_ids(VOC, ids, 0.1))
    missing = record["label_subset"]["voc_2007_trainval@0.1"]["classes_without_images"]
    assert missing and missing == subset["classes_without_images"]  # 8 of 80 images miss some of the 20 classes
    assert f"has no training image of {', '.join(missing)}" in (tmp_path / "log.txt").read_text()

    cfg = CfgNode(yaml.safe_load(record["config"]))
    model = build_model(cfg)
    DetectionCheckpointer(model).load(str(moco_weights))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    after = torch.load(tmp_path / "model_final.pth", map_location="cpu", weights_only=False)["model"]
    backbone = [k for k in before if k.startswith("backbone.")]
    heads = [k for k, p in model.named_parameters() if p.requires_grad]
    assert backbone and all(torch.equal(before[k], after[k]) for k in backbone)  # weights and BN statistics
    changed = [k for k in heads if not torch.equal(before[k], after[k])]
    assert heads and len(changed) > 0.9 * len(heads), sorted(set(heads) - set(changed))
    assert any(k.startswith("roi_heads.res5") for k in changed)
    assert any(k.startswith("roi_heads.box_predictor") for k in changed)


def test_regimes_on_the_command_line_and_in_names():
    assert regimes.parse_fractions("0.01, 0.1,1,0.1") == (0.01, 0.1, 1.0)
    assert regimes.parse_backbones("finetune,frozen") == ("finetune", "frozen")
    bad_fractions = (("0", "0 is not a fraction"), ("1.5", "1.5 is not a fraction"), ("ten", "'ten' is not a number"))
    for bad, match in bad_fractions:
        with pytest.raises(UserError, match=match) as error:
            regimes.parse_fractions(bad)
        assert "\n" not in str(error.value)
    with pytest.raises(UserError, match="'thawed' is not one of finetune, frozen"):
        regimes.parse_backbones("thawed")
    for fraction, backbone, label in ((1.0, "finetune", None), (0.1, "finetune", "labels0.1"),
                                      (1.0, "frozen", "frozen"), (0.01, "frozen", "labels0.01-frozen")):
        assert regimes.regime_label(fraction, backbone) == label
        assert regimes.parse_regime_label(label) == (fraction, backbone)
    for bad in ("labels2", "frozen-labels0.1", "warm"):
        with pytest.raises(ValueError):
            regimes.parse_regime_label(bad)
    assert regimes.protocol("fine-tune") == "fine-tune"
    assert regimes.protocol("frozen BN", "frozen") == "frozen backbone"
    assert regimes.protocol("fine-tune", "finetune", 0.1) == "fine-tune, 10% labels (subset seed 0)"
