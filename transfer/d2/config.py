"""Read our detectron2 YAML configs, whose ``_BASE_`` chain may end in detectron2's model zoo.

Our task configs (configs/detection/*.yaml) state only what the MoCo protocol changes, over the
closest detectron2 model-zoo config: ``_BASE_: "zoo://Base-RCNN-C4.yaml"`` names the file inside
the installed detectron2's ``model_zoo/configs`` folder; any other ``_BASE_`` is a path relative
to the file, as in detectron2. ``_BASE_`` may also be a list (later entries win).
"""
from __future__ import annotations

from pathlib import Path

from detectron2 import model_zoo
from detectron2.config import CfgNode
from detectron2.config import get_cfg as d2_get_cfg

from transfer import fileio

ZOO = "zoo://"


def get_cfg() -> CfgNode:
    """detectron2's default config plus the keys our trainer reads (``TRANSFER.*``)."""
    cfg = d2_get_cfg()
    cfg.TRANSFER = CfgNode()
    cfg.TRANSFER.TASK = ""  # the task this config was resolved for (recorded in metrics.json)
    cfg.TRANSFER.EVALUATOR = ""  # a key of transfer.d2.evaluation.EVALUATORS
    from transfer.regimes import add_regime_config

    return add_regime_config(cfg)  # TRANSFER.LABELS.* and TRANSFER.BACKBONE: the run's regime


def load_yaml(path) -> dict:
    """The config file at ``path`` as a plain dict, with its ``_BASE_`` chain merged in."""
    path = Path(path)
    data = fileio.read_yaml_mapping(path, "a detectron2 config")
    bases = data.pop("_BASE_", [])
    merged: dict = {}
    for base in [bases] if isinstance(bases, str) else bases:
        if base.startswith(ZOO):
            base_dict = CfgNode.load_yaml_with_base(model_zoo.get_config_file(base[len(ZOO):]))
        else:
            base_dict = load_yaml(path.parent / base)
        _merge_into(base_dict, merged)
    _merge_into(data, merged)
    return merged


def merge_config_file(cfg: CfgNode, path) -> None:
    """Like ``cfg.merge_from_file(path)``, understanding ``zoo://`` bases."""
    cfg.merge_from_other_cfg(CfgNode(load_yaml(path)))


def _merge_into(src: dict, dst: dict) -> None:
    for key, value in src.items():
        if isinstance(value, dict) and isinstance(dst.get(key), dict):
            _merge_into(value, dst[key])
        else:
            dst[key] = value
