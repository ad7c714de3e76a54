"""d2compat on the installed stack: patches only what is missing, before detectron2's first import
in any process, and detectron2 works after it; its private internals are checked against the version."""
import subprocess
import sys
import types
import warnings

import detectron2  # noqa: F401  (its first import applies the patches: conftest imported transfer)
import numpy as np
import pytest
from PIL import Image

from transfer import d2compat

from conftest import REPO


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


@pytest.mark.slow
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


# A fresh interpreter: what comes first, then an import of detectron2's data and model code, as the
# tools do once they have parsed their arguments. The checks print what d2compat patched.
FIRST = {
    "tools/finetune.py": "import runpy; runpy.run_path('tools/finetune.py', run_name='tool')",
    "tools/run_suite.py": "import runpy; runpy.run_path('tools/run_suite.py', run_name='tool')",
    "a module of ours that imports detectron2": "import transfer.datasets.catalog",
    "the transfer package": "import transfer",
}
CHECK = """
import sys
import detectron2.data, detectron2.modeling
from fvcore.common.checkpoint import Checkpointer
from transfer import d2compat
print(d2compat.PATCHED, Checkpointer._load_file._own_checkpoints_trusted,
      type(sys.modules['detectron2._C']).__name__, type(detectron2._C).__name__)
"""


@pytest.mark.slow
@pytest.mark.parametrize("first", sorted(FIRST))
def test_a_fresh_process_gets_the_patches_whatever_it_imports_first(first):
    run = subprocess.run([sys.executable, "-c", FIRST[first] + "\n" + CHECK], cwd=REPO, capture_output=True,
                         text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    stand_in = "module" if d2compat.has_compiled_ops() else "_CompiledOpsMissing"
    assert run.stdout.split("\n")[-2] == f"{d2compat.PATCHED} True {stand_in} {stand_in}"


def test_importing_transfer_imports_neither_detectron2_nor_torch():
    code = "import sys, transfer; print(sorted({'detectron2', 'torch', 'numpy'} & set(sys.modules)))"
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                         check=False)
    assert run.returncode == 0 and run.stdout.strip() == "[]", run.stderr[-2000:]


def test_every_private_internal_is_there_as_d2compat_uses_it_on_this_install():
    import lvis
    from cityscapesscripts.evaluation import evalInstanceLevelSemanticLabeling, evalPixelLevelSemanticLabeling
    from detectron2.evaluation import pascal_voc_evaluation
    from lvis import LVIS

    assert d2compat.builtin_metadata("coco")["thing_classes"][0] == "person"
    assert 0 < d2compat.find_free_port() < 65536
    for recording, module, name in [
        (d2compat.recording_voc_eval(), pascal_voc_evaluation, "voc_eval"),
        (d2compat.recording_lvis_eval(), lvis, "LVISEval"),
        (d2compat.recording_cityscapes_eval(evalInstanceLevelSemanticLabeling), evalInstanceLevelSemanticLabeling,
         "evaluateImgLists"),
        (d2compat.recording_cityscapes_eval(evalPixelLevelSemanticLabeling), evalPixelLevelSemanticLabeling,
         "evaluateImgLists"),
    ]:
        original = getattr(module, name)
        with recording as calls:
            assert getattr(module, name) is not original and calls == []
        assert getattr(module, name) is original  # put back
    ground_truth = LVIS.__new__(LVIS)
    ground_truth.dataset = {"images": [{"id": 1}], "annotations": [], "categories": [{"id": 3}]}
    empty = d2compat.empty_lvis_results(ground_truth)
    assert empty.get_img_ids() == [1] and empty.get_ann_ids() == [] and ground_truth.dataset["annotations"] == []


def test_a_missing_or_changed_internal_is_one_line_naming_it_and_the_version():
    version = d2compat.installed_version("detectron2")
    with pytest.raises(d2compat.InternalsChanged) as missing:
        d2compat.training_loop(types.SimpleNamespace())  # no _trainer
    message = str(missing.value)
    assert "\n" not in message and message.startswith(f"detectron2 {version}: SimpleNamespace._trainer is missing")
    assert "as in detectron2 0.6" in message

    from detectron2.modeling.roi_heads import StandardROIHeads

    with pytest.raises(d2compat.InternalsChanged, match=f"detectron2 {version}: StandardROIHeads._forward_mask is "
                                                        "missing or changed"):
        class Heads(StandardROIHeads):  # an override whose parameters are not detectron2's
            @d2compat.overrides(StandardROIHeads)
            def _forward_mask(self, features):
                return {}


@pytest.mark.slow
def test_a_tool_run_without_detectron2_says_to_run_make_setup_in_one_line(tmp_path):
    hide = ("import runpy, sys; sys.modules['detectron2'] = None; "
            "sys.argv = ['tools/finetune.py', '--task', 'voc07', '--weights', 'w.pkl', '--output', sys.argv[1]]; "
            "runpy.run_path('tools/finetune.py', run_name='__main__')")
    done = subprocess.run([sys.executable, "-c", hide, str(tmp_path / "run")], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: detectron2 is not installed: run `make setup` (README, 'Installing detectron2')"]
