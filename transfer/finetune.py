"""Fine-tune one (task, weights, schedule, seed) with detectron2 and write its metrics.json.

The config is resolved in layers, each overriding the one before:

1. the task's YAML (configs/detection/..., over detectron2's model zoo) and its datasets;
2. what the weights decide (``transfer.convert.weights_settings`` of their overlay: pixel mean/std,
   INPUT.FORMAT, STRIDE_IN_1X1, depth and widths, GN): the task keeps its protocol (BN kind,
   FREEZE_AT, heads), so every weights file of a suite fine-tunes the same way;
3. the schedule (``full`` / ``quick`` / ``demo``, see transfer/tasks), then the transfer regime
   (transfer/regimes.py): a label fraction trains on a labelled subset with the schedule shrunk
   with it, a frozen backbone sets FREEZE_AT 5 and FrozenBN;
4. the GPU count, by Kaiming He's rule for the MoCo configs: keep IMS_PER_BATCH 16 when memory
   allows (SyncBN makes it equivalent); otherwise halve the batch and the LR and double the
   iterations, LR steps and warm-up (``max_ims_per_gpu`` says how many images one GPU holds),
   down to ``MIN_BN_GROUP`` images per BN group (below it only with ``allow_small_batch``);
5. the user's ``opts`` (detectron2 ``KEY VALUE`` pairs);
6. what one process can run: SyncBN needs a process group, so a single process uses BN (with a
   warning) and CPU processes use naiveSyncBN (torch's SyncBN runs on GPUs only).

The datasets are checked before anything trains; every run writes ``<output>/metrics.json``
(atomically, through ``transfer.runs``), also when it fails. A failed run raises ``RunFailed`` (or
``UserError`` for bad input) after writing its record. A full disk or a read-only folder anywhere
in a run is its one-line reason (``fileio.DiskError``: the path and the free space), and what a
cut-short write may have left is removed; checkpoints are written whole or not at all
(transfer/d2/checkpoint.py), so the next attempt resumes from the last complete one.
"""
from __future__ import annotations

import errno
import importlib.metadata
import logging
import os
import platform
import re
import shutil
import subprocess
import time
from pathlib import Path

import torch
from detectron2.config import CfgNode
from detectron2.data import MetadataCatalog
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from transfer import REPO, d2compat, fileio, regimes, runs
from transfer.convert import load_overlay, weights_settings
from transfer.d2 import evaluation
from transfer.d2.config import get_cfg, merge_config_file
from transfer.d2.launch import launch
from transfer.errors import UserError, log_once
from transfer.tasks import MIN_BN_GROUP, Task, call, get_task, is_custom_task, require, task_that_runs
from transfer.tasks.custom import image_size_settings

logger = logging.getLogger("transfer.finetune")

SYNCED_BN = {"SyncBN", "naiveSyncBN", "naiveSyncBN_N", "nnSyncBN"}


class RunFailed(RuntimeError):
    """Training or evaluation failed; ``record`` is the metrics.json that was written."""

    def __init__(self, message: str, record: dict):
        super().__init__(message)
        self.record = record


# ---------------------------------------------------------------------------------------------
# Config resolution

def _dotted(flat: dict) -> list:
    return [x for key, value in flat.items() for x in (key, value)]


def _value(cfg: CfgNode, key: str):
    """``cfg``'s value at a dotted key, or None."""
    for part in key.split("."):
        cfg = cfg.get(part) if isinstance(cfg, CfgNode) else None
    return cfg


def apply_schedule(cfg: CfgNode, task: Task, schedule: str) -> None:
    if schedule not in task.schedules:
        raise UserError(f"--schedule {schedule}: task {task.name} has {', '.join(task.schedules)}")
    plan = task.schedules[schedule]
    if plan.fraction != 1.0:
        _scale_iterations(cfg, plan.fraction)
    if plan.overlay:
        merge_config_file(cfg, REPO / plan.overlay)
    length = cfg.SOLVER.MAX_ITER
    cfg.merge_from_list(_dotted(dict(plan.settings)))
    if "SOLVER.MAX_ITER" in plan.settings:
        _fit_to_length(cfg, length, plan.settings)


# Warm-up and precise BN take at most this share of a schedule that sets its own length: the
# config's 100 warm-up iterations would keep a 30-iteration run below its LR throughout.
FITTED_SHARE = 0.1


def _fit_to_length(cfg: CfgNode, length: int, given) -> None:
    """A schedule that sets MAX_ITER (a custom dataset's own) in place of ``length``: the LR steps
    it leaves out keep their fractions of the run, warm-up and precise BN their count up to a
    tenth of the run each. What it does set stays as set."""
    max_iter, cap = cfg.SOLVER.MAX_ITER, max(1, round(FITTED_SHARE * cfg.SOLVER.MAX_ITER))
    if "SOLVER.STEPS" not in given:
        steps = {round(s * max_iter / length) for s in cfg.SOLVER.STEPS}
        cfg.SOLVER.STEPS = tuple(sorted(s for s in steps if 0 < s < max_iter))
    if "SOLVER.WARMUP_ITERS" not in given:
        cfg.SOLVER.WARMUP_ITERS = min(cfg.SOLVER.WARMUP_ITERS, cap)
    if not {"TEST.PRECISE_BN.NUM_ITER", "TEST.PRECISE_BN.ENABLED"} & set(given):
        cfg.TEST.PRECISE_BN.NUM_ITER = min(cfg.TEST.PRECISE_BN.NUM_ITER, cap)
    logger.info("schedule of %d iterations: LR steps %s, warm-up %d, precise BN %s", max_iter,
                list(cfg.SOLVER.STEPS), cfg.SOLVER.WARMUP_ITERS,
                cfg.TEST.PRECISE_BN.NUM_ITER if cfg.TEST.PRECISE_BN.ENABLED else "off")


def _scale_iterations(cfg: CfgNode, factor: float) -> None:
    cfg.SOLVER.MAX_ITER = max(1, round(cfg.SOLVER.MAX_ITER * factor))
    cfg.SOLVER.STEPS = tuple(max(1, round(s * factor)) for s in cfg.SOLVER.STEPS)
    cfg.TEST.EVAL_PERIOD = round(cfg.TEST.EVAL_PERIOD * factor)
    cfg.SOLVER.CHECKPOINT_PERIOD = max(1, round(cfg.SOLVER.CHECKPOINT_PERIOD * factor))


def scale_for_gpus(cfg: CfgNode, num_gpus: int, max_ims_per_gpu: int | None,
                   allow_small_batch: bool = False) -> int:
    """Kaiming He's rule for the MoCo configs: keep the batch if it fits; else halve the batch and
    the LR and double the schedule (iterations, LR steps and warm-up), as often as memory needs,
    but never below ``MIN_BN_GROUP`` images per BN group unless ``allow_small_batch``.
    Returns the factor the schedule was stretched by (1: unchanged)."""
    batch = cfg.SOLVER.IMS_PER_BATCH
    if batch % num_gpus:
        raise UserError(f"--num-gpus {num_gpus}: SOLVER.IMS_PER_BATCH {batch} must be a multiple of it")
    factor = 1
    while max_ims_per_gpu and batch // num_gpus > max_ims_per_gpu:
        if batch % 2 or (batch // 2) % num_gpus:
            raise UserError(f"--max-ims-per-gpu {max_ims_per_gpu}: cannot split IMS_PER_BATCH "
                            f"{cfg.SOLVER.IMS_PER_BATCH} over {num_gpus} GPUs by halving it")
        batch, factor = batch // 2, factor * 2
    if factor == 1:
        return 1
    group = bn_group_images(cfg, num_gpus, batch)
    if group is not None and group < MIN_BN_GROUP and not allow_small_batch:
        raise UserError(f"--max-ims-per-gpu {max_ims_per_gpu}: {num_gpus} GPU(s) would train batch {batch}, "
                        f"{group} images per BN group (fewer than {MIN_BN_GROUP}: not the paper's protocol); "
                        "use more GPUs (--num-gpus), or pass --allow-small-batch (its runs are marked in the reports)")
    logger.info("%d GPU(s) x %d images: IMS_PER_BATCH %d -> %d, BASE_LR / %d, iterations, steps and warm-up x %d",
                num_gpus, max_ims_per_gpu, cfg.SOLVER.IMS_PER_BATCH, batch, factor, factor)
    cfg.SOLVER.IMS_PER_BATCH = batch
    cfg.SOLVER.BASE_LR /= factor
    _scale_iterations(cfg, factor)
    cfg.SOLVER.WARMUP_ITERS = round(cfg.SOLVER.WARMUP_ITERS * factor)
    return factor


def _norms(node: CfgNode, prefix: str = ""):
    """(dotted key, node, value) of every ``NORM`` key of the config."""
    for key, value in node.items():
        if isinstance(value, CfgNode):
            yield from _norms(value, f"{prefix}{key}.")
        elif key == "NORM":
            yield f"{prefix}{key}", node, value


def bn_group_images(cfg: CfgNode, num_gpus: int, batch: int | None = None) -> int | None:
    """Images one BN layer computes its statistics over (the smallest over the model's norms); None
    when no norm uses batch statistics (FrozenBN, GN). Synced BN (and BN on one process) sees the
    whole batch; plain BN on several processes sees one process's images."""
    batch = batch or cfg.SOLVER.IMS_PER_BATCH
    groups = [batch if value in SYNCED_BN or num_gpus == 1 else batch // num_gpus
              for _, _, value in _norms(cfg) if value in SYNCED_BN | {"BN"}]
    return min(groups, default=None)


def _fit_norms(cfg: CfgNode, num_gpus: int, on_gpu: bool) -> None:
    if num_gpus == 1:
        replacement, why = "BN", "SyncBN needs a process group; on one process BN computes the same"
    elif not on_gpu:
        replacement, why = "naiveSyncBN", "torch's SyncBN runs on GPUs only; naiveSyncBN syncs over gloo"
    else:
        return
    for key, node, value in list(_norms(cfg)):
        if value == "SyncBN":
            _warn_once(f"{key}: {why}: using {replacement}")
            node["NORM"] = replacement


# Per process, for a custom task on CPUs whose YAML chooses neither: detectron2's 16 images of
# 800 px need more memory than a CPU machine has (such runs are killed).
CPU_IMS_PER_PROCESS = 2
CPU_IMAGE_SIZE = 512


def _fit_device(cfg: CfgNode, task: Task, schedule: str, num_gpus: int) -> None:
    """Loader workers at most the cores; a custom task on CPUs gets a batch and image size a CPU
    holds where its YAML set neither (and an LR it did not set scaled with the batch)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    cfg.DATALOADER.NUM_WORKERS = min(cfg.DATALOADER.NUM_WORKERS, cores // num_gpus)
    plan = task.schedules[schedule]
    if torch.cuda.is_available() or not is_custom_task(task.name) or plan.overlay:
        return  # an overlay (demo) sets sizes of its own
    changed, batch = [], cfg.SOLVER.IMS_PER_BATCH
    if "SOLVER.IMS_PER_BATCH" not in plan.settings and batch > CPU_IMS_PER_PROCESS * num_gpus:
        cfg.SOLVER.IMS_PER_BATCH = CPU_IMS_PER_PROCESS * num_gpus
        changed.append(f"batch {batch} -> {cfg.SOLVER.IMS_PER_BATCH}")
        if "SOLVER.BASE_LR" not in plan.settings:  # the linear scaling rule
            lr, cfg.SOLVER.BASE_LR = cfg.SOLVER.BASE_LR, cfg.SOLVER.BASE_LR * cfg.SOLVER.IMS_PER_BATCH / batch
            changed.append(f"BASE_LR {lr:g} -> {cfg.SOLVER.BASE_LR:g}")
    if "INPUT.MIN_SIZE_TEST" not in task.overrides and cfg.INPUT.MIN_SIZE_TEST > CPU_IMAGE_SIZE:
        changed.append(f"images {cfg.INPUT.MIN_SIZE_TEST} -> {CPU_IMAGE_SIZE} px")
        cfg.merge_from_list(_dotted(image_size_settings(cfg, CPU_IMAGE_SIZE)))
    if changed:
        _warn_once(f"{task.name}: on a CPU, {', '.join(changed)} (the YAML's schedule: ims_per_batch and "
                   "image_size: set them)")


def _warn_once(message: str) -> None:
    log_once(logger, logging.WARNING, message)


def _merge_opts(cfg: CfgNode, opts) -> None:
    try:
        cfg.merge_from_list(list(opts))
    except (AssertionError, KeyError, ValueError) as e:  # yacs: unknown key, odd count, type mismatch
        raise UserError(f"opts {' '.join(map(str, opts))}: {e}") from None


def check_opts(opts) -> None:
    """Config overrides checked once, before any run starts: a key no task's config has, or a
    value of another type than the key's (yacs names both), is one line."""
    from transfer.tasks import TASKS, installed

    cfg = get_cfg()  # the keys of every task that can run here (DensePose's only with its project)
    extends = [task.extend_config for task in TASKS.values() if task.extend_config and installed(task)]
    for extend in dict.fromkeys(extends):
        call(extend, cfg)
    _merge_opts(cfg, opts)


def task_config(task: Task) -> CfgNode:
    """detectron2's defaults, the keys the task's YAML declares, then the YAML itself."""
    cfg = get_cfg()
    if task.extend_config:
        call(task.extend_config, cfg)
    merge_config_file(cfg, task.config_path)
    return cfg


def resolve_config(task: Task, weights, schedule: str, seed: int = 0, output_dir=".", num_gpus: int = 1,
                   opts=(), max_ims_per_gpu: int | None = None, amp: bool = False,
                   allow_small_batch: bool = False, fraction: float = regimes.FULL,
                   backbone: str = regimes.FINETUNE) -> CfgNode:
    """The detectron2 config one run trains with (see the module docstring for the layers)."""
    cfg = task_config(task)
    cfg.merge_from_list(_dotted(dict(task.overrides)))
    cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = tuple(task.train), tuple(task.test)

    owned, others = weights_settings(load_overlay(weights))
    protocol = {key: value for key, value in others.items() if _value(cfg, key) not in (value, None)}
    if protocol:
        logger.info("%s: the task's protocol replaces the weights' %s", Path(weights).name,
                    ", ".join(f"{key} {value}" for key, value in protocol.items()))
    cfg.merge_from_list(_dotted(owned))

    apply_schedule(cfg, task, schedule)
    regimes.apply_label_fraction(cfg, fraction)  # the labelled subset, and the schedule shrunk with it
    regimes.apply_backbone(cfg, backbone)
    _fit_device(cfg, task, schedule, num_gpus)
    scale_for_gpus(cfg, num_gpus, max_ims_per_gpu, allow_small_batch)
    _merge_opts(cfg, opts)

    on_gpu = torch.cuda.is_available()
    if amp and not on_gpu:
        raise UserError("--amp: mixed precision training needs a GPU")
    _fit_norms(cfg, num_gpus, on_gpu)
    cfg.MODEL.DEVICE = "cuda" if on_gpu else "cpu"
    cfg.SOLVER.AMP.ENABLED = bool(amp or cfg.SOLVER.AMP.ENABLED)
    cfg.SEED = seed
    cfg.OUTPUT_DIR = str(Path(output_dir).resolve())
    cfg.TRANSFER.TASK = task.name
    cfg.TRANSFER.EVALUATOR = task.evaluator
    cfg.freeze()
    return cfg


def experiment_key(task, weights, schedule: str, datasets_root=None, num_gpus: int = 1, opts=(),
                   fraction: float = regimes.FULL, backbone: str = regimes.FINETUNE) -> str:
    """The resolved config of a run, less its seed, output folder and task name, as one string.

    Two tasks with the same key train and evaluate the same model on the same data, so each seed
    needs running once (in the demo schedule the 1x and 2x tasks train the same short schedule).
    """
    task = _resolve_task(task if isinstance(task, Task) else get_task(task), datasets_root)
    cfg = resolve_config(task, weights, schedule, 0, ".", num_gpus, opts, fraction=fraction, backbone=backbone).clone()
    cfg.defrost()
    cfg.OUTPUT_DIR = ""
    if not is_custom_task(task.name):  # a custom task's name is the file its data comes from
        cfg.TRANSFER.TASK = ""
    return cfg.dump()


# ---------------------------------------------------------------------------------------------
# Checks before training

def check_datasets(task: Task, cfg: CfgNode, datasets_root=None) -> None:
    """Datasets on disk and registered, and a model whose class count matches them."""
    from transfer.datasets import catalog

    catalog.check([*task.train, *task.test], datasets_root)
    for name in [*task.train, *task.test]:
        meta = MetadataCatalog.get(name)
        if cfg.MODEL.META_ARCHITECTURE == "SemanticSegmentor":
            key, classes = "MODEL.SEM_SEG_HEAD.NUM_CLASSES", meta.get("stuff_classes")
            expected = cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
        else:
            key, classes = "MODEL.ROI_HEADS.NUM_CLASSES", meta.get("thing_classes")
            expected = cfg.MODEL.ROI_HEADS.NUM_CLASSES
        if classes is not None and len(classes) != expected:
            raise UserError(f"{key} {expected}: dataset {name} has {len(classes)} classes "
                            f"({', '.join(classes[:5])}{', ...' if len(classes) > 5 else ''})")
    if cfg.MODEL.KEYPOINT_ON:
        for name in [*task.train, *task.test]:
            names = MetadataCatalog.get(name).get("keypoint_names") or ()
            if len(names) != cfg.MODEL.ROI_KEYPOINT_HEAD.NUM_KEYPOINTS:
                raise UserError(f"MODEL.ROI_KEYPOINT_HEAD.NUM_KEYPOINTS {cfg.MODEL.ROI_KEYPOINT_HEAD.NUM_KEYPOINTS}: "
                                f"dataset {name} has {len(names)} keypoints")


def _resolve_task(task: Task, datasets_root) -> Task:
    """The task that runs (``transfer.tasks.task_that_runs``), saying so when it is the fallback.

    The suite resolves fallbacks when it plans; this is for a run started alone.
    """
    ran, note = task_that_runs(task, datasets_root)
    if note:
        logger.warning(note)
    return ran


def register_datasets(task_name: str, datasets_root, train=()) -> None:
    """Make a run's datasets readable in this process: detectron2's builtin names under the root,
    a custom task's datasets from its YAML, and the labelled subsets among the ``train`` names
    (transfer/regimes.py). Called where a process is about to read them: the
    run's checks, and each process the training spawns (a run on one process trains in the process
    that checked its datasets, and does not register them again)."""
    from transfer.datasets import catalog
    from transfer.datasets.custom import register_custom

    catalog.register_all(datasets_root)
    if is_custom_task(task_name):
        register_custom(task_name)
    regimes.register_subsets(train)


# ---------------------------------------------------------------------------------------------
# The run

def versions() -> dict:
    import detectron2
    import torchvision

    try:
        ours = importlib.metadata.version("moco-transfer")
    except importlib.metadata.PackageNotFoundError:
        ours = None
    return {"python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "detectron2": detectron2.__version__, "moco_transfer": ours}


def git_commit() -> str | None:
    """The project's git commit (``-dirty`` with uncommitted changes to tracked files), if a checkout."""
    def git(*args):
        done = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit and git("status", "--porcelain", "--untracked-files=no"):
        commit += "-dirty"
    return commit


def provenance(cfg: CfgNode, task: Task, num_gpus: int) -> dict:
    """What a run really trained with, after every scaling rule: the columns a reviewer asks for."""
    group = bn_group_images(cfg, num_gpus)
    labels = cfg.TRANSFER.LABELS
    return {
        "protocol": regimes.protocol(task.protocol, cfg.TRANSFER.BACKBONE, labels.FRACTION, labels.SUBSET_SEED),
        "fraction": labels.FRACTION, "backbone": cfg.TRANSFER.BACKBONE, "subset_seed": labels.SUBSET_SEED,
        "schedule_factor": labels.SCHEDULE,
        "norm": cfg.MODEL.RESNETS.NORM, "freeze_at": cfg.MODEL.BACKBONE.FREEZE_AT,
        "ims_per_batch": cfg.SOLVER.IMS_PER_BATCH, "base_lr": cfg.SOLVER.BASE_LR,
        "max_iter": cfg.SOLVER.MAX_ITER, "steps": list(cfg.SOLVER.STEPS), "warmup_iters": cfg.SOLVER.WARMUP_ITERS,
        "precise_bn_iters": cfg.TEST.PRECISE_BN.NUM_ITER if cfg.TEST.PRECISE_BN.ENABLED else 0,
        "bn_group_images": group, "small_batch": group is not None and group < MIN_BN_GROUP,
        "gpu_model": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "detectron2_compiled": d2compat.has_compiled_ops(), "git_commit": git_commit(),
    }


def _train_and_evaluate(cfg: CfgNode, datasets_root, resume: bool, launcher_pid: int) -> dict:
    """One process's part of the run (all processes run it); returns what the main process saw."""
    from detectron2.utils.env import seed_all_rng

    from transfer.d2.trainer import Trainer

    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="detectron2")
    if os.getpid() != launcher_pid:  # a spawned process starts with detectron2's defaults
        register_datasets(cfg.TRANSFER.TASK, datasets_root, cfg.DATASETS.TRAIN)
    seed_all_rng(cfg.SEED + comm.get_rank())
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=resume)
    start = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - start
    if not comm.is_main_process():
        return {}
    times = [t for t, _ in trainer.storage.history("time").values()] if "time" in trainer.storage.histories() else []
    return {
        # plain Python values: evaluators return numpy scalars, which torch.load(weights_only) refuses
        "results": evaluation.json_safe(getattr(trainer, "_last_eval_results", {})),
        "train_wall_time_s": wall,
        "s_per_iter": _median(times[len(times) // 10:]) if times else None,
        "iterations": trainer.iter,  # == MAX_ITER once training has finished
        "peak_memory_mb": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
    }


def _median(values):
    values = sorted(values)
    return values[len(values) // 2] if values else None


def _worker(cfg: CfgNode, datasets_root, resume: bool, result_path: str, launcher_pid: int):
    result = _train_and_evaluate(cfg, datasets_root, resume, launcher_pid)
    if comm.is_main_process():
        fileio.atomic_torch_save(result, result_path)


def finetune(task, weights, schedule: str | None, seed: int, output_dir, datasets_root=None, num_gpus: int = 1,
             opts=(), *, max_ims_per_gpu: int | None = None, amp: bool = False, resume: bool = True,
             keep_checkpoints: bool = False, allow_small_batch: bool = False, fraction: float = regimes.FULL,
             backbone: str = regimes.FINETUNE) -> dict:
    """Run one fine-tuning run; write and return its metrics.json record.

    ``fraction`` and ``backbone``: the transfer regime (transfer/regimes.py): a labelled subset of
    the training images (its ids written to the run folder) and a frozen backbone.

    ``task``: a Task, a task name or a custom dataset YAML; ``schedule`` None: the task's default
    (``full``, or what a custom dataset's YAML names). ``weights``: detectron2 weights (.pkl)
    with their overlay. ``resume``: continue from ``output_dir``'s last checkpoint if there is one.
    Checkpoints are deleted after a successful run unless ``keep_checkpoints``.
    """
    output_dir = Path(output_dir)
    with fileio.disk_errors(output_dir):  # a read-only or full disk: one line
        output_dir.mkdir(parents=True, exist_ok=True)
        setup_logger(str(output_dir), name="transfer")
    weights = Path(weights)
    task_name = task.name if isinstance(task, Task) else str(task)
    record = {
        "status": "failed", "error": None, "task": task_name, "schedule": schedule, "fraction": fraction,
        "backbone": backbone, "seed": seed,
        "weights": str(weights.resolve()), "weights_sha256": None, "metrics": {}, "all_metrics": {},
        "s_per_iter": None, "wall_time_s": None, "peak_memory_mb": None,
        "precision": "amp" if amp else "fp32", "iterations": None, "num_gpus": num_gpus,
        "versions": versions(), "config": None,
    }
    start = time.time()
    try:
        if not weights.is_file():
            raise UserError(f"--weights {weights}: no such file")
        if num_gpus < 1:
            raise UserError(f"--num-gpus {num_gpus}: must be at least 1")
        record["weights_sha256"] = fileio.sha256_of(weights)
        task = task if isinstance(task, Task) else get_task(task)
        schedule = record["schedule"] = schedule or task.default_schedule
        task = _resolve_task(task, datasets_root)
        require(task)  # an optional dependency (DensePose): one line saying how to install it
        register_datasets(task.name, datasets_root)  # read here by the checks (and, on one process, the training)
        cfg = resolve_config(task, weights, schedule, seed, output_dir, num_gpus, opts, max_ims_per_gpu, amp,
                             allow_small_batch, fraction, backbone)
        record.update(config=cfg.dump(), precision="amp" if cfg.SOLVER.AMP.ENABLED else "fp32",
                      dataset_split={"train": list(task.train), "test": list(task.test)},
                      provenance=provenance(cfg, task, num_gpus))
        if task.name != task_name:
            record["task_variant"] = task.name
        if task.notes:
            record["notes"] = list(task.notes)
        check_datasets(task, cfg, datasets_root)
        regimes.register_subsets(cfg.DATASETS.TRAIN)
        subsets = regimes.write_subsets(cfg.DATASETS.TRAIN, output_dir)  # the kept ids, in the run folder
        if subsets:
            record["label_subset"] = subsets
        for name, subset in subsets.items():
            if subset["classes_without_images"]:
                logger.warning("%s (%d of %d images) has no training image of %s (label_subset in metrics.json)", name,
                               subset["kept"], subset["images"], ", ".join(subset["classes_without_images"]))
    except UserError as e:
        record.update(error=str(e), wall_time_s=time.time() - start)
        runs.write_record(output_dir, record)
        raise

    result_path = output_dir / RESULT
    try:
        launch(_worker, num_gpus, args=(cfg, datasets_root, resume, str(result_path), os.getpid()))
        result = torch.load(result_path, weights_only=True)
    except Exception as e:  # diverged, out of memory, a full disk, a bug: record it, then say so
        disk = _disk_error(e, output_dir)
        if disk:
            remove_partial_files(output_dir)
        message = str(disk) if disk else _one_line(e)
        record.update(error=message, wall_time_s=time.time() - start)
        runs.write_record(output_dir, record)
        raise RunFailed(message, record) from e
    finally:
        result_path.unlink(missing_ok=True)

    results = evaluation.json_safe(result["results"])
    record.update(
        status="ok",
        metrics=evaluation.headline_metrics(task.evaluator, results, task.metrics),
        all_metrics=results,
        per_class=evaluation.per_class(task.evaluator, results),
        **evaluation.run_fields(task.evaluator, results, task.metrics),
        s_per_iter=result["s_per_iter"],
        wall_time_s=time.time() - start,
        peak_memory_mb=result["peak_memory_mb"],
        iterations=result["iterations"],
    )
    runs.write_record(output_dir, record)
    if record["no_predictions"]:  # the run's APs are 0 because of the model, not of the evaluation: say so
        logger.warning("no predictions: the model predicted no instance on the %d test images; its AP is 0 "
                       "(metrics.json: no_predictions true)", record["images_evaluated"])
    if not keep_checkpoints:
        for path in [*output_dir.glob("model_*.pth"), output_dir / "last_checkpoint"]:
            path.unlink(missing_ok=True)
    logger.info("%s on %s (%s, seed %d): %s", weights.name, task.name, schedule, seed,
                ", ".join(f"{k} {v:.1f}" if v is not None else f"{k} n/a" for k, v in record["metrics"].items()))
    return record


RESULT = ".result.pt"  # what the training processes hand back to finetune()
EVALUATION_OUTPUTS = "inference"  # the evaluators' files (transfer/d2/trainer.py), written in place


NO_ROOM = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}  # errors of writes only (EACCES may be a read's)


def _disk_error(error: BaseException, folder: Path) -> fileio.DiskError | None:
    """The full disk (or read-only folder) behind a failed run, as one line naming the path: a
    DiskError (a checkpoint or result that did not fit), an OSError of no room anywhere in the
    exception's chain (a log, an evaluation output written in place), or either of them that a
    spawned process's traceback ends with."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, fileio.DiskError):
            return error
        if isinstance(error, OSError) and error.errno in NO_ROOM:
            return fileio.disk_error(error.filename or folder, error)
        spawned = _spawned_disk_error(error, folder)
        if spawned:
            return spawned
        error = error.__cause__ or error.__context__
    return None


def _spawned_disk_error(error: BaseException, folder: Path) -> fileio.DiskError | None:
    """The DiskError, or OSError of no room, that a spawned process's traceback ends with (only its
    text comes back: a DiskError's message names the path; for an OSError the run folder is named)."""
    text = str(error).strip()
    if "Traceback" not in text:
        return None
    kind, _, message = text.splitlines()[-1].strip().partition(": ")
    if kind.endswith(".DiskError"):
        return fileio.DiskError(message)
    found = re.match(r"\w*Error: \[Errno (\d+)\]", f"{kind}: {message}")
    code = int(found[1]) if found else None
    return fileio.disk_error(folder, OSError(code, os.strerror(code))) if code in NO_ROOM else None


def remove_partial_files(folder: Path) -> None:
    """After a run failed for want of room: remove what a cut-short write may have left in its
    folder. Atomic writes leave only a killed process's temporaries; detectron2's own writers (the
    training log, the evaluation outputs) write in place, so an empty file or an evaluation output
    of the attempt may be incomplete. Logs with content stay: they say what happened; so does the
    lock, which its holders share."""
    empty = [p for p in folder.rglob("*") if p.is_file() and p.name != runs.LOCK and p.stat().st_size == 0]
    for path in [*fileio.temporaries(folder), folder / RESULT, *empty]:
        path.unlink(missing_ok=True)
    shutil.rmtree(folder / EVALUATION_OUTPUTS, ignore_errors=True)


def _one_line(error: Exception) -> str:
    """``Type: message``; for an error raised in a spawned process, the last line of its traceback
    (a disk error's is ``_disk_error``'s)."""
    text = str(error).strip()
    if "Traceback" in text:
        return text.splitlines()[-1].strip()
    if "is killed by signal: Killed" in text:  # the kernel's OOM killer took a data loader worker
        return f"killed (out of memory?): a data loader worker got SIGKILL ({text.splitlines()[0]})"
    return f"{type(error).__name__}: {text}"
