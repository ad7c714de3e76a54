"""detectron2's evaluators per task kind, and their results as headline and per-class metrics.

A task names its evaluator kind (``voc``, ``coco``, ``lvis``, ``cityscapes_instance``,
``sem_seg``, ``cityscapes_sem_seg``); the kind picks detectron2's evaluator and says where each headline metric
(named as in results/published_results.csv) sits in the evaluator's nested results.

Every evaluator also returns per-class numbers next to its means, named as detectron2's
COCOEvaluator names them (``AP-<class>``; ``AP50-<class>``, ``IoU-<class>``, ``iIoU-<class>``);
``per_class`` collects them. Where detectron2 computes them in a library call and keeps only the
mean (VOC, LVIS, Cityscapes), the subclasses below record that call's result instead of redoing
the evaluation.
"""
from __future__ import annotations

import contextlib
import inspect
import math
import os
from collections import defaultdict

import numpy as np

from transfer import d2compat  # noqa: F401  (before any detectron2 import)

from detectron2.data import MetadataCatalog
from detectron2.evaluation import (
    CityscapesInstanceEvaluator,
    CityscapesSemSegEvaluator,
    COCOEvaluator,
    LVISEvaluator,
    PascalVOCDetectionEvaluator,
    SemSegEvaluator,
    pascal_voc_evaluation,
)


@contextlib.contextmanager
def _recording(module, name):
    """Within the block, calls of ``module.name`` (a function or class) are also kept, as
    ``[(arguments by parameter name, result), ...]``.

    The library function looks ``module.name`` up when it runs, so it calls the recorder; the
    original is back in place afterwards, also after an error.
    """
    original = getattr(module, name)
    signature = inspect.signature(original)
    calls = []

    def recorder(*args, **kwargs):
        result = original(*args, **kwargs)
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        calls.append((dict(bound.arguments), result))
        return result

    setattr(module, name, recorder)
    try:
        yield calls
    finally:
        setattr(module, name, original)


class _PascalVOCEvaluator(PascalVOCDetectionEvaluator):
    """detectron2's VOC evaluator, plus each class's AP (mean over IoU 0.50:0.95) and AP50.

    detectron2 runs ``voc_eval`` once per class and IoU threshold and keeps only the means over
    classes; the recorded calls give the per-class values of the same computation.
    """

    def evaluate(self):
        with _recording(pascal_voc_evaluation, "voc_eval") as calls:
            results = super().evaluate()
        if results is None:  # not the main process
            return results
        aps = defaultdict(dict)  # class -> {IoU threshold in %: AP in %}, in the dataset's class order
        for arguments, (_, _, ap) in calls:
            aps[arguments["classname"]][round(arguments["ovthresh"] * 100)] = float(ap) * 100
        for name, by_iou in aps.items():
            results["bbox"][f"AP-{name}"] = float(np.mean(list(by_iou.values())))
            results["bbox"][f"AP50-{name}"] = by_iou[50]
        return results


class _COCOEvaluator(COCOEvaluator):
    """detectron2's COCO evaluator, with ``AP-<class>`` also for a dataset of one class.

    COCOEvaluator lists per-category AP only when there are several categories; with one (COCO
    keypoints: person) the section's AP is that category's AP, over the same precision entries.
    """

    def __init__(self, dataset_name, *args, **kwargs):
        super().__init__(dataset_name, *args, **kwargs)
        self._classes = MetadataCatalog.get(dataset_name).get("thing_classes") or []

    def evaluate(self, img_ids=None):
        results = super().evaluate(img_ids)
        if results and len(self._classes) == 1:
            for section in results.values():
                if "AP" in section:
                    section.setdefault(f"AP-{self._classes[0]}", section["AP"])
        return results


class _LVISEvaluator(LVISEvaluator):
    """detectron2's LVIS evaluator, plus ``AP-<category>`` per category (LVIS's category names).

    detectron2 builds one ``lvis.LVISEval`` per section and keeps its summary only; the recorded
    evaluations still hold their precision arrays.
    """

    def evaluate(self):
        import lvis

        with _recording(lvis, "LVISEval") as calls:
            results = super().evaluate()
        for arguments, lvis_eval in calls:
            section = arguments["iou_type"]
            if results and section in results and lvis_eval.eval:
                results[section].update(_lvis_per_category(lvis_eval))
        return results


def _lvis_per_category(lvis_eval) -> dict:
    """``{"AP-<name>": AP}`` as LVISEval's summary averages: the precision entries that are not -1
    (IoU 0.50:0.95, all recalls, area "all"); NaN for a category with none."""
    precision = lvis_eval.eval["precision"]  # [IoU threshold, recall, category, area]
    area_all = lvis_eval.params.area_rng_lbl.index("all")
    categories = lvis_eval.lvis_gt.load_cats(lvis_eval.params.cat_ids)  # the order of precision's axis 2
    out = {}
    for k, category in enumerate(categories):
        values = precision[:, :, k, area_all]
        values = values[values > -1]
        out[f"AP-{category['name']}"] = float(values.mean() * 100) if values.size else float("nan")
    return out


class _CityscapesInstanceEvaluator(CityscapesInstanceEvaluator):
    """detectron2's Cityscapes instance evaluator, plus the official script's per-class AP and AP50.

    cityscapesscripts writes ``matches.json`` into the working directory: keep it in ours.
    """

    def __init__(self, dataset_name, output_dir):
        super().__init__(dataset_name)
        self._output_dir = output_dir

    def evaluate(self):
        import cityscapesscripts.evaluation.evalInstanceLevelSemanticLabeling as cityscapes_eval

        with contextlib.chdir(self._output_dir), _recording(cityscapes_eval, "evaluateImgLists") as calls:
            results = super().evaluate()
        if results:
            for name, scores in calls[-1][1]["averages"]["classes"].items():
                results["segm"][f"AP-{name}"] = float(scores["ap"]) * 100
                results["segm"][f"AP50-{name}"] = float(scores["ap50%"]) * 100
        return results


class _CityscapesSemSegEvaluator(CityscapesSemSegEvaluator):
    """detectron2's call of the official Cityscapes script, plus its per-class IoU (the 19
    evaluated classes) and per-class iIoU (those of them with instances)."""

    def evaluate(self):
        # imported here, as detectron2 does: the script reads CITYSCAPES_DATASET when loaded
        import cityscapesscripts.evaluation.evalPixelLevelSemanticLabeling as cityscapes_eval
        from cityscapesscripts.helpers.labels import name2label

        with _recording(cityscapes_eval, "evaluateImgLists") as calls:
            results = super().evaluate()
        if results:
            scores = calls[-1][1]
            for name, iou in scores["classScores"].items():
                label = name2label[name]
                if label.ignoreInEval:  # listed with NaN, never scored
                    continue
                results["sem_seg"][f"IoU-{name}"] = float(iou) * 100
                if label.hasInstances:
                    results["sem_seg"][f"iIoU-{name}"] = float(scores["classInstScores"][name]) * 100
        return results


def _coco(cfg, dataset_name, output_dir):
    # detectron2's fast COCOeval lives in its compiled ops; pycocotools gives the same numbers.
    return _COCOEvaluator(
        dataset_name,
        output_dir=output_dir,
        use_fast_impl=d2compat.coco_fast_eval_available(),
        kpt_oks_sigmas=cfg.TEST.KEYPOINT_OKS_SIGMAS,
    )


EVALUATORS = {
    "voc": lambda cfg, name, out: _PascalVOCEvaluator(name),
    "coco": _coco,
    "lvis": lambda cfg, name, out: _LVISEvaluator(name, output_dir=out),
    "cityscapes_instance": lambda cfg, name, out: _CityscapesInstanceEvaluator(name, out),
    "sem_seg": lambda cfg, name, out: SemSegEvaluator(name, output_dir=out),  # has IoU-<class> already
    "cityscapes_sem_seg": lambda cfg, name, out: _CityscapesSemSegEvaluator(name),  # the official script
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


# per-class section -> (section of the evaluator's results, prefix of its per-class keys). The
# section's own name holds the primary metric (AP, or IoU); "<section>/<metric>" a second one.
PER_CLASS = {
    "voc": {"bbox": ("bbox", "AP-"), "bbox/AP50": ("bbox", "AP50-")},
    "coco": {section: (section, "AP-") for section in ("bbox", "segm", "keypoints")},
    "lvis": {section: (section, "AP-") for section in ("bbox", "segm")},
    "cityscapes_instance": {"segm": ("segm", "AP-"), "segm/AP50": ("segm", "AP50-")},
    "sem_seg": {"sem_seg": ("sem_seg", "IoU-")},
    "cityscapes_sem_seg": {"sem_seg": ("sem_seg", "IoU-"), "sem_seg/iIoU": ("sem_seg", "iIoU-")},
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
        out[name] = _measured(results.get(section, {}).get(key))
    return out


def per_class(kind: str, results: dict) -> dict:
    """``{section: {class name: value}}`` from the evaluator's ``results``; values in 0..100, None
    where the evaluator could not measure the class (no ground truth; NaN or a negative sentinel).

    Sections (those the results have): ``voc``: "bbox" (AP over IoU 0.50:0.95) and "bbox/AP50";
    ``coco``: "bbox", "segm", "keypoints" (AP); ``lvis``: "bbox", "segm" (AP, every category of
    the LVIS json); ``cityscapes_instance``: "segm" and "segm/AP50" (the official script's);
    ``sem_seg``: "sem_seg" (IoU); ``cityscapes_sem_seg``: "sem_seg" (IoU) and "sem_seg/iIoU" (the
    classes with instances).
    """
    if kind not in PER_CLASS:
        raise KeyError(f"unknown evaluator kind {kind!r}; known: {sorted(PER_CLASS)}")
    out = {}
    for name, (section, prefix) in PER_CLASS[kind].items():
        values = {key[len(prefix):]: _measured(value) for key, value in (results.get(section) or {}).items()
                  if key.startswith(prefix)}
        if values:
            out[name] = values
    return out


def _measured(value):
    # None, NaN (COCO, VOC, Cityscapes) and negative sentinels (LVIS: -1, -100) all mean "not measured"
    return None if value is None or math.isnan(value) or value < 0 else float(value)


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
