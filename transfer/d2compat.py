"""The one place that knows detectron2-version quirks.

Import this module before anything imports detectron2 (``transfer.d2`` and every other module of
ours that uses detectron2 does ``from transfer import d2compat`` first). Each patch is applied only
when the thing it stands in for is missing, so a compiled detectron2 on an old numpy / Pillow runs
untouched, and installed files are never edited.

Quirks handled (see shared/notes/detectron2-install.md):
- ``detectron2._C`` absent (pure-Python install): a stand-in module that answers the version
  queries ``default_setup()`` makes and raises a clear error for compiled-only ops.
- numpy >= 1.24 removed ``np.str/int/float/bool/object``, used by detectron2 0.6, lvis 0.5.3 and
  cityscapesscripts; numpy >= 2.4 removed ``np.in1d`` (cityscapesscripts' instance evaluation).
- Pillow >= 10 removed ``Image.LINEAR`` (detectron2.data.transforms).
- setuptools >= 82 removed ``pkg_resources`` (detectron2.model_zoo).
"""
from __future__ import annotations

import importlib.resources
import importlib.util
import os
import sys
import types
import warnings

import numpy as np
from PIL import Image

_NUMPY_ALIASES = {"str": str, "int": int, "float": float, "bool": bool, "object": object}


def _missing(module, name: str) -> bool:
    # Older numpy / Pillow still serve these names through a module __getattr__ with a
    # deprecation warning: they are there, so they must not be patched (nor warn here).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return not hasattr(module, name)


def _patch_numpy(numpy=np) -> list[str]:
    patched = []
    for name, value in _NUMPY_ALIASES.items():
        if _missing(numpy, name):
            setattr(numpy, name, value)
            patched.append(f"numpy.{name}")
    if _missing(numpy, "in1d"):
        numpy.in1d = lambda a, b, *args, **kw: np.isin(a, b, *args, **kw).ravel()
        patched.append("numpy.in1d")
    return patched


def _patch_pillow(image=Image) -> list[str]:
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
    """True when the real ``detectron2._C`` is installed (not our stand-in)."""
    module = sys.modules.get("detectron2._C")
    if module is not None:
        return not isinstance(module, _CompiledOpsMissing)
    return importlib.util.find_spec("detectron2") is not None and importlib.util.find_spec("detectron2._C") is not None


def _patch_compiled_ops() -> list[str]:
    if importlib.util.find_spec("detectron2") is None:
        raise ImportError("detectron2 is not installed: run `make setup` (see README, 'Installing detectron2')")
    if has_compiled_ops():
        return []
    stand_in = _CompiledOpsMissing()
    sys.modules["detectron2._C"] = stand_in
    import detectron2

    detectron2._C = stand_in
    return ["detectron2._C"]


def coco_fast_eval_available() -> bool:
    """detectron2's fast COCOeval (``use_fast_impl=True``, its default) lives in the compiled ops."""
    return has_compiled_ops()


PATCHED: list[str] = _patch_numpy() + _patch_pillow() + _patch_pkg_resources() + _patch_compiled_ops()


def allow_cpu_ddp() -> None:
    """detectron2 0.6 wraps models in DDP with ``device_ids=[local rank]``, which only GPU
    models accept; a CPU model (multi-process CPU runs over gloo) needs ``device_ids=None``.
    Called by transfer/d2/launch.py in CPU worker processes only."""
    import detectron2.engine.defaults as defaults

    if getattr(defaults.create_ddp_model, "_cpu_aware", False):
        return
    original = defaults.create_ddp_model

    def create_ddp_model(model, **kwargs):
        if next(model.parameters()).device.type == "cpu":
            kwargs.setdefault("device_ids", None)
        return original(model, **kwargs)

    create_ddp_model._cpu_aware = True
    defaults.create_ddp_model = create_ddp_model


def _patch_checkpoint_resume() -> list[str]:
    """torch >= 2.6 loads with ``weights_only=True`` by default, which refuses the optimizer and
    LR-scheduler objects in detectron2's own training checkpoints, so resuming fails. Only the
    checkpointer's own files (``last_checkpoint`` in its ``save_dir``) are loaded fully; anything
    else (e.g. a user's weights) keeps torch's safe default."""
    import torch

    if tuple(int(part) for part in torch.__version__.split(".")[:2]) < (2, 6):
        return []  # older torch loads everything by default
    from fvcore.common.checkpoint import Checkpointer

    if getattr(Checkpointer._load_file, "_own_checkpoints_trusted", False):
        return []
    original = Checkpointer._load_file

    def _load_file(self, f):
        own = bool(self.save_dir) and os.path.dirname(os.path.abspath(f)) == os.path.abspath(self.save_dir)
        if own and f.endswith(".pth"):
            return torch.load(f, map_location=torch.device("cpu"), weights_only=False)
        return original(self, f)

    _load_file._own_checkpoints_trusted = True
    Checkpointer._load_file = _load_file
    return ["fvcore Checkpointer resume (weights_only)"]


PATCHED += _patch_checkpoint_resume()
