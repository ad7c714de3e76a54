"""Fine-tuning speed: s/iter, images/s and peak memory of a task's training step, per precision.

The step is the one a real run takes: the task's resolved config (``finetune.resolve_config``),
our ``Trainer`` (detectron2's data loader, model, optimizer; AMPTrainer for ``amp``), timed over
``iters`` steps after ``warmup``. Data time is the loader's share of the step, as detectron2's
trainer measures it. Weights: given, or a random-init ResNet-50 converted on the fly (the issue's
"random init" protocol); the config's norms apply (``opts`` may override them, e.g. to BN).
"""
from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from transfer import d2compat  # noqa: F401  (before any detectron2 import)

import torch

from transfer.finetune import resolve_config
from transfer.tasks import get_task


@dataclass
class StepTiming:
    task: str
    precision: str
    batch: int
    s_per_iter: float
    data_s_per_iter: float
    peak_memory_gib: float | None

    @property
    def images_per_s(self) -> float:
        return self.batch / self.s_per_iter


def random_init_weights(folder) -> Path:
    """A random torchvision ResNet-50, converted: the backbone detectron2 builds, random weights."""
    import torchvision

    from transfer.convert import convert

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    source = folder / "random_resnet50.pth"
    torch.save(torchvision.models.resnet50().state_dict(), source)
    return convert(source).weights_path


def time_steps(task_name: str, weights, precision: str, schedule: str = "demo", batch: int | None = None,
               warmup: int = 3, iters: int = 10, datasets_root=None, opts=()) -> StepTiming:
    from detectron2.utils.events import EventStorage

    from transfer.d2.trainer import Trainer
    from transfer.datasets import catalog

    task = get_task(task_name)
    catalog.register_all(datasets_root)
    catalog.check([*task.train], datasets_root)
    extra = list(opts) + (["SOLVER.IMS_PER_BATCH", batch] if batch else [])
    with tempfile.TemporaryDirectory() as out:
        cfg = resolve_config(task, weights, schedule, output_dir=out, opts=extra, amp=precision == "amp")
        trainer = Trainer(cfg)
        trainer.resume_or_load(resume=False)
        trainer.iter = trainer.start_iter = 0
        cuda = cfg.MODEL.DEVICE == "cuda"
        step_times, data_times = [], []
        with EventStorage(0) as trainer.storage:
            for i in range(warmup + iters):
                if cuda and i == warmup:
                    torch.cuda.reset_peak_memory_stats()
                trainer.storage.iter = trainer.iter = i
                start = time.perf_counter()
                trainer.run_step()
                if cuda:
                    torch.cuda.synchronize()
                if i >= warmup:
                    step_times.append(time.perf_counter() - start)
                    data_times.append(trainer.storage.history("data_time").latest())
        peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    return StepTiming(task.name, precision, cfg.SOLVER.IMS_PER_BATCH, statistics.median(step_times),
                      statistics.median(data_times), peak)


def markdown(rows: list[StepTiming]) -> str:
    lines = ["| task | precision | batch | s/iter | data s/iter | img/s | peak GiB |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        peak = f"{r.peak_memory_gib:.1f}" if r.peak_memory_gib is not None else "n/a"
        lines.append(f"| {r.task} | {r.precision} | {r.batch} | {r.s_per_iter:.3f} | {r.data_s_per_iter:.3f} "
                     f"| {r.images_per_s:.1f} | {peak} |")
    return "\n".join(lines)
