"""detectron2's DefaultTrainer with what a transfer benchmark needs.

- the evaluator is the task's (``cfg.TRANSFER.EVALUATOR``), see transfer/d2/evaluation.py;
- a loss that becomes NaN / inf stops the run with ``TrainingDiverged`` and a message that says
  what usually causes it, instead of a bare FloatingPointError;
- detectron2's training log goes to ``train_log.json``: ``metrics.json`` in a run folder is ours;
- the losses and the heads' statistics are read back from the GPU once per step, after the
  optimizer's update is queued, rather than one ``.item()`` at a time (step_scalars.py);
- training batches are loaded in a background thread and reach the GPU without blocking copies
  (prefetch.py).

Kept from DefaultTrainer: precise BN (``TEST.PRECISE_BN``, run before the final evaluation), AMP
(``SOLVER.AMP.ENABLED`` selects detectron2's AMPTrainer), checkpoints and resume, DDP.
"""
from __future__ import annotations

import os

import numpy as np
from detectron2.data import DatasetMapper, build_detection_test_loader, build_detection_train_loader
from detectron2.engine import DefaultTrainer
from detectron2.utils import comm
from detectron2.utils.events import CommonMetricPrinter, JSONWriter, TensorboardXWriter, get_event_storage

from transfer import d2compat
from transfer.d2 import (
    densepose,
    evaluation,
    prefetch,
    semseg,  # also registers FCNHead
    step_scalars,
)
from transfer.d2.checkpoint import AtomicCheckpointer


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or infinite."""


def _mapper(cfg, is_train: bool):
    # Semantic segmentation reads label images and augments by rescaling + cropping (semseg.py).
    if cfg.MODEL.META_ARCHITECTURE == "SemanticSegmentor":
        return semseg.SemSegMapper(cfg, is_train)
    return DatasetMapper(cfg, is_train=is_train)


def _log_losses(losses: dict[str, float], data_time: float) -> None:
    """detectron2's ``SimpleTrainer.write_metrics``, given the losses as floats."""
    everyone = comm.gather({**losses, "data_time": data_time})
    if comm.is_main_process():
        storage = get_event_storage()
        storage.put_scalar("data_time", max(x.pop("data_time") for x in everyone))  # the slowest sets the pace
        losses = {name: float(np.mean([x[name] for x in everyone])) for name in everyone[0]}
        total = sum(losses.values())
        if not np.isfinite(total):
            raise FloatingPointError(f"Loss became infinite or NaN at iteration={storage.iter}!\nloss_dict = {losses}")
        storage.put_scalar("total_loss", total)
        if len(losses) > 1:
            storage.put_scalars(**losses)


class Trainer(DefaultTrainer):
    def __init__(self, cfg):
        super().__init__(cfg)
        loop = d2compat.training_loop(self)  # detectron2's SimpleTrainer / AMPTrainer, which runs each step
        # It reads each loss back where it logs them, between backward and the optimizer's step; we
        # keep them for the step's one read-back in run_step.
        d2compat.defer_loss_logging(loop, self._keep_losses)
        self.train_loader = loop.data_loader  # the Prefetcher of build_train_loader

    def build_hooks(self):
        self.checkpointer = AtomicCheckpointer.like(self.checkpointer)  # saves whole or not at all (checkpoint.py)
        return super().build_hooks()

    def _keep_losses(self, loss_dict, data_time, prefix=""):
        self._step_losses = (loss_dict, data_time)

    @classmethod
    def build_train_loader(cls, cfg):
        # The training data path: detectron2's mapper (decode, resize, flip) and its
        # aspect-ratio-grouped loader, drawn ahead in a thread if its workers do the mapping.
        if densepose.is_densepose(cfg):  # its loader maps the DensePose categories and dp_* annotations
            loader = densepose.train_loader(cfg)
        else:
            loader = build_detection_train_loader(cfg, mapper=_mapper(cfg, is_train=True))
        return prefetch.Prefetcher(loader, cfg.MODEL.DEVICE, depth=2 if cfg.DATALOADER.NUM_WORKERS else 0)

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        if densepose.is_densepose(cfg):
            return densepose.test_loader(cfg, dataset_name)
        return build_detection_test_loader(cfg, dataset_name, mapper=_mapper(cfg, is_train=False))

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        return evaluation.build_evaluator(cfg.TRANSFER.EVALUATOR, cfg, dataset_name, output_folder)

    def build_writers(self):
        os.makedirs(self.cfg.OUTPUT_DIR, exist_ok=True)
        return [
            CommonMetricPrinter(self.max_iter),
            JSONWriter(os.path.join(self.cfg.OUTPUT_DIR, "train_log.json")),
            TensorboardXWriter(self.cfg.OUTPUT_DIR),
        ]

    def run_step(self):
        try:
            with step_scalars.collect() as scalars:
                super().run_step()
            loss_dict, data_time = self._step_losses
            values = step_scalars.read_back({**scalars, **{f"loss/{k}": v for k, v in loss_dict.items()}})
            _log_losses({name: values[f"loss/{name}"] for name in loss_dict}, data_time)
            self.storage.put_scalars(**{name: values[name] for name in scalars})
            if self.iter == self.max_iter - 1:
                # Stop drawing batches ahead before precise BN and the evaluation start loaders of their own.
                self.train_loader.close()
        except FloatingPointError as e:
            # detectron2 checks the (all-reduced) loss every iteration on the main process.
            raise TrainingDiverged(
                f"training diverged at iteration {self.iter}: the loss is NaN or infinite. "
                "Usual causes: a learning rate too high for the batch size (SOLVER.BASE_LR), "
                "pixel settings that do not match the weights (MODEL.PIXEL_MEAN/PIXEL_STD, "
                "INPUT.FORMAT), keypoints without MODEL.FPN.NORM. "
                f"detectron2 said: {str(e).splitlines()[-1]}"
            ) from e
