"""Checkpoint -> detectron2 weights + the config overlay that matches how they were pre-trained.

``convert`` reads a MoCo / torchvision ResNet checkpoint (layouts in ``checkpoint_layouts``), renames
its backbone to detectron2's ResNet names, and writes ``<stem>.pkl`` (detectron2's weights format:
``{"model": {name: ndarray}, "matching_heuristics": True}``, so the same file fills the backbone of
C4 models (``backbone.*`` + ``roi_heads.res5.*``) and FPN models (``backbone.bottom_up.*``)) plus
``<stem>.yaml`` beside it: the settings detectron2 must use with these weights. Getting them wrong
fails silently (torchvision-style weights fed BGR 0..255 pixels lose many AP points), hence:

- pixels: RGB, ImageNet mean / std scaled to 0..255 (detectron2's defaults are the MSRA/caffe ones);
- RESNETS.STRIDE_IN_1X1 False (torchvision strides in the 3x3 conv), DEPTH and widths from the weights;
- RESNETS.NORM: the kind of norm layer the tensors fill: SyncBN by default (BN with running
  statistics), GN when the weights have none. Only GN binds fine-tuning: which BN kind a task
  trains with, and how much of the backbone it freezes, is the task's protocol (``weights_settings``).
  The verification here builds BN in place of SyncBN: the same tensors, no process group needed.

Before anything is written the output is verified: detectron2's ResNet is built from the overlay and
must be filled exactly (every tensor consumed, every parameter and buffer present, every shape equal).
"""
from __future__ import annotations

import pickle
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from transfer import checkpoint_layouts as layouts
from transfer import fileio
from transfer.errors import UserError

AUTHOR = "moco-transfer"
NORMS = ("SyncBN", "naiveSyncBN", "BN", "FrozenBN", "GN")
DEFAULT_NORM = "SyncBN"  # the MoCo paper's choice

# How a family of weights expects to be fed (detectron2 config keys). detectron2's own defaults are
# the MSRA (Caffe2) ones; every torchvision-trained ResNet, MoCo's included, needs the first set.
# MSRA files hold BN folded into a scale and a bias (detectron2 loads them as FrozenBN); that is
# what the file holds, not how to fine-tune it: the task decides (``weights_settings``).
STYLES = {
    "torchvision": {
        "MODEL.PIXEL_MEAN": [123.675, 116.28, 103.53],
        "MODEL.PIXEL_STD": [58.395, 57.12, 57.375],
        "INPUT.FORMAT": "RGB",
        "MODEL.RESNETS.STRIDE_IN_1X1": False,
    },
    "msra": {
        "MODEL.PIXEL_MEAN": [103.53, 116.28, 123.675],
        "MODEL.PIXEL_STD": [1.0, 1.0, 1.0],
        "INPUT.FORMAT": "BGR",
        "MODEL.RESNETS.STRIDE_IN_1X1": True,
        "MODEL.RESNETS.NORM": "FrozenBN",
    },
}
# The keys a weights file decides when it is fine-tuned: how its pixels are fed and the shape of
# its ResNet. Everything else an overlay may name (the BN kind, FREEZE_AT, ...) is the fine-tuning
# protocol, which the task owns, so that every weights file of a suite runs the same protocol.
WEIGHTS_KEYS = ("MODEL.WEIGHTS", "MODEL.PIXEL_MEAN", "MODEL.PIXEL_STD", "INPUT.FORMAT",
                "MODEL.RESNETS.STRIDE_IN_1X1", "MODEL.RESNETS.DEPTH", "MODEL.RESNETS.STEM_OUT_CHANNELS",
                "MODEL.RESNETS.RES2_OUT_CHANNELS", "MODEL.RESNETS.NUM_GROUPS", "MODEL.RESNETS.WIDTH_PER_GROUP")
# ``__author__`` of detectron2 weight files found without an overlay -> their style. "Caffe2" is what
# detectron2 calls Caffe2/Detectron1 blob files such as ImageNetPretrained/MSRA/R-50.pkl; "torchvision"
# and "MOCO" are written by detectron2's and the official MoCo repository's converters.
AUTHOR_STYLES = {"Caffe2": "msra", "torchvision": "torchvision", "MOCO": "torchvision", AUTHOR: "torchvision"}

# (blocks in res2..res5, bottleneck blocks) -> RESNETS.DEPTH, as detectron2's build_resnet_backbone has them
DEPTHS = {((2, 2, 2, 2), False): 18, ((3, 4, 6, 3), False): 34, ((3, 4, 6, 3), True): 50,
          ((3, 4, 23, 3), True): 101, ((3, 8, 36, 3), True): 152}

# Norms with the same tensors as BN but needing a process group to run: the backbone built for
# verification uses BN instead, so checking a file never depends on torch.distributed.
_SAME_TENSORS_AS = {"SyncBN": "BN", "naiveSyncBN": "BN", "naiveSyncBN_N": "BN", "nnSyncBN": "BN"}

_CHECKPOINT_SUFFIXES = {".tar", ".pth", ".pt", ".ckpt", ".bin"}


@dataclass
class Conversion:
    weights_path: Path
    overlay_path: Path | None  # None: a detectron2 file found without an overlay beside it
    layout: str
    kept: list[str]  # detectron2 names written (for a detectron2 input: the names it holds)
    dropped: list[str]  # source keys left out (heads, key encoder, queue, ...)
    overlay: dict = field(default_factory=dict)
    author: str | None = None  # set for an input that already was detectron2 weights

    def summary(self) -> str:
        """A few lines for the command line: layout, tensors kept / dropped, output paths."""
        overlay = self.overlay
        settings = ", ".join(f"{key.rsplit('.', 1)[-1]} {overlay[key]}" for key in (
            "MODEL.RESNETS.DEPTH", "MODEL.RESNETS.NORM", "INPUT.FORMAT", "MODEL.RESNETS.STRIDE_IN_1X1")
            if key in overlay)
        if self.author is not None:
            lines = [f"layout:   detectron2 weights (author {self.author!r}): already converted, nothing written",
                     f"weights:  {self.weights_path} ({len(self.kept)} tensors)"]
            if self.overlay_path:
                lines.append(f"overlay:  {self.overlay_path}")
            else:
                lines.append(f"settings: {settings} (inferred; no overlay YAML beside the weights)" if settings else
                             "settings: unknown (no overlay YAML beside the weights, author not recognised)")
            return "\n".join(lines)
        prefix = next(layout.prefix for layout in layouts.LAYOUTS if layout.name == self.layout)
        groups = Counter(_group(key, prefix) for key in self.dropped)
        dropped = ", ".join(f"{name} ({count})" for name, count in groups.items()) or "nothing"
        lines = [
            f"layout:   {self.layout}",
            f"kept:     {len(self.kept)} tensors -> detectron2 ResNet (stem, res2..res5)",
            f"dropped:  {len(self.dropped)} tensors: {dropped}",
            "verified: detectron2's ResNet built from the overlay takes every tensor, and every "
            "parameter and buffer is filled",
            f"weights:  {self.weights_path}",
            f"overlay:  {self.overlay_path} ({settings})",
        ]
        if overlay.get("MODEL.RESNETS.NORM") != "GN":
            lines.append("note:     the BN kind and FREEZE_AT are each task's protocol (the same for every "
                         "weights file); these weights decide only pixels, strides and the ResNet's shape")
        return "\n".join(lines)


def _group(key: str, prefix: str) -> str:
    """Label for the summary: ``module.encoder_k.layer1.0.conv1.weight`` -> ``module.encoder_k.*``."""
    if key.startswith(prefix):  # a part of the kept ResNet: its head, or FrozenBN's unused counters
        rest = key[len(prefix):]
        if rest.endswith(".num_batches_tracked"):
            return prefix + "*.num_batches_tracked"
        return prefix + rest.split(".")[0] + ".*"
    parts = key.split(".")
    return ".".join(parts[:2]) + (".*" if len(parts) > 2 else "")


def default_output(ckpt_path: Path) -> Path:
    """``ckpt/moco_v2_800ep.pth.tar`` -> ``ckpt/moco_v2_800ep.pkl``."""
    name = ckpt_path.name
    while Path(name).suffix in _CHECKPOINT_SUFFIXES:
        name = Path(name).stem
    return ckpt_path.with_name(name + ".pkl")


def overlay_path_for(weights_path: Path) -> Path:
    return Path(weights_path).with_suffix(".yaml")


def resnet_architecture(weights) -> dict:
    """RESNETS.DEPTH and widths of detectron2-named ResNet weights (anything with ``.shape``)."""
    blocks = tuple(len({key.split(".")[1] for key in weights
                        if key.startswith(f"res{stage}.") and key.endswith(".conv1.weight")})
                   for stage in range(2, 6))
    bottleneck = "res2.0.conv3.weight" in weights
    depth = DEPTHS.get((blocks, bottleneck))
    if depth is None or "stem.conv1.weight" not in weights:
        raise UserError(f"a ResNet with {blocks} {'bottleneck' if bottleneck else 'basic'} blocks in "
                        "res2..res5 is not one detectron2 builds (depth 18, 34, 50, 101 or 152)")
    if bottleneck:
        conv2 = weights["res2.0.conv2.weight"].shape  # (width, width / groups, 3, 3)
        groups = conv2[0] // conv2[1]
        width, res2_out = conv2[0] // groups, weights["res2.0.conv3.weight"].shape[0]
    else:
        groups, width, res2_out = 1, 64, weights["res2.0.conv2.weight"].shape[0]
    return {
        "MODEL.RESNETS.DEPTH": depth,
        "MODEL.RESNETS.STEM_OUT_CHANNELS": int(weights["stem.conv1.weight"].shape[0]),
        "MODEL.RESNETS.RES2_OUT_CHANNELS": int(res2_out),
        "MODEL.RESNETS.NUM_GROUPS": int(groups),
        "MODEL.RESNETS.WIDTH_PER_GROUP": int(width),
    }


def _has_running_stats(weights) -> bool:
    return any(key.endswith(".running_var") for key in weights)


def _choose_norm(path: Path, weights, norm: str | None) -> str:
    group_norm = not _has_running_stats(weights)  # GN (and only GN) has no running statistics
    if norm is None:
        return "GN" if group_norm else DEFAULT_NORM
    if norm not in NORMS:
        raise UserError(f"--norm {norm}: choose one of {', '.join(NORMS)}")
    if group_norm != (norm == "GN"):
        found = "GroupNorm (no BN running statistics)" if group_norm else "BatchNorm (with running statistics)"
        raise UserError(f"--norm {norm}: {path} holds a {found} backbone; "
                        f"use {'GN' if group_norm else 'one of ' + ', '.join(NORMS[:4])}")
    return norm


def _nested(flat: dict) -> dict:
    nested = {}
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        node = nested
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = value
    return nested


def flatten(nested: dict, prefix="") -> dict:
    """{"MODEL": {"RESNETS": {"NORM": v}}} -> {"MODEL.RESNETS.NORM": v} (a CfgNode too)."""
    flat = {}
    for key, value in nested.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _overlay_yaml(overlay: dict, source: Path, layout: str) -> str:
    header = (
        f"# detectron2 config overlay for {Path(overlay['MODEL.WEIGHTS']).name}, written by tools/convert_to_d2.py\n"
        f"# from {source} (layout {layout}). Fine-tuning merges the keys the weights decide (pixels,\n"
        "# strides, the ResNet's shape; NORM only when GN) after a task's config: the task keeps its protocol.\n"
    )
    return header + yaml.safe_dump(_nested(overlay), sort_keys=False, default_flow_style=None)


def backbone_from_overlay(overlay: dict):
    """detectron2's ResNet (stem, res2..res5) as the overlay's settings build it, on the CPU.

    SyncBN-type norms are built as BN (same parameters and buffers), so no process group is needed.
    """
    from detectron2.config import get_cfg
    from detectron2.layers import ShapeSpec
    from detectron2.modeling.backbone.resnet import build_resnet_backbone

    cfg = get_cfg()
    settings = {key: value for key, value in overlay.items() if key.startswith("MODEL.RESNETS.")}
    norm = settings.get("MODEL.RESNETS.NORM", cfg.MODEL.RESNETS.NORM)
    settings["MODEL.RESNETS.NORM"] = _SAME_TENSORS_AS.get(norm, norm)
    settings["MODEL.RESNETS.OUT_FEATURES"] = ["res2", "res3", "res4", "res5"]  # else stages past res4 are not built
    settings["MODEL.BACKBONE.FREEZE_AT"] = 0  # frozen stages would turn BN into FrozenBN, which has other buffers
    cfg.merge_from_list([item for pair in settings.items() for item in pair])
    try:
        return build_resnet_backbone(cfg, ShapeSpec(channels=3))
    except AssertionError as e:  # detectron2 states its ResNet constraints as assertions
        raise UserError(f"detectron2 cannot build this ResNet: {e}") from None


def verify(weights: dict, overlay: dict, what: str) -> None:
    """Load detectron2-named weights into the backbone the overlay describes; UserError unless every
    tensor is consumed and every backbone parameter and buffer is filled with a tensor of its shape."""
    import torch

    backbone = backbone_from_overlay(overlay)
    expected = backbone.state_dict()
    missing = sorted(set(expected) - set(weights))
    unused = sorted(set(weights) - set(expected))
    shapes = [f"{key} {tuple(weights[key].shape)} vs {tuple(expected[key].shape)}"
              for key in sorted(set(weights) & set(expected))
              if tuple(weights[key].shape) != tuple(expected[key].shape)]
    problems = [f"{label}: {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''} ({len(keys)})"
                for label, keys in (("missing", missing), ("unused", unused), ("wrong shape", shapes)) if keys]
    if problems:
        raise UserError(f"{what}: the converted weights do not fit detectron2's ResNet-"
                        f"{overlay['MODEL.RESNETS.DEPTH']} ({overlay['MODEL.RESNETS.NORM']}): {'; '.join(problems)}")
    backbone.load_state_dict({key: torch.as_tensor(value) for key, value in weights.items()}, strict=True)


def check_finite(weights: dict, what: str) -> None:
    """UserError when tensors hold NaN or Inf: fine-tuning them would diverge, and its message
    would blame the learning rate rather than the checkpoint."""
    import torch

    bad = [key for key, value in weights.items()
           if torch.is_floating_point(torch.as_tensor(value)) and not torch.isfinite(torch.as_tensor(value)).all()]
    if bad:
        raise UserError(f"{what}: the weights contain NaN/Inf ({len(bad)} tensors: {', '.join(bad[:3])}"
                        f"{', ...' if len(bad) > 3 else ''}); was the pre-training diverging? "
                        "--allow-non-finite converts them anyway")


def convert(ckpt_path, output=None, norm: str | None = None, allow_non_finite: bool = False) -> Conversion:
    """Convert a checkpoint to ``output`` (default ``<ckpt stem>.pkl`` beside it) plus its overlay YAML.

    A file that already is detectron2 weights is reported (layout "detectron2") and nothing is written.
    Weights with NaN / Inf values are refused unless ``allow_non_finite``.
    """
    path = Path(ckpt_path)
    content, layout = layouts.read_checkpoint(path)
    if layout is layouts.DETECTRON2:
        sidecar = overlay_path_for(path)
        try:
            overlay = load_overlay(path)
        except UserError:  # an unknown author: still report what the file is
            overlay = {}
        return Conversion(path.resolve(), sidecar.resolve() if sidecar.is_file() else None, layout.name,
                          sorted(content["model"]), [], overlay, author=str(content["__author__"]))

    weights, sources, dropped = layouts.resnet_state_dict(path, content, layout)
    stem = weights.get("stem.conv1.weight")
    if stem is not None and tuple(stem.shape[-2:]) != (7, 7):  # tools/pretrain_moco.py --small-stem
        raise UserError(f"{path}: pre-trained with a {stem.shape[-2]}x{stem.shape[-1]} stem convolution (the "
                        "small-image stem, --small-stem); detectron2's ResNet has a 7x7 stem, "
                        "so it cannot be converted")
    if not allow_non_finite:
        check_finite(weights, str(path))
    norm = _choose_norm(path, weights, norm)
    if norm == "FrozenBN":  # FrozenBatchNorm2d keeps no batch counter
        for key in [key for key in weights if key.endswith(".num_batches_tracked")]:
            del weights[key]
            dropped.append(sources[key])
    weights_path = Path(output) if output else default_output(path)
    if weights_path.suffix != ".pkl":
        raise UserError(f"--output {weights_path}: must end in .pkl (detectron2 picks its loader by extension)")
    if weights_path.resolve() == path.resolve():
        raise UserError(f"{path}: the output would overwrite the checkpoint; pass --output")

    overlay = {"MODEL.WEIGHTS": str(weights_path.resolve()), **STYLES["torchvision"],
               **resnet_architecture(weights), "MODEL.RESNETS.NORM": norm}
    payload = pickle.dumps({
        "model": {key: value.numpy() for key, value in weights.items()},
        "__author__": AUTHOR,
        "matching_heuristics": True,  # names without model prefix: detectron2 matches them by suffix
        "source": {"checkpoint": str(path.resolve()), "layout": layout.name},
    })
    # Check exactly the bytes that will be written, read back the way load_overlay users read them.
    verify(layouts.load_detectron2_bytes(payload)["model"], overlay, str(path))

    overlay_path = overlay_path_for(weights_path)
    fileio.atomic_write_bytes(weights_path, payload)
    try:
        fileio.atomic_write_text(overlay_path, _overlay_yaml(overlay, path.resolve(), layout.name))
    except BaseException:
        weights_path.unlink(missing_ok=True)  # weights without their overlay would be fed wrongly
        raise
    return Conversion(weights_path.resolve(), overlay_path.resolve(), layout.name, sorted(weights), dropped, overlay)


def weights_settings(overlay: dict) -> tuple[dict, dict]:
    """(the settings the weights decide, the overlay's other settings, which fine-tuning ignores).

    The norm is the weights' only when it is GN: GN weights have no BN statistics to fill a BN
    layer with. A BN kind (SyncBN, BN, FrozenBN, ...) is a protocol choice the task makes.
    """
    kept = {key: value for key, value in overlay.items() if key in WEIGHTS_KEYS}
    if overlay.get("MODEL.RESNETS.NORM") == "GN":
        kept["MODEL.RESNETS.NORM"] = "GN"
    return kept, {key: value for key, value in overlay.items() if key not in kept}


def load_overlay(weights_path) -> dict:
    """detectron2 config keys -> values to use with a weights file.

    The overlay YAML beside the weights when there is one; otherwise settings inferred from a
    detectron2 weights file whose author is known (MSRA/Caffe2 files: BGR, caffe pixel statistics,
    STRIDE_IN_1X1, FrozenBN). MODEL.WEIGHTS is always the given file's absolute path. Fine-tuning
    takes only ``weights_settings`` of it.
    """
    path = Path(weights_path)
    if not path.is_file():
        raise UserError(f"{path}: no such weights file")
    sidecar = overlay_path_for(path)
    if sidecar.is_file():
        overlay = flatten(fileio.read_yaml_mapping(sidecar, "a mapping of detectron2 config keys"))
    else:
        overlay = _infer_overlay(path, sidecar)
    overlay["MODEL.WEIGHTS"] = str(path.resolve())
    return overlay


def _infer_overlay(path: Path, sidecar: Path) -> dict:
    try:
        data = layouts.load_detectron2_bytes(path.read_bytes())
    except Exception as e:
        raise UserError(f"{path}: no overlay {sidecar.name} beside it and not a detectron2 weights file ({e}); "
                        "convert the checkpoint with tools/convert_to_d2.py") from None
    author = data["__author__"]
    style = AUTHOR_STYLES.get(author)
    if style is None:
        raise UserError(f"{path}: detectron2 weights by {author!r} without an overlay beside them: their pixel "
                        f"format and normalisation are unknown; write {sidecar} (known authors: "
                        f"{', '.join(AUTHOR_STYLES)})")
    weights = data["model"]
    if author == "Caffe2":
        from detectron2.checkpoint.c2_model_loading import convert_c2_detectron_names

        weights, _ = convert_c2_detectron_names(dict(weights))  # detectron2's own renaming
    overlay = {**STYLES[style], **resnet_architecture(weights)}
    overlay.setdefault("MODEL.RESNETS.NORM", DEFAULT_NORM if _has_running_stats(weights) else "GN")
    return overlay
