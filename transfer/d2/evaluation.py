"""detectron2's evaluators per task kind, and their results as headline and per-class metrics.

A task names its evaluator kind (``voc``, ``coco``, ``lvis``, ``cityscapes_instance``,
``sem_seg``, ``cityscapes_sem_seg``); the kind picks detectron2's evaluator and says where each headline metric
(named as in results/published_results.csv) sits in the evaluator's nested results.

Every evaluator also returns per-class numbers next to its means, named as detectron2's
COCOEvaluator names them (``AP-<class>``; ``AP50-<class>``, ``IoU-<class>``, ``iIoU-<class>``);
``per_class`` collects them. Where detectron2 computes them in a library call and keeps only the
mean (VOC, LVIS, Cityscapes), the subclasses below record that call's result instead of redoing
the evaluation (through transfer/d2compat.py, which knows how each evaluator calls them).

Each evaluator counts the test images and the instances predicted on them (the results'
``predictions`` section). A model that predicts no instance at all gets the metrics' values for
an empty prediction set: AP 0 wherever the ground truth has instances, missing where it has none,
as for any other prediction set. detectron2's COCO and LVIS evaluators give NaN for every metric
instead (and only a ``bbox`` section when the sections are read off the predictions), so for them
``_evaluate_no_predictions`` has pycocotools / lvis score an empty result set for each section the
evaluator was given (``tasks``). VOC's ``voc_eval`` and the Cityscapes script score an empty set 0
themselves; a semantic segmentor labels every pixel, so its IoUs are always numbers. ``run_fields``
turns the counts into metrics.json's ``no_predictions`` and says why each missing value is missing.
"""
from __future__ import annotations

import contextlib
import math
import os
from collections import defaultdict

import numpy as np
from detectron2.data import MetadataCatalog
from detectron2.evaluation import (
    CityscapesInstanceEvaluator,
    CityscapesSemSegEvaluator,
    COCOEvaluator,
    LVISEvaluator,
    PascalVOCDetectionEvaluator,
    SemSegEvaluator,
)
from detectron2.utils import comm

from transfer import d2compat
from transfer.d2 import densepose

PREDICTIONS = "predictions"  # the results' section with the counts: {"images": N, "instances": M}


class _CountingPredictions:
    """Mixin for a detectron2 evaluator (listed first among the bases): counts the images it is
    given and the instances predicted on them into the results' ``predictions`` section; when no
    image got an instance, the sections ``_evaluate_no_predictions()`` returns replace the
    evaluator's (none by default: VOC and Cityscapes score an empty set themselves).
    """

    counts_instances = True  # False for semantic segmentation: every pixel gets a class

    def reset(self):
        super().reset()
        self.images_seen, self.instances_predicted = 0, 0

    def process(self, inputs, outputs):
        super().process(inputs, outputs)
        self.images_seen += len(inputs)
        if self.counts_instances:
            self.instances_predicted += sum(len(output["instances"]) for output in outputs if "instances" in output)

    def evaluate(self, *args, **kwargs):
        counts = comm.gather((self.images_seen, self.instances_predicted), dst=0)  # every process evaluates
        results = super().evaluate(*args, **kwargs)
        if not comm.is_main_process():
            return results
        images, instances = (sum(column) for column in zip(*counts))
        results = dict(results or {})
        if self.counts_instances and images and not instances:
            results.update(self._evaluate_no_predictions())
        results[PREDICTIONS] = {"images": images, **({"instances": instances} if self.counts_instances else {})}
        return results

    def _evaluate_no_predictions(self) -> dict:
        return {}


def _tasks(cfg) -> tuple:
    """The sections a COCO-style evaluator scores, from what the model predicts (not from the
    predictions, which may be none)."""
    return ("bbox",) + (("segm",) if cfg.MODEL.MASK_ON else ()) + (("keypoints",) if cfg.MODEL.KEYPOINT_ON else ())


class _PascalVOCEvaluator(_CountingPredictions, PascalVOCDetectionEvaluator):
    """detectron2's VOC evaluator, plus each class's AP (mean over IoU 0.50:0.95) and AP50.

    detectron2 runs ``voc_eval`` once per class and IoU threshold and keeps only the means over
    classes; the recorded calls give the per-class values of the same computation.
    """

    def evaluate(self):
        with d2compat.recording_voc_eval() as calls:
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


class _COCOEvaluator(_CountingPredictions, COCOEvaluator):
    """detectron2's COCO evaluator, with ``AP-<class>`` also for a dataset of one class.

    COCOEvaluator lists per-category AP only when there are several categories; with one (COCO
    keypoints: person) the section's AP is that category's AP, over the same precision entries.
    """

    def __init__(self, dataset_name, tasks, **kwargs):
        super().__init__(dataset_name, tasks=tasks, **kwargs)
        self.sections = tasks
        self.class_names = MetadataCatalog.get(dataset_name).get("thing_classes") or []

    def evaluate(self, img_ids=None):
        results = super().evaluate(img_ids)
        if results and len(self.class_names) == 1:
            for section in results.values():
                if "AP" in section:
                    section.setdefault(f"AP-{self.class_names[0]}", section["AP"])
        return results

    def _evaluate_no_predictions(self):
        # pycocotools' loadRes reads the first result, so it cannot take an empty list: the empty
        # result set is a COCO() with the ground truth's images and categories and no annotation
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        ground_truth = d2compat.coco_ground_truth(self)
        nothing = COCO()
        nothing.dataset = {**ground_truth.dataset, "annotations": []}
        nothing.createIndex()
        results = {}
        for task in self.sections:
            # with no detection, no OKS (or IoU) is computed: the keypoint sigmas do not matter
            coco_eval = COCOeval(ground_truth, nothing, task)
            coco_eval.evaluate()
            coco_eval.accumulate()
            coco_eval.summarize()
            results[task] = d2compat.derive_coco_results(self, coco_eval, task, self.class_names)
        return results


class _LVISEvaluator(_CountingPredictions, LVISEvaluator):
    """detectron2's LVIS evaluator, plus ``AP-<category>`` per category (LVIS's category names).

    detectron2 builds one ``lvis.LVISEval`` per section and keeps its summary only; the recorded
    evaluations still hold their precision arrays.
    """

    def __init__(self, dataset_name, tasks, **kwargs):
        super().__init__(dataset_name, tasks=tasks, **kwargs)
        self.sections = tasks

    def evaluate(self):
        with d2compat.recording_lvis_eval() as calls:
            results = super().evaluate()
        for arguments, lvis_eval in calls:
            section = arguments["iou_type"]
            if results and section in results and lvis_eval.eval:
                results[section].update(_lvis_per_category(lvis_eval))
        return results

    def _evaluate_no_predictions(self):
        import lvis

        ground_truth = d2compat.lvis_ground_truth(self)
        results = {}
        for task in self.sections:
            # looked up in the module, as detectron2 does, so that evaluate() records it too
            lvis_eval = lvis.LVISEval(ground_truth, d2compat.empty_lvis_results(ground_truth), task)
            lvis_eval.run()
            results[task] = {name: float(value) * 100 for name, value in lvis_eval.get_results().items()
                             if name.startswith("AP")}  # the metrics detectron2 keeps
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


class _CityscapesInstanceEvaluator(_CountingPredictions, CityscapesInstanceEvaluator):
    """detectron2's Cityscapes instance evaluator, plus the official script's per-class AP and AP50.

    cityscapesscripts writes ``matches.json`` into the working directory: keep it in ours.
    """

    def __init__(self, dataset_name, output_dir):
        super().__init__(dataset_name)
        self.output_dir = output_dir

    def evaluate(self):
        import cityscapesscripts.evaluation.evalInstanceLevelSemanticLabeling as cityscapes_eval

        with contextlib.chdir(self.output_dir), d2compat.recording_cityscapes_eval(cityscapes_eval) as calls:
            results = super().evaluate()
        if results and calls:
            for name, scores in calls[-1][1]["averages"]["classes"].items():
                results["segm"][f"AP-{name}"] = float(scores["ap"]) * 100
                results["segm"][f"AP50-{name}"] = float(scores["ap50%"]) * 100
        return results


class _SemSegEvaluator(_CountingPredictions, SemSegEvaluator):
    """detectron2's semantic segmentation evaluator (it has ``IoU-<class>`` already), counting images."""

    counts_instances = False


class _CityscapesSemSegEvaluator(_CountingPredictions, CityscapesSemSegEvaluator):
    """detectron2's call of the official Cityscapes script, plus its per-class IoU (the 19
    evaluated classes) and per-class iIoU (those of them with instances)."""

    counts_instances = False

    def evaluate(self):
        # imported here, as detectron2 does: the script reads CITYSCAPES_DATASET when loaded
        import cityscapesscripts.evaluation.evalPixelLevelSemanticLabeling as cityscapes_eval
        from cityscapesscripts.helpers.labels import name2label

        with d2compat.recording_cityscapes_eval(cityscapes_eval) as calls:
            results = super().evaluate()
        if results and calls:
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
        tasks=_tasks(cfg),
        output_dir=output_dir,
        use_fast_impl=d2compat.coco_fast_eval_available(),
        kpt_oks_sigmas=cfg.TEST.KEYPOINT_OKS_SIGMAS,
    )


EVALUATORS = {
    "voc": lambda cfg, name, out: _PascalVOCEvaluator(name),
    "coco": _coco,
    "lvis": lambda cfg, name, out: _LVISEvaluator(name, tasks=_tasks(cfg), output_dir=out),
    "cityscapes_instance": lambda cfg, name, out: _CityscapesInstanceEvaluator(name, out),
    "sem_seg": lambda cfg, name, out: _SemSegEvaluator(name, output_dir=out),
    "cityscapes_sem_seg": lambda cfg, name, out: _CityscapesSemSegEvaluator(name),  # the official script
    # the DensePose project's bbox and DensePose evaluators (an optional dependency: transfer/d2/densepose.py)
    "densepose": lambda cfg, name, out: densepose.build_evaluator(cfg, name, out),
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
    # DensePose AP under the GPS measure: the paper's AP^dp (the project's GPSm and IoU measures
    # are in all_metrics as densepose_gpsm / densepose_segm)
    "densepose": {"APdp": ("densepose_gps", "AP"), "APdp50": ("densepose_gps", "AP50"),
                  "APdp75": ("densepose_gps", "AP75"), "APbb": ("bbox", "AP")},
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
    "densepose": {"bbox": ("bbox", "AP-")},
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


# Why a value is missing. Detection evaluators leave out what has no ground truth in its scope
# (a class, an object size, an LVIS frequency group); an IoU is 0 / 0 for a class that is neither
# in the ground truth nor predicted.
NO_GROUND_TRUTH = "no ground-truth instance in the test set"
NOT_PRESENT = "neither in the ground truth nor predicted"
NO_VALUE = {
    "APs": "no small ground-truth object (area under 32^2)",
    "APm": "no medium ground-truth object (area 32^2 to 96^2)",
    "APl": "no large ground-truth object (area over 96^2)",
    "APr": "no rare category in the ground truth",
    "APc": "no common category in the ground truth",
    "APf": "no frequent category in the ground truth",
}
SEMANTIC = {"sem_seg", "cityscapes_sem_seg"}


def run_fields(kind: str, results: dict, names) -> dict:
    """What metrics.json says about the evaluation besides its numbers.

    ``no_predictions``: the model predicted no instance on any test image (its APs are then 0,
    not missing); ``images_evaluated``; ``predicted_instances`` (None for semantic segmentation);
    ``not_measured``: ``{"metrics": {headline name: why}, "per_class": {section: {why: [class, ...]}}}``
    for every value that is None in ``headline_metrics`` and ``per_class``.
    """
    counts = results.get(PREDICTIONS) or {}
    images, instances = counts.get("images"), counts.get("instances")
    return {"no_predictions": bool(images) and instances == 0, "images_evaluated": images,
            "predicted_instances": instances, "not_measured": _not_measured(kind, results, names, images)}


def _not_measured(kind: str, results: dict, names, images) -> dict:
    metrics = {}
    missing = [name for name, value in headline_metrics(kind, results, names).items() if value is None]
    for name in missing:
        section, key = HEADLINES[kind][name]
        if images == 0:
            metrics[name] = "no test image was evaluated"
        elif key not in (results.get(section) or {}):
            metrics[name] = "the evaluator returned no value"
        else:
            metrics[name] = NO_VALUE.get(key, NO_GROUND_TRUTH)
    why = NOT_PRESENT if kind in SEMANTIC else NO_GROUND_TRUTH
    classes = {section: [name for name, value in values.items() if value is None]
               for section, values in per_class(kind, results).items()}
    return {"metrics": metrics, "per_class": {section: {why: names} for section, names in classes.items() if names}}


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
