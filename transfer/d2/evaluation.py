"""detectron2's evaluators per task kind, and their results as flat headline metrics.

A task names its evaluator kind (``voc``, ``coco``, ``lvis``, ``cityscapes_instance``,
``sem_seg``, ``cityscapes_sem_seg``); the kind picks detectron2's evaluator and says where each headline metric
(named as in results/published_results.csv) sits in the evaluator's nested results.
"""
from __future__ import annotations

import contextlib
import math
import os

from transfer import d2compat  # noqa: F401  (before any detectron2 import)

from detectron2.evaluation import (
    CityscapesInstanceEvaluator,
    CityscapesSemSegEvaluator,
    CityscapesSemSegEvaluator,
    COCOEvaluator,
    LVISEvaluator,
    PascalVOCDetectionEvaluator,
    SemSegEvaluator,
)


class _CityscapesInstanceEvaluator(CityscapesInstanceEvaluator):
    """cityscapesscripts writes ``matches.json`` into the working directory: keep it in ours."""

    def __init__(self, dataset_name, output_dir):
        super().__init__(dataset_name)
        self._output_dir = output_dir

    def evaluate(self):
        with contextlib.chdir(self._output_dir):
            return super().evaluate()


def _coco(cfg, dataset_name, output_dir):
    # detectron2's fast COCOeval lives in its compiled ops; pycocotools gives the same numbers.
    return COCOEvaluator(
        dataset_name,
        output_dir=output_dir,
        use_fast_impl=d2compat.coco_fast_eval_available(),
        kpt_oks_sigmas=cfg.TEST.KEYPOINT_OKS_SIGMAS,
    )


EVALUATORS = {
    "voc": lambda cfg, name, out: PascalVOCDetectionEvaluator(name),
    "coco": _coco,
    "lvis": lambda cfg, name, out: LVISEvaluator(name, output_dir=out),
    "cityscapes_instance": lambda cfg, name, out: _CityscapesInstanceEvaluator(name, out),
    "sem_seg": lambda cfg, name, out: SemSegEvaluator(name, output_dir=out),
    "cityscapes_sem_seg": lambda cfg, name, out: CityscapesSemSegEvaluator(name),  # the official script
}

# headline metric -> (section, key) of the evaluator's results
HEADLINES = {
    "voc": {"AP": ("bbox", "AP"), "AP50": ("bbox", "AP50"), "AP75": ("bbox", "AP75")},
    "coco": {
        "APbb": ("bbox", "AP"), "APbb50": ("bbox", "AP50"), "APbb75": ("bbox", "AP75"),
        "APmk": ("segm", "AP"), "APmk50": ("segm", "AP50"), "APmk75": ("segm", "AP75"),
        "APkp": ("keypoints", "AP"), "APkp50": ("keypoints", "AP50"), "APkp75": ("keypoints", "AP75"),
    },
    "lvis": {
        "APmk": ("segm", "AP"), "APmk50": ("segm", "AP50"), "APmk75": ("segm", "AP75"),
        "APr": ("segm", "APr"), "APc": ("segm", "APc"), "APf": ("segm", "APf"),
        "APbb": ("bbox", "AP"), "APbb50": ("bbox", "AP50"), "APbb75": ("bbox", "AP75"),
    },
    "cityscapes_instance": {"APmk": ("segm", "AP"), "APmk50": ("segm", "AP50")},
    "sem_seg": {"mIoU": ("sem_seg", "mIoU"), "fwIoU": ("sem_seg", "fwIoU"), "mACC": ("sem_seg", "mACC")},
    "cityscapes_sem_seg": {"mIoU": ("sem_seg", "IoU"), "iIoU": ("sem_seg", "iIoU")},
}


def build_evaluator(kind: str, cfg, dataset_name: str, output_dir: str):
    if kind not in EVALUATORS:
        raise KeyError(f"unknown evaluator kind {kind!r}; known: {sorted(EVALUATORS)}")
    os.makedirs(output_dir, exist_ok=True)
    return EVALUATORS[kind](cfg, dataset_name, output_dir)


def headline_metrics(kind: str, results: dict, names) -> dict:
    """``{name: value}`` for the headline ``names``; None where the evaluator could not measure it.

    Evaluators mark "not measurable" differently (LVIS: -100 for a frequency group with no
    categories, COCO: NaN); both become None so that reports never average a sentinel.
    """
    table = HEADLINES[kind]
    unknown = [n for n in names if n not in table]
    if unknown:
        raise KeyError(f"{kind} evaluator has no metric {unknown}; it has {sorted(table)}")
    out = {}
    for name in names:
        section, key = table[name]
        value = results.get(section, {}).get(key)
        out[name] = None if value is None or math.isnan(value) or value < 0 else float(value)
    return out


def json_safe(results):
    """The evaluator's nested results with NaN / numpy numbers turned into JSON values."""
    if isinstance(results, dict):
        return {str(k): json_safe(v) for k, v in results.items()}
    if isinstance(results, (list, tuple)):
        return [json_safe(v) for v in results]
    if hasattr(results, "item"):  # numpy / torch scalar
        results = results.item()
    if isinstance(results, float) and not math.isfinite(results):
        return None
    return results
