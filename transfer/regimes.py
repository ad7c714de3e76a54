"""Transfer regimes beyond the paper's: few labels (a label fraction) and a frozen backbone.

Both are dimensions of a run's identity, like the seed, and both are written into the run's
detectron2 config (``TRANSFER.LABELS.*``, ``TRANSFER.BACKBONE``) so a metrics.json says what ran.

**Label fraction.** A fraction f < 1 of a training dataset keeps the images that come first when
all of them are ranked by sha256("<dataset>/<subset seed>/<image id>"), ceil(f * N) of them. The
subset is therefore a function of (dataset, fraction, subset seed) only: the same for every
weights file and every trial seed (the comparison stays paired), and nested (the 1% images are
the first images of the 10% ones). It is registered in detectron2 as a dataset of its own,
``<dataset>@<fraction>`` (``#seed<N>`` appended for a subset seed other than 0), whose records are
the base dataset's kept records; the kept ids are written to the run folder (``SUBSET_FILE``)
with the classes the subset left without any image.

The schedule shrinks with the data: iterations, LR steps, evaluation and checkpoint periods are
multiplied by max(f, ``TRANSFER.LABELS.MIN_SCHEDULE``): the same epochs as the full data, but
never fewer than that share of the task's schedule, so a 1% run still takes enough SGD steps
for the heads to train. The factor used is stated in the config (``TRANSFER.LABELS.SCHEDULE``).

**Frozen backbone** (the frozen setting of "How well do self-supervised models transfer?"):
``MODEL.BACKBONE.FREEZE_AT 5`` (stem and every ResNet stage of the backbone get no gradient,
their BN statistics are frozen: detectron2 turns frozen stages' BN into FrozenBN) and the
backbone's norm stated as ``FrozenBN``; FPN, RPN and heads train as in the task. In a C4 model
res5 is not in the backbone but is the box head's first layer (detectron2's Res5ROIHeads): it
trains, with the task's norm, like every head. A weights file with GN layers keeps GN, frozen.
"""
from __future__ import annotations

import hashlib
import math
import re
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

from transfer.errors import UserError

if TYPE_CHECKING:  # annotations only: the subset rule and the parsers need no detectron2
    from detectron2.config import CfgNode

FULL = 1.0
FINETUNE, FROZEN = "finetune", "frozen"
BACKBONES = (FINETUNE, FROZEN)
# The protocol name of the frozen variant, as the "protocol" column of published_results.csv
# would name it: a published number is compared only with runs of exactly its protocol.
FROZEN_PROTOCOL = "frozen backbone"
DEFAULT_SUBSET_SEED = 0
# The share of the task's schedule a small fraction trains at least (TRANSFER.LABELS.MIN_SCHEDULE).
MIN_SCHEDULE = 0.1
# Warm-up takes at most this share of a shortened schedule (as transfer/finetune.py's FITTED_SHARE).
WARMUP_SHARE = 0.1
FREEZE_ALL_STAGES = 5  # FREEZE_AT: 1 the stem, 2..5 res2..res5
BN_KINDS = {"BN", "SyncBN", "naiveSyncBN", "naiveSyncBN_N", "nnSyncBN", "FrozenBN"}
SUBSET_FILE = "label_subset.json"  # in the run folder: the kept image ids, per training dataset
SUBSET_RULE = ("images ranked by sha256('<dataset>/<subset seed>/<image id>'), the first ceil(fraction x images) "
               "kept; schedule x max(fraction, TRANSFER.LABELS.MIN_SCHEDULE)")
_SUBSET_NAME = re.compile(r"^(?P<base>.+)@(?P<fraction>[0-9.e+-]+)(?:#seed(?P<seed>\d+))?$")


def add_regime_config(cfg: CfgNode) -> CfgNode:
    """Declare the regime keys (under ``cfg.TRANSFER``, which transfer/d2/config.py creates)."""
    from detectron2.config import CfgNode

    cfg.TRANSFER.LABELS = CfgNode()
    cfg.TRANSFER.LABELS.FRACTION = FULL  # of each training dataset's images
    cfg.TRANSFER.LABELS.SUBSET_SEED = DEFAULT_SUBSET_SEED
    cfg.TRANSFER.LABELS.MIN_SCHEDULE = MIN_SCHEDULE  # floor of the schedule's scaling factor
    cfg.TRANSFER.LABELS.SCHEDULE = 1.0  # the factor the schedule was scaled by (set by scale_schedule)
    cfg.TRANSFER.BACKBONE = FINETUNE  # finetune | frozen
    return cfg


# ---------------------------------------------------------------------------------------------
# Command-line values

def parse_fractions(spec: str) -> tuple[float, ...]:
    """``"0.01,0.1,1"`` -> (0.01, 0.1, 1.0), each once, in the order given."""
    fractions = []
    for part in (p.strip() for p in str(spec).split(",")):
        try:
            value = float(part)
        except ValueError:
            raise UserError(f"--fractions {spec}: '{part}' is not a number (e.g. --fractions 0.01,0.1,1)") from None
        if not 0 < value <= 1:
            raise UserError(f"--fractions {spec}: {part} is not a fraction of the training images in (0, 1]")
        if value not in fractions:
            fractions.append(value)
    return tuple(fractions)


def parse_backbones(spec: str) -> tuple[str, ...]:
    """``"finetune,frozen"`` -> ("finetune", "frozen"), each once, in the order given."""
    modes = [m.strip() for m in str(spec).split(",") if m.strip()]
    for mode in modes:
        if mode not in BACKBONES:
            raise UserError(f"--backbone {spec}: '{mode}' is not one of {', '.join(BACKBONES)}")
    if not modes:
        raise UserError(f"--backbone: no mode given ({', '.join(BACKBONES)})")
    return tuple(dict.fromkeys(modes))


def fraction_text(fraction: float) -> str:
    """0.1 -> '0.1' (as in dataset and folder names)."""
    return f"{float(fraction):g}"


def percent(fraction: float) -> str:
    """0.1 -> '10%' (as reports show a fraction)."""
    return f"{float(fraction) * 100:g}%"


def regime_label(fraction: float = FULL, backbone: str = FINETUNE) -> str | None:
    """The folder-name part of a regime: None for the paper's (all labels, fine-tuned), else e.g.
    'labels0.1', 'frozen', 'labels0.1-frozen'."""
    parts = ([f"labels{fraction_text(fraction)}"] if fraction < FULL else []) + ([FROZEN] if backbone == FROZEN else [])
    return "-".join(parts) or None


def parse_regime_label(label: str | None) -> tuple[float, str]:
    """The inverse of ``regime_label``: (fraction, backbone); ValueError when it is not one."""
    fraction, backbone = FULL, FINETUNE
    for part in (label.split("-") if label else []):
        if part == FROZEN and backbone == FINETUNE:
            backbone = FROZEN
        elif part.startswith("labels") and fraction == FULL and backbone == FINETUNE:
            fraction = float(part.removeprefix("labels"))
            if not 0 < fraction < FULL:
                raise ValueError(label)
        else:
            raise ValueError(label)
    return fraction, backbone


def protocol(task_protocol: str, backbone: str = FINETUNE, fraction: float = FULL,
             subset_seed: int = DEFAULT_SUBSET_SEED) -> str:
    """The protocol a run follows, as published_results.csv's "protocol" column would name it."""
    name = FROZEN_PROTOCOL if backbone == FROZEN else task_protocol
    if fraction < FULL:
        name += f", {percent(fraction)} labels (subset seed {subset_seed})"
    return name


# ---------------------------------------------------------------------------------------------
# The labelled subset

def image_key(record: dict) -> str:
    """A dataset record's image id: ``image_id`` (VOC, COCO, LVIS, Cityscapes instances), else the
    image file's stem (semantic segmentation records have no id); never a path, which differs
    from machine to machine."""
    if record.get("image_id") is not None:
        return str(record["image_id"])
    return Path(record["file_name"]).stem


def rank(dataset: str, ids, seed: int = DEFAULT_SUBSET_SEED) -> list[str]:
    """The ids of a dataset in the order a subset takes them (see the module docstring)."""
    return sorted(dict.fromkeys(str(i) for i in ids),
                  key=lambda i: hashlib.sha256(f"{dataset}/{seed}/{i}".encode()).hexdigest())


def kept_count(images: int, fraction: float) -> int:
    """ceil(fraction x images), at least one image (1e-9: 0.1 x 80 is 8.000000000000002)."""
    return min(images, max(1, math.ceil(fraction * images - 1e-9)))


def kept_ids(dataset: str, ids, fraction: float, seed: int = DEFAULT_SUBSET_SEED) -> list[str]:
    """The ids a ``fraction`` of ``dataset`` keeps, in rank order."""
    ranked = rank(dataset, ids, seed)
    return ranked[:kept_count(len(ranked), fraction)]


def subset_name(dataset: str, fraction: float, seed: int = DEFAULT_SUBSET_SEED) -> str:
    """The registered name of a subset: ``voc_2007_trainval@0.1`` (``#seed<N>`` for seed N > 0)."""
    return f"{dataset}@{fraction_text(fraction)}" + (f"#seed{seed}" if seed != DEFAULT_SUBSET_SEED else "")


def parse_subset_name(name: str) -> tuple[str, float, int] | None:
    """(base dataset, fraction, subset seed) of a subset's name, None for any other name."""
    match = _SUBSET_NAME.match(name)
    if not match:
        return None
    try:
        fraction = float(match["fraction"])
    except ValueError:
        return None
    return match["base"], fraction, int(match["seed"] or DEFAULT_SUBSET_SEED)


def subset_records(name: str, records: list[dict]) -> list[dict]:
    """The records of the base dataset that subset ``name`` keeps, in the base dataset's order."""
    base, fraction, seed = parse_subset_name(name)
    kept = set(kept_ids(base, (image_key(r) for r in records), fraction, seed))
    return [r for r in records if image_key(r) in kept]


def register_subsets(names) -> list[str]:
    """Register every subset among dataset ``names`` (others are left alone); returns the subsets.

    Called in every process that builds a data loader (detectron2's catalogs are per process).
    The subset's metadata is its base dataset's (classes, evaluator type, ...).
    """
    from detectron2.data import DatasetCatalog, MetadataCatalog

    from transfer.datasets.catalog import register_dataset

    subsets = []
    for name in names:
        parsed = parse_subset_name(name)
        if parsed is None:
            continue
        base = parsed[0]
        if base not in DatasetCatalog.list():
            raise UserError(f"{name}: a subset of {base}, which is not a registered dataset")
        metadata = {k: v for k, v in MetadataCatalog.get(base).as_dict().items() if k != "name"}
        register_dataset(name, lambda name=name, base=base: subset_records(name, DatasetCatalog.get(base)), **metadata)
        subsets.append(name)
    return subsets


def _classes_per_image(record: dict, classes: list[str]) -> set[str]:
    """The classes an image has an instance (not a crowd region) or a labelled pixel of."""
    if "annotations" in record:
        return {classes[a["category_id"]] for a in record["annotations"]
                if not a.get("iscrowd", 0) and 0 <= a.get("category_id", -1) < len(classes)}
    if "sem_seg_file_name" in record:
        import numpy as np
        from PIL import Image

        with Image.open(record["sem_seg_file_name"]) as label:
            values = np.unique(np.asarray(label))
        return {classes[v] for v in values if v < len(classes)}  # 255 and other ignore values are not classes
    return set()


def class_coverage(records: list[dict], kept: list[dict], classes) -> dict:
    """Images per class in the whole dataset and in the subset, and the classes the subset left
    without any image (there were some in the whole dataset).

    Detection records count instances that are not crowd regions. Semantic segmentation records
    (no annotations) are read from their label images, for the kept images only: their
    ``images`` count is None, and a class without a labelled pixel in the subset is reported.
    """
    classes = list(classes or [])
    semantic = bool(records) and "annotations" not in records[0]
    whole = None if semantic else Counter(c for r in records for c in _classes_per_image(r, classes))
    sub = Counter(c for r in kept for c in _classes_per_image(r, classes))
    missing = [c for c in classes if not sub[c] and (whole is None or whole[c])]
    return {"images_per_class": {c: {"images": None if whole is None else whole[c], "kept": sub[c]} for c in classes},
            "classes_without_images": missing}


def describe_subset(name: str) -> dict:
    """What a registered subset holds: sizes, the rule, the kept ids and its class coverage."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    base, fraction, seed = parse_subset_name(name)
    records = DatasetCatalog.get(base)
    kept = subset_records(name, records)
    meta = MetadataCatalog.get(base)
    detection = bool(records) and "annotations" in records[0]
    classes = meta.get("thing_classes") if detection else meta.get("stuff_classes")
    return {"dataset": base, "fraction": fraction, "subset_seed": seed, "images": len(records), "kept": len(kept),
            "rule": SUBSET_RULE, **class_coverage(records, kept, classes),
            "kept_ids": [image_key(r) for r in kept]}


def write_subsets(names, output_dir) -> dict:
    """Describe every subset among ``names`` into ``<output_dir>/SUBSET_FILE`` (atomically); return
    the summary a metrics.json keeps: {subset: sizes and the classes left without images}."""
    from transfer.fileio import atomic_write_json

    described = {name: describe_subset(name) for name in names if parse_subset_name(name)}
    if not described:
        return {}
    atomic_write_json(Path(output_dir) / SUBSET_FILE, described)
    return {name: {k: v for k, v in d.items() if k not in ("kept_ids", "images_per_class", "rule")}
            for name, d in described.items()}


# ---------------------------------------------------------------------------------------------
# Config functions

def apply_label_fraction(cfg: CfgNode, fraction: float, subset_seed: int = DEFAULT_SUBSET_SEED) -> None:
    """Train on ``fraction`` of each training dataset (subset names in DATASETS.TRAIN) with the
    schedule scaled to it (``scale_schedule``); the keys say which fraction and seed."""
    if not 0 < fraction <= FULL:
        raise UserError(f"label fraction {fraction}: must be in (0, 1]")
    cfg.TRANSFER.LABELS.FRACTION = float(fraction)
    cfg.TRANSFER.LABELS.SUBSET_SEED = int(subset_seed)
    if fraction < FULL:
        cfg.DATASETS.TRAIN = tuple(subset_name(name, fraction, subset_seed) for name in cfg.DATASETS.TRAIN)
    scale_schedule(cfg)


def scale_schedule(cfg: CfgNode) -> float:
    """Iterations, LR steps, evaluation and checkpoint periods x max(fraction, MIN_SCHEDULE)
    (warm-up at most ``WARMUP_SHARE`` of the result); returns the factor, also stated in
    ``TRANSFER.LABELS.SCHEDULE``. A pure function of the config; scaling twice is refused."""
    labels = cfg.TRANSFER.LABELS
    if labels.SCHEDULE != 1.0:
        raise ValueError(f"the schedule was scaled already (TRANSFER.LABELS.SCHEDULE {labels.SCHEDULE})")
    factor = 1.0 if labels.FRACTION >= FULL else min(FULL, max(labels.FRACTION, labels.MIN_SCHEDULE))
    if factor == 1.0:
        return factor
    solver = cfg.SOLVER
    solver.MAX_ITER = max(1, round(solver.MAX_ITER * factor))
    steps = {round(s * factor) for s in solver.STEPS}
    solver.STEPS = tuple(sorted(s for s in steps if 0 < s < solver.MAX_ITER))
    solver.WARMUP_ITERS = min(solver.WARMUP_ITERS, max(1, round(WARMUP_SHARE * solver.MAX_ITER)))
    solver.CHECKPOINT_PERIOD = max(1, round(solver.CHECKPOINT_PERIOD * factor))
    cfg.TEST.EVAL_PERIOD = round(cfg.TEST.EVAL_PERIOD * factor)
    labels.SCHEDULE = factor
    return factor


def _res5_in_heads(cfg: CfgNode) -> bool:
    """C4 models: res5 is the box head's (Res5ROIHeads and our Res5ROIHeadsExtraNorm). Other models
    keep detectron2's default ROI_HEADS.NAME (Res5ROIHeads) without using it."""
    return cfg.MODEL.META_ARCHITECTURE == "GeneralizedRCNN" and cfg.MODEL.ROI_HEADS.NAME.startswith("Res5ROIHeads")


def freeze_backbone(cfg: CfgNode) -> None:
    """The frozen-backbone protocol: FREEZE_AT 5 and the backbone's BN stated as FrozenBN (see the
    module docstring for C4's res5 and for GN); everything else stays the task's."""
    cfg.MODEL.BACKBONE.FREEZE_AT = FREEZE_ALL_STAGES
    if cfg.MODEL.RESNETS.NORM in BN_KINDS and not _res5_in_heads(cfg):
        cfg.MODEL.RESNETS.NORM = "FrozenBN"
    cfg.TRANSFER.BACKBONE = FROZEN


def apply_backbone(cfg: CfgNode, backbone: str) -> None:
    """``finetune`` (the task's protocol, unchanged) or ``frozen`` (``freeze_backbone``)."""
    if backbone not in BACKBONES:
        raise UserError(f"--backbone {backbone}: not one of {', '.join(BACKBONES)}")
    if backbone == FROZEN:
        freeze_backbone(cfg)
