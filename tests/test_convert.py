"""The converter: every supported layout gives detectron2 features identical to torchvision's, the
files load into detectron2's own C4 / FPN models, and bad inputs fail clearly without leaving files."""
import copy
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from detectron2 import model_zoo
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from torch import nn

from transfer.convert import backbone_from_overlay, convert, load_overlay, verify, weights_settings
from transfer.errors import UserError

pytestmark = pytest.mark.slow  # trains, evaluates or runs tools on generated data: not in `make test-fast`

REPO = Path(__file__).resolve().parents[1]
# torchvision's ImageNet input normalisation, for pixels in 0..1 (the ground truth the overlay must match)
TV_MEAN, TV_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def randomized(model: nn.Module, seed=0) -> nn.Module:
    """Random weights AND random norm statistics, on a scale that keeps deep features O(1)."""
    gen = torch.Generator().manual_seed(seed)
    norms = [m for m in model.modules() if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm))]
    # the norms that end a residual branch: small scales keep the residual sums, hence features, O(1)
    branch_ends = {id(getattr(block, "bn3", getattr(block, "bn2", None))) for block in model.modules()
                   if isinstance(block, (torchvision.models.resnet.BasicBlock, torchvision.models.resnet.Bottleneck))}
    branch_ends |= {id(m.downsample[1]) for m in model.modules() if getattr(m, "downsample", None) is not None}
    with torch.no_grad():
        for m in norms:
            m.weight.copy_((torch.rand(m.weight.shape, generator=gen) + 0.5) * (0.2 if id(m) in branch_ends else 1))
            m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)
        batch_norms = [m for m in norms if isinstance(m, nn.BatchNorm2d)]
        if batch_norms:  # running stats := statistics of a random batch, then perturbed
            for m in batch_norms:
                m.momentum = 1.0
            model.train()(torch.randn(4, 3, 64, 64, generator=gen) * 1.2)
            for m in batch_norms:
                m.running_mean.add_(torch.randn(m.running_mean.shape, generator=gen) * 0.1)
                m.running_var.mul_(torch.rand(m.running_var.shape, generator=gen) * 0.5 + 0.75)
    return model.eval()


def torchvision_features(model, rgb):
    mean, std = (torch.tensor(v, dtype=rgb.dtype).view(1, 3, 1, 1) for v in (TV_MEAN, TV_STD))
    x = (rgb / 255 - mean) / std
    x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    features = {}
    for i in range(1, 5):
        x = getattr(model, f"layer{i}")(x)
        features[f"res{i + 1}"] = x
    return features


def detectron2_features(overlay, rgb, **changes):
    """res2..res5 of detectron2's ResNet built from the overlay, weights loaded by detectron2 itself."""
    overlay = {**overlay, **changes}
    backbone = backbone_from_overlay(overlay).eval()
    DetectionCheckpointer(backbone).load(overlay["MODEL.WEIGHTS"])
    backbone.double()
    assert overlay["INPUT.FORMAT"] == "RGB"  # the input below is RGB
    mean = torch.tensor(overlay["MODEL.PIXEL_MEAN"], dtype=rgb.dtype).view(1, 3, 1, 1)
    std = torch.tensor(overlay["MODEL.PIXEL_STD"], dtype=rgb.dtype).view(1, 3, 1, 1)
    with torch.no_grad():
        return backbone((rgb - mean) / std)


def max_differences(model, overlay, **changes):
    """Max abs difference per feature map. Both sides compute in float64 from the same float32
    weights: what remains is the conversion's error, not float32 rounding, which on res5 of a
    random ResNet-101 alone reaches ~1e-4."""
    rgb = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 255
    with torch.no_grad():
        expected = torchvision_features(copy.deepcopy(model).double(), rgb)
    got = detectron2_features(overlay, rgb, **changes)
    for name, value in expected.items():
        assert value.std() > 0.05, f"{name} features are degenerate; the comparison would prove nothing"
    return {name: (got[name] - expected[name]).abs().max().item() for name in expected}


# --- checkpoint layouts, built around a torchvision ResNet state dict ------------------------------

def mlp_head(prefix, dim, with_bn=False):
    head = {f"{prefix}fc.0.weight": torch.randn(dim, dim), f"{prefix}fc.0.bias": torch.zeros(dim),
            f"{prefix}fc.2.weight": torch.randn(16, dim), f"{prefix}fc.2.bias": torch.zeros(16)}
    if with_bn:
        head.update({f"{prefix}fc.1.{k}": torch.ones(dim) for k in ("weight", "bias", "running_mean", "running_var")})
    return head


def backbone_only(state):
    return {k: v for k, v in state.items() if not k.startswith("fc.")}


def moco_v1(state):  # official MoCo v1 / ours: linear fc head, key encoder, queue
    def encoder(name):
        return {f"module.{name}.{k}": v for k, v in state.items()}
    return {"epoch": 200, "arch": "resnet50", "state_dict": {
        **encoder("encoder_q"), **encoder("encoder_k"),
        "module.queue": torch.randn(16, 32), "module.queue_ptr": torch.zeros(1, dtype=torch.long)},
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.03, "momentum": 0.9, "params": [0, 1]}]}}


def moco_v2(state):  # MLP head fc.0 / fc.2
    dim = state["fc.weight"].shape[1]
    sd = {f"module.encoder_q.{k}": v for k, v in backbone_only(state).items()}
    sd.update({f"module.encoder_k.{k}": v for k, v in backbone_only(state).items()})
    sd.update({**mlp_head("module.encoder_q.", dim), **mlp_head("module.encoder_k.", dim)})
    sd.update({"module.queue": torch.randn(16, 32), "module.queue_ptr": torch.zeros(1, dtype=torch.long)})
    return {"epoch": 800, "arch": "resnet50", "state_dict": sd, "optimizer": {}}


def moco_v3(state):  # base / momentum encoders with BN'd MLP heads, predictor
    dim = state["fc.weight"].shape[1]
    sd = {}
    for encoder in ("base_encoder", "momentum_encoder"):
        sd.update({f"module.{encoder}.{k}": v for k, v in backbone_only(state).items()})
        sd.update(mlp_head(f"module.{encoder}.", dim, with_bn=True))
    sd.update(mlp_head("module.predictor.", 16))
    return {"epoch": 100, "arch": "resnet50", "state_dict": sd, "optimizer": {}, "scaler": {}}


def plain_torchvision(state):  # supervised baseline
    return dict(state)


def imagenet_example(state):  # pytorch/examples ImageNet training under DataParallel
    return {"epoch": 90, "arch": "resnet50", "best_acc1": torch.tensor(76.1),
            "state_dict": {f"module.{k}": v for k, v in state.items()}, "optimizer": {}}


LAYOUTS = {"moco-v1/v2": moco_v1, "moco-v2-mlp": moco_v2, "moco-v3": moco_v3,
           "torchvision": plain_torchvision, "imagenet-example": imagenet_example}


@pytest.fixture(scope="module")
def resnet50():
    return randomized(torchvision.models.resnet50())


def save(tmp_path, content, name="ckpt.pth.tar"):
    path = tmp_path / name
    torch.save(content, path)
    return path


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_gives_torchvision_features(tmp_path, resnet50, layout):
    ckpt = save(tmp_path, LAYOUTS[layout](resnet50.state_dict()))
    result = convert(ckpt)
    assert result.layout == {"moco-v2-mlp": "moco-v1/v2"}.get(layout, layout)
    assert result.weights_path == tmp_path / "ckpt.pkl" and result.overlay_path == tmp_path / "ckpt.yaml"
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pkl", "ckpt.pth.tar", "ckpt.yaml"]
    assert len(result.kept) == len(backbone_only(resnet50.state_dict()))
    assert not any(key.endswith(("fc.weight", "fc.0.weight")) or "encoder_k" in key or "momentum_encoder" in key
                   for key in result.kept)
    assert any(".fc." in "." + key for key in result.dropped)  # the head is dropped

    overlay = load_overlay(result.weights_path)
    assert overlay["MODEL.RESNETS.DEPTH"] == 50
    assert overlay["MODEL.RESNETS.STRIDE_IN_1X1"] is False
    assert overlay["MODEL.RESNETS.NORM"] == "SyncBN"
    assert "MODEL.BACKBONE.FREEZE_AT" not in overlay  # how much to freeze is the task's protocol
    assert max(max_differences(resnet50, overlay).values()) < 1e-4


def test_wrong_settings_are_detected_by_the_comparison(tmp_path, resnet50):
    """The equivalence check is sensitive to the settings the overlay carries."""
    overlay = load_overlay(convert(save(tmp_path, moco_v1(resnet50.state_dict()))).weights_path)
    assert max(max_differences(resnet50, overlay, **{"MODEL.RESNETS.STRIDE_IN_1X1": True}).values()) > 1e-2
    caffe = {"MODEL.PIXEL_MEAN": [103.53, 116.28, 123.675], "MODEL.PIXEL_STD": [1.0, 1.0, 1.0]}
    assert max(max_differences(resnet50, overlay, **caffe).values()) > 1e-2


@pytest.mark.parametrize("arch, depth", [("resnet18", 18), ("resnet101", 101), ("resnext50_32x4d", 50)])
def test_depth_and_width_come_from_the_weights(tmp_path, arch, depth):
    model = randomized(getattr(torchvision.models, arch)())
    overlay = load_overlay(convert(save(tmp_path, moco_v1(model.state_dict()))).weights_path)
    assert overlay["MODEL.RESNETS.DEPTH"] == depth
    assert overlay["MODEL.RESNETS.RES2_OUT_CHANNELS"] == (64 if depth == 18 else 256)
    assert overlay["MODEL.RESNETS.NUM_GROUPS"] == (32 if arch.startswith("resnext") else 1)
    assert max(max_differences(model, overlay).values()) < 1e-4


def test_group_norm_backbone_is_detected(tmp_path):
    model = randomized(torchvision.models.resnet50(norm_layer=lambda channels: nn.GroupNorm(32, channels)))
    ckpt = save(tmp_path, moco_v2(model.state_dict()))
    overlay = load_overlay(convert(ckpt).weights_path)
    assert overlay["MODEL.RESNETS.NORM"] == "GN"
    assert max(max_differences(model, overlay).values()) < 1e-4
    with pytest.raises(UserError, match="--norm BN: .*GroupNorm"):
        convert(ckpt, output=tmp_path / "bn" / "w.pkl", norm="BN")
    assert not (tmp_path / "bn").exists()


@pytest.mark.parametrize("norm", ["BN", "naiveSyncBN", "FrozenBN"])
def test_norm_choice(tmp_path, norm):
    model = randomized(torchvision.models.resnet18())
    result = convert(save(tmp_path, moco_v1(model.state_dict())), output=tmp_path / "out" / "r18.pkl", norm=norm)
    assert result.overlay_path == tmp_path / "out" / "r18.yaml"
    overlay = load_overlay(result.weights_path)
    assert overlay["MODEL.RESNETS.NORM"] == norm
    # FrozenBatchNorm2d has no batch counter: it is dropped rather than left unused
    assert any(key.endswith("num_batches_tracked") for key in result.kept) == (norm != "FrozenBN")
    assert max(max_differences(model, overlay).values()) < 1e-4
    with pytest.raises(UserError, match="--norm GN: .*BatchNorm"):
        convert(save(tmp_path, moco_v1(model.state_dict()), "again.pth"), norm="GN")
    assert not (tmp_path / "again.pkl").exists()


def test_verification_rejects_weights_that_do_not_fill_the_backbone(tmp_path):
    result = convert(save(tmp_path, plain_torchvision(torchvision.models.resnet18().state_dict())))
    with open(result.weights_path, "rb") as f:
        weights = pickle.load(f)["model"]  # our own output, trusted
    verify(weights, result.overlay, "r18")  # as written: complete
    incomplete = {k: v for k, v in weights.items() if k != "res3.0.shortcut.norm.running_var"}
    with pytest.raises(UserError, match="missing: res3.0.shortcut.norm.running_var"):
        verify(incomplete, result.overlay, "r18")
    with pytest.raises(UserError, match="unused: res2.0.conv3.weight"):
        verify({**weights, "res2.0.conv3.weight": np.zeros((64, 64, 1, 1))}, result.overlay, "r18")
    with pytest.raises(UserError, match=r"wrong shape: res5.1.conv2.weight \(512, 512, 1, 1\)"):
        verify({**weights, "res5.1.conv2.weight": np.zeros((512, 512, 1, 1))}, result.overlay, "r18")


# --- detectron2's own checkpointer on full models ----------------------------------------------

@pytest.mark.parametrize("config, backbone_prefixes", [
    ("COCO-InstanceSegmentation/mask_rcnn_R_50_C4_1x.yaml", ("backbone.", "roi_heads.")),
    ("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml", ("backbone.bottom_up.",)),
])
def test_detectron2_models_load_every_backbone_tensor(tmp_path, resnet50, config, backbone_prefixes):
    result = convert(save(tmp_path, moco_v2(resnet50.state_dict())))
    cfg = get_cfg()
    cfg.merge_from_file(model_zoo.get_config_file(config))
    cfg.merge_from_list([item for pair in load_overlay(result.weights_path).items() for item in pair])
    cfg.MODEL.DEVICE, cfg.MODEL.BACKBONE.FREEZE_AT = "cpu", 0  # the tasks' protocol: nothing frozen
    model = build_model(cfg)

    backbone = {}  # model key -> name in the weights file, for every tensor of the ResNet
    for key in model.state_dict():
        for prefix in backbone_prefixes:
            name = key[len(prefix):]
            if key.startswith(prefix) and name.split(".")[0] in ("stem", "res2", "res3", "res4", "res5"):
                backbone[key] = name
    with torch.no_grad():  # a sentinel shows which tensors the checkpointer did not fill
        for key in backbone:
            model.state_dict()[key].fill_(-7)
    DetectionCheckpointer(model).load(str(result.weights_path))

    with open(result.weights_path, "rb") as f:
        weights = pickle.load(f)["model"]  # our own output, trusted
    assert sorted(backbone.values()) == sorted(weights)  # every tensor of the file has a place
    state = model.state_dict()
    missing = [key for key, name in backbone.items() if not np.array_equal(state[key].numpy(), weights[name])]
    assert missing == []


# --- detectron2 files as input -------------------------------------------------------------------

def test_detectron2_file_is_reported_not_rewritten(tmp_path, resnet50):
    first = convert(save(tmp_path, plain_torchvision(resnet50.state_dict()), "r50.pth"))
    before = {p: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    again = convert(first.weights_path)
    assert again.layout == "detectron2" and again.author == "moco-transfer"
    assert again.weights_path == first.weights_path and again.overlay_path == first.overlay_path
    assert "already converted" in again.summary()
    assert {p: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == before

    moved = tmp_path / "moved"  # the overlay travels with the weights; MODEL.WEIGHTS follows the file
    moved.mkdir()
    for path in (first.weights_path, first.overlay_path):
        (moved / path.name).write_bytes(path.read_bytes())
    overlay = load_overlay(moved / "r50.pkl")
    assert overlay["MODEL.WEIGHTS"] == str(moved / "r50.pkl")
    assert {k: v for k, v in overlay.items() if k != "MODEL.WEIGHTS"} == \
           {k: v for k, v in first.overlay.items() if k != "MODEL.WEIGHTS"}


def caffe2_resnet50_blobs(width=4):
    """Blob names and shapes of detectron2's ImageNetPretrained/MSRA/R-50.pkl, at 1/16 of the width."""
    blobs = {"conv1_w": np.zeros((width, 3, 7, 7), np.float32), "fc1000_w": np.zeros((10, 32 * width), np.float32)}
    blobs.update({"res_conv1_bn_s": np.ones(width, np.float32), "res_conv1_bn_b": np.zeros(width, np.float32)})
    in_channels, mid, out = width, width, 4 * width
    for stage, blocks in zip(range(2, 6), (3, 4, 6, 3)):
        for block in range(blocks):
            shapes = {"branch2a": (mid, in_channels, 1, 1), "branch2b": (mid, mid, 3, 3), "branch2c": (out, mid, 1, 1)}
            if block == 0:
                shapes["branch1"] = (out, in_channels, 1, 1)
            for branch, shape in shapes.items():
                name = f"res{stage}_{block}_{branch}"
                blobs[f"{name}_w"] = np.random.rand(*shape).astype(np.float32)
                blobs[f"{name}_bn_s"] = np.ones(shape[0], np.float32)
                blobs[f"{name}_bn_b"] = np.zeros(shape[0], np.float32)
            in_channels = out
        mid, out = mid * 2, out * 2
    return blobs


def test_msra_weights_get_caffe_settings(tmp_path):
    path = tmp_path / "R-50.pkl"
    path.write_bytes(pickle.dumps(caffe2_resnet50_blobs(), protocol=2))
    overlay = load_overlay(path)
    assert overlay["INPUT.FORMAT"] == "BGR" and overlay["MODEL.PIXEL_STD"] == [1.0, 1.0, 1.0]
    assert overlay["MODEL.PIXEL_MEAN"] == [103.53, 116.28, 123.675]
    assert overlay["MODEL.RESNETS.STRIDE_IN_1X1"] is True and overlay["MODEL.RESNETS.NORM"] == "FrozenBN"
    assert "MODEL.BACKBONE.FREEZE_AT" not in overlay and overlay["MODEL.RESNETS.DEPTH"] == 50
    # fine-tuning takes the pixels and the ResNet's shape from it; FrozenBN is the file's, not a protocol
    owned, protocol = weights_settings(overlay)
    assert owned["INPUT.FORMAT"] == "BGR" and protocol == {"MODEL.RESNETS.NORM": "FrozenBN"}
    # the inferred settings build a backbone that detectron2 fills from the file
    backbone = backbone_from_overlay(overlay)
    with torch.no_grad():
        for value in backbone.state_dict().values():
            value.fill_(-7)
    DetectionCheckpointer(backbone).load(str(path))
    assert all((value != -7).all() for key, value in backbone.state_dict().items() if key.endswith("weight"))
    assert convert(path).layout == "detectron2" and sorted(os.listdir(tmp_path)) == ["R-50.pkl"]


def test_unknown_detectron2_author_needs_an_overlay(tmp_path):
    path = tmp_path / "model_final.pkl"
    path.write_bytes(pickle.dumps({"model": {"backbone.stem.conv1.weight": np.zeros((4, 3, 7, 7))},
                                   "__author__": "someone"}))
    with pytest.raises(UserError, match="'someone' without an overlay"):
        load_overlay(path)
    path.with_suffix(".yaml").write_text("MODEL:\n  WEIGHTS: [\n")  # an overlay edited by hand, badly
    with pytest.raises(UserError, match=r"model_final.yaml: not valid YAML: .* at line 3, column 1$"):
        load_overlay(path)
    path.with_suffix(".yaml").write_text("MODEL:\n  RESNETS:\n    DEPTH: 50\n")
    assert load_overlay(path) == {"MODEL.RESNETS.DEPTH": 50, "MODEL.WEIGHTS": str(path.resolve())}


# --- bad inputs --------------------------------------------------------------------------------

class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def bad_inputs(tmp_path, resnet18_state):
    good = tmp_path / "good.pth"
    torch.save(moco_v1(resnet18_state), good)
    vit = {f"module.base_encoder.{k}": torch.zeros(2, 2) for k in (
        "cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.norm1.weight", "blocks.0.attn.qkv.weight")}
    se = {**resnet18_state, "layer1.0.se.fc1.weight": torch.zeros(4, 64)}
    return {
        "truncated": (good.read_bytes()[: good.stat().st_size // 2], "truncated or corrupt"),
        "wrong layout": ({"state_dict": {"encoder.weight": torch.zeros(2)}, "epoch": 3}, "encoder.weight"),
        "vit": ({"epoch": 300, "state_dict": vit}, "module.base_encoder.cls_token"),
        "empty": ({}, "empty dict"),
        "not a dict": (torch.zeros(3), "a Tensor"),
        "not a ResNet": (se, "layer1.0.se.fc1.weight"),
        "code in a pickle": (pickle.dumps({"model": {"x": _RunsCode(tmp_path / "ran")}, "__author__": "x"}),
                             "refusing to load pathlib.Path.touch"),
    }


def test_bad_inputs_fail_clearly_and_write_nothing(tmp_path):
    cases = bad_inputs(tmp_path, randomized(torchvision.models.resnet18()).state_dict())
    for name, (content, expected) in cases.items():
        folder = tmp_path / name.replace(" ", "_")
        folder.mkdir()
        path = folder / "ckpt.pth"
        path.write_bytes(content) if isinstance(content, bytes) else torch.save(content, path)
        with pytest.raises(UserError) as error:
            convert(path)
        message = str(error.value)
        assert str(path) in message and expected in message, (name, message)
        if name in ("wrong layout", "vit", "empty", "not a dict"):
            assert "Known layouts: moco-v1/v2" in message and "moco-v3" in message and "torchvision" in message
        assert os.listdir(folder) == ["ckpt.pth"], name
    assert not (tmp_path / "ran").exists()  # the pickle's code never ran

    with pytest.raises(UserError, match="no such file"):
        convert(tmp_path / "absent.pth")
    with pytest.raises(UserError, match="must end in .pkl"):
        convert(tmp_path / "good.pth", output=tmp_path / "w.pth")
    assert not (tmp_path / "w.pth").exists()


# --- the command line --------------------------------------------------------------------------

def test_command_line(tmp_path):
    model = randomized(torchvision.models.resnet18())
    good, bad = save(tmp_path, moco_v1(model.state_dict())), save(tmp_path, {"state_dict": {}}, "bad.pth")
    tool = [sys.executable, str(REPO / "tools" / "convert_to_d2.py")]
    ok = subprocess.run(tool + [str(good), "--output", str(tmp_path / "w" / "r18.pkl"), "--norm", "BN"],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "layout:   moco-v1/v2" in ok.stdout and str(tmp_path / "w" / "r18.yaml") in ok.stdout
    assert "module.encoder_k.*" in ok.stdout and load_overlay(tmp_path / "w" / "r18.pkl")["MODEL.RESNETS.NORM"] == "BN"

    failed = subprocess.run(tool + [str(bad)], capture_output=True, text=True)
    assert failed.returncode == 2
    assert failed.stderr.startswith("error: ") and "Known layouts" in failed.stderr
    assert len(failed.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "bad.pkl").exists()


def test_weights_with_nan_are_refused_unless_allowed(tmp_path):
    model = randomized(torchvision.models.resnet18())
    state = moco_v1(model.state_dict())
    state["state_dict"]["module.encoder_q.layer2.0.conv1.weight"][0, 0, 0, 0] = float("nan")
    state["state_dict"]["module.encoder_q.bn1.running_var"][3] = float("inf")
    path = save(tmp_path, state)
    tool = [sys.executable, str(REPO / "tools" / "convert_to_d2.py"), str(path)]
    refused = subprocess.run(tool, capture_output=True, text=True)
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert "contain NaN/Inf (2 tensors: " in refused.stderr and "res3.0.conv1.weight" in refused.stderr
    assert "--allow-non-finite" in refused.stderr and not list(tmp_path.glob("*.pkl"))
    allowed = subprocess.run(tool + ["--allow-non-finite"], capture_output=True, text=True)
    assert allowed.returncode == 0, allowed.stderr
    assert (tmp_path / "ckpt.pkl").is_file()


def test_a_full_disk_is_one_line_naming_the_weights_file_and_leaves_no_file(tmp_path, monkeypatch, capsys):
    from collections import namedtuple

    from transfer import fileio

    from conftest import load_script

    path = save(tmp_path, moco_v1(randomized(torchvision.models.resnet18()).state_dict()))
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(fileio.shutil, "disk_usage", lambda folder: Usage(2**20, 2**20 - 4096, 4096))
    with pytest.raises(SystemExit) as exit:
        load_script("tools/convert_to_d2.py").main([str(path), "--output", str(tmp_path / "w" / "r18.pkl")])
    error = capsys.readouterr().err.strip().splitlines()
    assert exit.value.code == 2 and error == [
        f"error: {tmp_path / 'w' / 'r18.pkl'}: cannot write it: no space left (0 MiB free)"]
    assert os.listdir(tmp_path / "w") == []
