"""The one place that knows detectron2-version quirks and reaches into detectron2's private internals.

Applied once per process: ``transfer/__init__.py`` calls ``install()``, so whichever module of ours
(or a tool, a test) comes first, the first import of detectron2, lvis or cityscapesscripts in the
process applies the patches below before that library's code runs. Nothing is imported before then,
so tools that never touch detectron2 (reports, the suite's planning, pre-training) pay nothing. Each
patch is applied only when the thing it stands in for is missing, so a compiled detectron2 on an old
numpy / Pillow runs untouched, and installed files are never edited.

Quirks handled (see shared/notes/detectron2-install.md):
- ``detectron2._C`` absent (pure-Python install): a stand-in module that answers the version
  queries ``default_setup()`` makes and raises a clear error for compiled-only ops.
- numpy >= 1.24 removed ``np.str/int/float/bool/object``, used by detectron2 0.6, lvis 0.5.3 and
  cityscapesscripts; numpy >= 2.4 removed ``np.in1d`` (cityscapesscripts' instance evaluation).
- Pillow >= 10 removed ``Image.LINEAR`` (detectron2.data.transforms).
- setuptools >= 82 removed ``pkg_resources`` (detectron2.model_zoo).
- torch >= 2.6 refuses detectron2's own training checkpoints by default (resume).

Private internals: where detectron2 (or lvis, cityscapesscripts) has no public hook for what our
extensions do, they go through the functions at the end of this module, one per private attribute.
Each checks the attribute against the installed version when used (and a private method our classes
override, when the class is defined: ``overrides``): if it is missing or its parameters changed, one
line names it, the installed version and the version this module was written against.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.abc
import importlib.machinery
import importlib.metadata
import importlib.resources
import importlib.util
import inspect
import logging
import os
import sys
import types
import warnings

_NUMPY_ALIASES = {"str": str, "int": int, "float": float, "bool": bool, "object": object}
# The libraries whose first import applies the patches (lvis and cityscapesscripts need numpy's aliases).
PATCHED_BEFORE = ("detectron2", "lvis", "cityscapesscripts")
PATCHED: list[str] = []  # what apply() patched, once it ran


def _missing(module, name: str) -> bool:
    # Older numpy / Pillow still serve these names through a module __getattr__ with a
    # deprecation warning: they are there, so they must not be patched (nor warn here).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return not hasattr(module, name)


def _patch_numpy(numpy=None) -> list[str]:
    import numpy as np

    numpy = np if numpy is None else numpy
    patched = []
    for name, value in _NUMPY_ALIASES.items():
        if _missing(numpy, name):
            setattr(numpy, name, value)
            patched.append(f"numpy.{name}")
    if _missing(numpy, "in1d"):
        numpy.in1d = lambda a, b, *args, **kw: np.isin(a, b, *args, **kw).ravel()
        patched.append("numpy.in1d")
    return patched


def _patch_pillow(image=None) -> list[str]:
    if image is None:
        from PIL import Image as image
    if _missing(image, "LINEAR"):
        image.LINEAR = image.BILINEAR
        return ["PIL.Image.LINEAR"]
    return []


def _patch_pkg_resources() -> list[str]:
    if importlib.util.find_spec("pkg_resources") is not None:
        return []
    shim = types.ModuleType("pkg_resources")

    def resource_filename(package: str, resource: str) -> str:
        return str(importlib.resources.files(package).joinpath(resource))

    shim.resource_filename = resource_filename
    sys.modules["pkg_resources"] = shim
    return ["pkg_resources"]


class _CompiledOpsMissing(types.ModuleType):
    """Stand-in for ``detectron2._C`` when detectron2 was installed without its C++/CUDA ops."""

    def __init__(self):
        super().__init__("detectron2._C")
        self.__file__ = __file__

    @staticmethod
    def get_compiler_version() -> str:
        return "none (pure-Python detectron2)"

    @staticmethod
    def get_cuda_version() -> str:
        return "none"

    @staticmethod
    def has_cuda() -> bool:
        return False

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        raise RuntimeError(
            f"detectron2._C.{name} needs detectron2's compiled ops, which this install lacks; "
            "install detectron2 from source to use it (README, 'Installing detectron2')"
        )


def has_compiled_ops() -> bool:
    """True when the real ``detectron2._C`` is installed (not our stand-in). Imports nothing."""
    module = sys.modules.get("detectron2._C")
    if module is not None:
        return not isinstance(module, _CompiledOpsMissing)
    package = importlib.util.find_spec("detectron2")
    return package is not None and importlib.machinery.PathFinder.find_spec(
        "detectron2._C", package.submodule_search_locations) is not None


def _patch_compiled_ops() -> list[str]:
    # Registered without importing detectron2 (this runs while it is being imported): its modules
    # import the ops as ``from detectron2 import _C``, which finds the stand-in in sys.modules.
    if importlib.util.find_spec("detectron2") is None or has_compiled_ops():
        return []
    stand_in = sys.modules["detectron2._C"] = _CompiledOpsMissing()
    if "detectron2" in sys.modules:  # imported already (install() after it): set its attribute too
        sys.modules["detectron2"]._C = stand_in
    return ["detectron2._C"]


def coco_fast_eval_available() -> bool:
    """detectron2's fast COCOeval (``use_fast_impl=True``, its default) lives in the compiled ops."""
    return has_compiled_ops()


def _patch_checkpoint_resume() -> list[str]:
    """torch >= 2.6 loads with ``weights_only=True`` by default, which refuses the optimizer and
    LR-scheduler objects in detectron2's own training checkpoints, so resuming fails. Only the
    checkpointer's own files (``last_checkpoint`` in its ``save_dir``) are loaded fully; anything
    else (e.g. a user's weights) keeps torch's safe default."""
    if importlib.util.find_spec("fvcore") is None:
        return []  # detectron2 is missing too: its import fails on its own
    import torch

    if tuple(int(part) for part in torch.__version__.split(".")[:2]) < (2, 6):
        return []  # older torch loads everything by default
    from fvcore.common.checkpoint import Checkpointer

    original = _check_function(Checkpointer, "_load_file", ("self", "f"), package="fvcore")
    if getattr(original, "_own_checkpoints_trusted", False):
        return []

    def _load_file(self, f):
        own = bool(self.save_dir) and os.path.dirname(os.path.abspath(f)) == os.path.abspath(self.save_dir)
        if own and f.endswith(".pth"):
            return torch.load(f, map_location=torch.device("cpu"), weights_only=False)
        return original(self, f)

    _load_file._own_checkpoints_trusted = True
    Checkpointer._load_file = _load_file
    return ["fvcore Checkpointer resume (weights_only)"]


_applied = False


def apply() -> list[str]:
    """Apply every patch this stack needs (once; later calls do nothing) and return what was patched."""
    global _applied
    if not _applied:
        _applied = True
        PATCHED.extend(_patch_numpy() + _patch_pillow() + _patch_pkg_resources() + _patch_compiled_ops()
                       + _patch_checkpoint_resume())
    return PATCHED


class _PatchOnFirstImport(importlib.abc.MetaPathFinder):
    """Asked first where any module is; when it is one of ``PATCHED_BEFORE``, applies the patches
    (once) and lets the usual finders find it. Leaves once detectron2 is loading (its first submodule
    is looked for), after giving it the compiled-ops stand-in as its ``_C`` attribute."""

    def find_spec(self, name, path=None, target=None):
        if name in PATCHED_BEFORE:
            apply()
        elif name.startswith("detectron2."):
            sys.meta_path.remove(self)
            stand_in = sys.modules.get("detectron2._C")
            if isinstance(stand_in, _CompiledOpsMissing):
                sys.modules["detectron2"]._C = stand_in


def install() -> None:
    """Apply the patches before the first import of detectron2, lvis or cityscapesscripts (at once
    when one of them is imported already)."""
    if any(name in sys.modules for name in PATCHED_BEFORE):
        apply()
    elif not any(isinstance(finder, _PatchOnFirstImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _PatchOnFirstImport())


def allow_cpu_ddp() -> None:
    """detectron2 0.6 wraps models in DDP with ``device_ids=[local rank]``, which only GPU
    models accept; a CPU model (multi-process CPU runs over gloo) needs ``device_ids=None``.
    Called by transfer/d2/launch.py in CPU worker processes only."""
    from detectron2.engine import defaults

    if getattr(defaults.create_ddp_model, "_cpu_aware", False):
        return
    original = defaults.create_ddp_model

    def create_ddp_model(model, **kwargs):
        if next(model.parameters()).device.type == "cpu":
            kwargs.setdefault("device_ids", None)
        return original(model, **kwargs)

    create_ddp_model._cpu_aware = True
    defaults.create_ddp_model = create_ddp_model


# ---------------------------------------------------------------------------------------------
# Private internals, one function per attribute, each checked against the installed version.

# The releases whose private internals the functions below were written against.
WRITTEN_FOR = {"detectron2": "0.6", "lvis": "0.5.3", "cityscapesscripts": "2.3.0",
               "fvcore": "0.1.5.post20221221"}
_ABSENT = object()


class InternalsChanged(RuntimeError):
    """A private attribute of detectron2 (lvis, cityscapesscripts, fvcore) that we use is missing or changed."""


def installed_version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:  # e.g. detectron2 as a plain folder on PYTHONPATH
        return str(getattr(sys.modules.get(package), "__version__", "unknown"))


def _changed(owner, name: str, package: str) -> InternalsChanged:
    where = getattr(owner, "__qualname__", None) or getattr(owner, "__name__", None) or type(owner).__qualname__
    return InternalsChanged(
        f"{package} {installed_version(package)}: {where}.{name} is missing or changed; transfer/d2compat.py "
        f"uses it as in {package} {WRITTEN_FOR[package]} (install that version, or update d2compat.py)")


def _parameters(function) -> tuple[str, ...]:
    if isinstance(function, (classmethod, staticmethod)):
        function = function.__func__
    return tuple(inspect.signature(function).parameters)


def _check_function(owner, name: str, parameters: tuple[str, ...], package: str = "detectron2"):
    """``owner.name`` (a class or module's function, as defined), if its parameters are ``parameters``."""
    _verify_function(owner, name, parameters, package)
    return getattr(owner, name)


@functools.cache  # (once per function: some are called every training step)
def _verify_function(owner, name: str, parameters: tuple[str, ...], package: str) -> None:
    function = inspect.getattr_static(owner, name, _ABSENT)
    if function is _ABSENT or not callable(getattr(owner, name)) or _parameters(function) != parameters:
        raise _changed(owner, name, package)


def _attribute(owner, name: str, package: str = "detectron2"):
    """``owner.name`` (a private data attribute), if it is there."""
    value = getattr(owner, name, _ABSENT)
    if value is _ABSENT:
        raise _changed(owner, name, package)
    return value


def overrides(parent: type):
    """Marks a method that overrides a private method of detectron2's ``parent`` (no public hook does
    what it does): checked when the class is defined, same name and parameters."""

    def check(method):
        _check_function(parent, method.__name__, _parameters(method))
        return method

    return check


# Training (transfer/d2/trainer.py, launch.py)
def training_loop(trainer):
    """``DefaultTrainer._trainer``: the SimpleTrainer / AMPTrainer that runs each step (``.data_loader``,
    ``.model`` and ``.optimizer`` are public on it)."""
    from detectron2.engine import SimpleTrainer

    loop = _attribute(trainer, "_trainer")
    if not isinstance(loop, SimpleTrainer):
        raise _changed(trainer, "_trainer", "detectron2")
    return loop


def defer_loss_logging(loop, keep) -> None:
    """``SimpleTrainer._write_metrics``, which each step calls between backward and the optimizer's
    step to read every loss back (one ``.item()`` each), replaced by ``keep(loss_dict, data_time, prefix="")``."""
    _check_function(type(loop), "_write_metrics", ("self", "loss_dict", "data_time", "prefix"))
    loop._write_metrics = keep


def set_local_process_group(group) -> None:
    """``comm._LOCAL_PROCESS_GROUP``: the per-machine group detectron2's comm helpers (get_local_rank,
    ...) read, which its launch sets."""
    from detectron2.utils import comm

    _attribute(comm, "_LOCAL_PROCESS_GROUP")
    comm._LOCAL_PROCESS_GROUP = group


def find_free_port() -> int:
    """``launch._find_free_port``: a free TCP port on this machine, as detectron2's launch picks one."""
    launch = importlib.import_module("detectron2.engine.launch")  # (detectron2.engine.launch is also a function)
    return _check_function(launch, "_find_free_port", ())()


# Models (transfer/d2/rpn.py)
def decode_proposals(rpn, anchors, pred_anchor_deltas):
    """``RPN._decode_proposals``: each level's proposal boxes from its anchors and predicted deltas."""
    return _check_function(type(rpn), "_decode_proposals", ("self", "anchors", "pred_anchor_deltas"))(
        rpn, anchors, pred_anchor_deltas)


# Datasets (transfer/datasets/catalog.py)
def builtin_metadata(key: str) -> dict:
    """``builtin_meta._get_builtin_metadata``: class names, colours, keypoints of detectron2's builtin datasets."""
    from detectron2.data.datasets import builtin_meta

    return _check_function(builtin_meta, "_get_builtin_metadata", ("dataset_name",))(key)


# Evaluation (transfer/d2/evaluation.py)
def coco_ground_truth(evaluator):
    """``COCOEvaluator._coco_api``: the pycocotools COCO of the test set's ground truth."""
    return _attribute(evaluator, "_coco_api")


def derive_coco_results(evaluator, coco_eval, iou_type: str, class_names) -> dict:
    """``COCOEvaluator._derive_coco_results``: a COCOeval's summary as detectron2's results section."""
    derive = _check_function(type(evaluator), "_derive_coco_results", ("self", "coco_eval", "iou_type", "class_names"))
    return derive(evaluator, coco_eval, iou_type, class_names=class_names)


def lvis_ground_truth(evaluator):
    """``LVISEvaluator._lvis_api``: the lvis.LVIS of the test set's ground truth."""
    return _attribute(evaluator, "_lvis_api")


def empty_lvis_results(lvis_gt):
    """An ``lvis.LVISResults`` with no detection. Its constructor reads the first result to tell
    boxes from masks, so it cannot take an empty list; this is what it would build from one
    (``LVISResults._create_index`` over the ground truth's images and categories)."""
    from lvis import LVISResults

    create_index = _check_function(LVISResults, "_create_index", ("self",), package="lvis")
    results = LVISResults.__new__(LVISResults)
    results.logger = logging.getLogger("lvis.results")
    results.dataset = {**lvis_gt.dataset, "annotations": []}
    create_index(results)
    return results


@contextlib.contextmanager
def _recording(module, name: str, parameters: tuple[str, ...], package: str):
    """Within the block, calls of ``module.name`` (a function or class) are also kept, as
    ``[(arguments by parameter name, result), ...]``.

    The evaluator looks ``module.name`` up when it runs, so it calls the recorder; the original is
    back in place afterwards, also after an error.
    """
    original = _check_function(module, name, parameters, package=package)
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


def recording_voc_eval():
    """PascalVOCDetectionEvaluator's calls of ``pascal_voc_evaluation.voc_eval`` (one per class and IoU
    threshold; it keeps only their means)."""
    from detectron2.evaluation import pascal_voc_evaluation

    return _recording(pascal_voc_evaluation, "voc_eval", ("detpath", "annopath", "imagesetfile", "classname",
                                                          "ovthresh", "use_07_metric"), "detectron2")


def recording_lvis_eval():
    """LVISEvaluator's ``lvis.LVISEval`` objects (one per section; it keeps only their summaries)."""
    import lvis

    return _recording(lvis, "LVISEval", ("lvis_gt", "lvis_dt", "iou_type"), "lvis")


# cityscapesscripts' two evaluation scripts, by module name -> the parameters of their evaluateImgLists
_CITYSCAPES_SCRIPTS = {
    "evalInstanceLevelSemanticLabeling": ("predictionList", "groundTruthList", "args"),
    "evalPixelLevelSemanticLabeling": ("predictionImgList", "groundTruthImgList", "args"),
}


def recording_cityscapes_eval(script):
    """The Cityscapes evaluators' calls of the official ``script.evaluateImgLists`` (``script``: the
    instance- or pixel-level evaluation module; they keep only its means)."""
    parameters = _CITYSCAPES_SCRIPTS[script.__name__.rpartition(".")[2]]
    return _recording(script, "evaluateImgLists", parameters, "cityscapesscripts")
