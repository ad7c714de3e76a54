"""Checkpoint layouts the converter reads, recognised by content, and torchvision -> detectron2 names.

A checkpoint is read without running any code it might carry: PyTorch files through
``torch.load(weights_only=True)``; detectron2 weight files (plain pickles of numpy arrays) through an
unpickler that can build numpy arrays and nothing else.

Every supported pre-training layout holds a torchvision ResNet somewhere inside it; a ``Layout``
says where (which top-level entry, which key prefix). Everything outside that ResNet (the key
encoder, the queue, the predictor) and its classifier / projection head (``fc.*``) is dropped.
"""
from __future__ import annotations

import io
import pickle
import re
import warnings
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from transfer.errors import UserError


@dataclass(frozen=True)
class Layout:
    name: str
    description: str
    container: str | None  # top-level entry holding the state dict; None: the file is the state dict
    prefix: str  # key prefix of the ResNet inside that state dict


# Tried in this order; the first layout whose ResNet stem and first block are present wins.
LAYOUTS = (
    Layout("moco-v1/v2", "official MoCo v1/v2 and moco-transfer: state_dict / module.encoder_q.*",
           "state_dict", "module.encoder_q."),
    Layout("moco-v3", "MoCo v3 ResNet: state_dict / module.base_encoder.*", "state_dict", "module.base_encoder."),
    Layout("torchvision", "plain torchvision ResNet state dict, e.g. a supervised baseline", None, ""),
    Layout("imagenet-example", "pytorch/examples ImageNet training: state_dict / module.*", "state_dict", "module."),
)

DETECTRON2 = Layout(
    "detectron2", "already converted detectron2 weights: pickle of {'model': {name: array}, '__author__': ...} "
    "or Caffe2/Detectron1 blobs", "model", "")

_REQUIRED = ("conv1.weight", "layer1.0.conv1.weight")  # stem and first block of any torchvision ResNet

# torchvision name -> detectron2 name, inside one residual block (layerN.M.*) and in the stem.
_BLOCK = re.compile(r"layer([1-4])\.(\d+)\.(.+)")
_BLOCK_RENAMES = (
    (re.compile(r"conv(\d)\.weight"), r"conv\1.weight"),
    (re.compile(r"bn(\d)\.(\w+)"), r"conv\1.norm.\2"),
    (re.compile(r"downsample\.0\.weight"), r"shortcut.weight"),
    (re.compile(r"downsample\.1\.(\w+)"), r"shortcut.norm.\1"),
)
_STEM_RENAMES = (
    (re.compile(r"conv1\.weight"), r"stem.conv1.weight"),
    (re.compile(r"bn1\.(\w+)"), r"stem.conv1.norm.\1"),
)
_HEAD = re.compile(r"fc(\.\w+)+")  # classifier (torchvision), projection MLP (MoCo v2 fc.0/fc.2, v3 fc.*)


def detectron2_name(name: str) -> str | None:
    """detectron2 ResNet name of a torchvision ResNet key (``layer1.0.bn2.weight`` ->
    ``res2.0.conv2.norm.weight``); None when the key is not part of a torchvision ResNet backbone."""
    block = _BLOCK.fullmatch(name)
    if block:
        stage, index, rest = block.groups()
        prefix, renames = f"res{int(stage) + 1}.{index}.", _BLOCK_RENAMES
    else:
        prefix, rest, renames = "", name, _STEM_RENAMES
    for pattern, replacement in renames:
        match = pattern.fullmatch(rest)
        if match:
            return prefix + match.expand(replacement)
    return None


# --- reading files -------------------------------------------------------------------------------

class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler for detectron2 weight files.

    Detectron2 stores weights as a plain pickle (its own loader calls ``pickle.load``), which torch's
    weights-only loader cannot read. Unpickling an untrusted file can run arbitrary code, so this one
    resolves only the globals numpy arrays are built from and refuses everything else.
    """

    _ALLOWED = {
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "scalar"),
        ("collections", "OrderedDict"),
        ("_codecs", "encode"),  # how Python 3 writes bytes (array buffers) in protocol-2 pickles
    }

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only numpy arrays are allowed")
        return super().find_class(module, name)


def load_detectron2_bytes(data: bytes) -> dict:
    """Parse detectron2 weights (pickled bytes) into ``{"model": {name: ndarray}, "__author__": ...}``.

    Caffe2 / Detectron1 files (such as detectron2's ImageNetPretrained/MSRA/R-50.pkl) are blob dicts
    without a ``model`` entry; they are returned the way detectron2's DetectionCheckpointer sees them:
    ``__author__`` "Caffe2", blobs ending in ``_momentum`` removed.
    """
    # latin1: Caffe2-era files were pickled by Python 2 (detectron2 reads them the same way).
    data = _NumpyOnlyUnpickler(io.BytesIO(data), encoding="latin1").load()
    if not isinstance(data, dict):
        raise ValueError(f"a pickled {type(data).__name__}, not a dict of weights")
    if "model" in data and "__author__" in data:
        weights = data["model"]
    else:
        weights = data.get("blobs", data)
        weights = {k: v for k, v in weights.items() if not str(k).endswith("_momentum")}
        data = {"model": weights, "__author__": "Caffe2", "matching_heuristics": True}
    if not weights or not all(isinstance(v, np.ndarray) for v in weights.values()):
        raise ValueError("its entries are not a non-empty name -> numpy array mapping")
    return data


def read_checkpoint(path: Path):
    """(content, layout) of a checkpoint file; content is a torch state-dict container, or for a
    detectron2 weights file the dict :func:`load_detectron2_bytes` returns."""
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    refused = None
    if not zipfile.is_zipfile(path):  # torch.save writes zip archives; detectron2 weights are pickles
        try:
            return load_detectron2_bytes(path.read_bytes()), DETECTRON2
        except pickle.UnpicklingError as e:
            refused = str(e) if str(e).startswith("refusing") else None
        except Exception:
            pass  # maybe a legacy (pre-zip) torch file, or a damaged one: torch.load tells
    try:
        with warnings.catch_warnings():  # torch warns about the protocol of pickles it then rejects
            warnings.simplefilter("ignore", UserWarning)
            content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        reason = refused or str(e).strip().split(". ")[0][:200]
        raise UserError(f"{path}: not a readable PyTorch checkpoint nor detectron2 weights file "
                        f"(truncated or corrupt?): {reason}") from None
    return content, detect(path, content)


def _first_keys(content, limit=6) -> str:
    if not isinstance(content, Mapping):
        return f"(a {type(content).__name__}, not a dict)"
    if not content:
        return "(empty dict)"
    shown = []
    for key in list(content)[:limit]:
        value = content[key]
        if isinstance(value, Mapping):
            inner = ", ".join(map(str, list(value)[:limit])) or "empty"
            shown.append(f"{key}: {{{inner}{', ...' if len(value) > limit else ''}}}")
        else:
            shown.append(str(key))
    return ", ".join(shown) + (", ..." if len(content) > limit else "")


def detect(path: Path, content) -> Layout:
    """The layout of a torch checkpoint, judged by its keys; UserError listing the known layouts."""
    if isinstance(content, Mapping):
        for layout in LAYOUTS:
            state = content.get(layout.container) if layout.container else content
            if isinstance(state, Mapping) and all(
                    isinstance(state.get(layout.prefix + key), torch.Tensor) for key in _REQUIRED):
                return layout
    known = "; ".join(f"{layout.name} ({layout.description})" for layout in LAYOUTS + (DETECTRON2,))
    raise UserError(f"{path}: unknown checkpoint layout (only ResNet checkpoints can be converted). "
                    f"Known layouts: {known}. First keys seen: {_first_keys(content)}")


def resnet_state_dict(path: Path, content, layout: Layout):
    """Split a detected checkpoint into (detectron2-named backbone tensors, {detectron2 name: source
    key}, dropped source keys)."""
    state = content[layout.container] if layout.container else content
    weights, sources, dropped = {}, {}, []
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            continue
        if not key.startswith(layout.prefix) or _HEAD.fullmatch(key[len(layout.prefix):]):
            dropped.append(key)
            continue
        name = detectron2_name(key[len(layout.prefix):])
        if name is None:
            raise UserError(f"{path}: {key!r} is not part of a torchvision ResNet; "
                            "only plain torchvision ResNets (18/34/50/101/152, ResNeXt, wide) can be converted")
        weights[name], sources[name] = value.detach().cpu(), key
    return weights, sources, dropped
