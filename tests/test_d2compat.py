"""d2compat on the installed stack: patches only what is missing, and detectron2 works after it."""
import types
import warnings

import numpy as np
import pytest
from PIL import Image

from transfer import d2compat


def test_patches_only_what_is_missing_on_this_stack():
    # The pinned stack (numpy 1.23, Pillow 9.5, setuptools < 82) still has every alias: only the
    # compiled-ops stand-in may be needed (when detectron2 was installed without them), and the
    # resume fix that torch >= 2.6 needs.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert np.str is str and np.float is float and Image.LINEAR == Image.BILINEAR
    expected = [] if d2compat.has_compiled_ops() else ["detectron2._C"]
    expected.append("fvcore Checkpointer resume (weights_only)")
    assert d2compat.PATCHED == expected


def test_aliases_are_added_to_modules_that_lack_them():
    fake_numpy = types.ModuleType("numpy")
    assert d2compat._patch_numpy(fake_numpy) == [
        "numpy.str", "numpy.int", "numpy.float", "numpy.bool", "numpy.object", "numpy.in1d"]
    assert fake_numpy.int is int and fake_numpy.bool is bool
    assert fake_numpy.in1d(np.array([[1, 5], [2, 3]]), [2, 5]).tolist() == [False, True, True, False]

    fake_image = types.SimpleNamespace(BILINEAR=2)
    assert d2compat._patch_pillow(fake_image) == ["PIL.Image.LINEAR"] and fake_image.LINEAR == 2
    present = types.SimpleNamespace(BILINEAR=2, LINEAR=7)
    assert d2compat._patch_pillow(present) == [] and present.LINEAR == 7


def test_compiled_ops_stand_in_answers_setup_queries_and_names_missing_ops():
    import detectron2._C as C
    from detectron2.utils.collect_env import collect_env_info

    if d2compat.has_compiled_ops():
        pytest.skip("a compiled detectron2 is installed; no stand-in needed")
    assert C.has_cuda() is False and isinstance(C.get_compiler_version(), str)
    assert "detectron2" in collect_env_info()
    with pytest.raises(RuntimeError, match="nms_rotated.*compiled ops"):
        C.nms_rotated
    assert d2compat.coco_fast_eval_available() is False


def test_detectron2_builds_and_runs_a_model_zoo_model_on_cpu():
    import torch
    from detectron2 import model_zoo
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    cfg = get_cfg()
    cfg.merge_from_file(model_zoo.get_config_file("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml"))
    cfg.MODEL.DEVICE = "cpu"
    model = build_model(cfg).eval()
    with torch.no_grad():
        out = model([{"image": torch.randint(0, 255, (3, 64, 96), dtype=torch.uint8)}])
    assert set(out[0]["instances"].get_fields()) >= {"pred_boxes", "scores", "pred_classes", "pred_masks"}
