"""Linear evaluation (transfer/linear_eval.py) and the supervised baseline (transfer/pretrain/supervised.py)."""
import dataclasses
import typing

import pytest
import torch
import torchvision

from transfer.errors import UserError
from transfer.linear_eval import LinearEvalConfig, linear_eval
from transfer.pretrain import config, engine, settings
from transfer.pretrain.moco import MoCo
from transfer.pretrain.supervised import SupervisedConfig, train_supervised

from conftest import load_script

pytestmark = pytest.mark.slow  # trains, evaluates or runs tools on generated data: not in `make test-fast`


@pytest.fixture(scope="module")
def data(tmp_path_factory, colour_image_folder):
    return colour_image_folder(tmp_path_factory.mktemp("images"), per_class=8, val_per_class=4, size=(36, 44))


@pytest.fixture(scope="module")
def moco_checkpoint(tmp_path_factory):
    """A MoCo v2 checkpoint (official layout, MLP head) whose query encoder differs from its key encoder."""
    torch.manual_seed(0)
    model = MoCo(torchvision.models.resnet18, dim=16, K=32, mlp=True)
    with torch.no_grad():
        for p in model.encoder_k.parameters():
            p.mul_(-1.0)  # loading the wrong encoder would show
        for name, b in model.encoder_q.named_buffers():
            if name.endswith("running_var"):
                b.uniform_(0.5, 2.0)  # non-default BN statistics, which eval mode must use as they are
    cfg = config.load_config("v2", arch="resnet18", moco_k=32, batch_size=8)
    path = tmp_path_factory.mktemp("moco") / "checkpoint_last.pth.tar"
    engine.save_checkpoint(path, model, torch.optim.SGD(model.parameters(), 0.1), cfg, 4, 2, 0.1)
    return path


def small(pretrained, data, output, **overrides):
    settings = dict(epochs=6, schedule=(4,), lr=0.5, batch_size=8, workers=0, image_size=32)
    return LinearEvalConfig(pretrained=str(pretrained), data=str(data), output=str(output), **(settings | overrides))


def test_linear_eval_trains_only_the_fc_on_the_query_encoder(data, moco_checkpoint, tmp_path):
    result = linear_eval(small(moco_checkpoint, data, tmp_path))
    assert result["arch"] == "resnet18"  # from the checkpoint
    assert [round(h["lr"], 6) for h in result["history"]] == [0.5] * 4 + [0.05] * 2
    assert result["top1"] > 80  # the colours are linearly separable in the frozen features
    moco = torch.load(moco_checkpoint, weights_only=True)["state_dict"]
    trained = torch.load(tmp_path / "linear_classifier.pth", weights_only=True)["state_dict"]
    for key, value in trained.items():
        if key.startswith("fc."):
            continue
        assert torch.equal(value, moco["module.encoder_q." + key]), key  # weights and BN statistics untouched
    assert trained["fc.weight"].shape == (3, 512)
    assert (tmp_path / "linear_eval.json").exists()


def test_supervised_baseline_writes_a_plain_torchvision_state_dict(data, tmp_path):
    weights = train_supervised(SupervisedConfig(data=str(data), output=str(tmp_path), arch="resnet18", epochs=1,
                                                batch_size=8, workers=0, image_size=32))
    assert weights == tmp_path / "supervised_resnet18.pth"
    state = torch.load(weights, weights_only=True)
    reference = torchvision.models.resnet18(num_classes=3).state_dict()
    assert state.keys() == reference.keys()
    assert all(state[k].shape == v.shape for k, v in reference.items())
    # ... which linear evaluation reads too (with --arch: a plain state dict does not name its architecture).
    result = linear_eval(small(weights, data, tmp_path / "lincls", arch="resnet18", epochs=1))
    assert 0 <= result["top1"] <= 100


def test_unreadable_or_mismatched_checkpoints_are_user_errors(data, moco_checkpoint, tmp_path):
    with pytest.raises(UserError, match="does not fit --arch resnet50"):
        linear_eval(small(moco_checkpoint, data, tmp_path, arch="resnet50"))
    with pytest.raises(UserError, match="not a PyTorch checkpoint"):
        linear_eval(small(next((data / "train" / "class0").iterdir()), data, tmp_path))
    with pytest.raises(UserError, match="val/<class>"):
        linear_eval(small(moco_checkpoint, data / "train", tmp_path))


def test_a_small_stem_checkpoint_is_read_by_linear_eval_and_refused_by_the_converter_in_one_line(tmp_path):
    from transfer.convert import convert
    from transfer.linear_eval import load_backbone

    torch.manual_seed(0)
    model = MoCo(torchvision.models.resnet18, dim=16, K=32, small_stem=True)
    cfg = config.load_config("v2", arch="resnet18", moco_k=32, batch_size=8, small_stem=True)
    path = tmp_path / "checkpoint_last.pth.tar"
    engine.save_checkpoint(path, model, torch.optim.SGD(model.parameters(), 0.1), cfg, 4, 2, 0.1)
    backbone, arch = load_backbone(path)
    assert arch == "resnet18" and backbone.conv1.kernel_size == (3, 3)
    assert isinstance(backbone.maxpool, torch.nn.Identity)
    assert torch.equal(backbone.conv1.weight, model.encoder_q.conv1.weight)
    with pytest.raises(UserError, match=r"^\S+checkpoint_last.pth.tar: pre-trained with a 3x3 stem convolution \(the "
                                        r"small-image stem, --small-stem\); detectron2's ResNet has a 7x7 stem"):
        convert(path, output=tmp_path / "weights.pkl")
    assert not (tmp_path / "weights.pkl").exists()


def _a_value(field):
    """(command-line words, the value they parse to), a value other than the field's default."""
    tp, _ = settings.value_type(field)
    if field.metadata["choices"]:
        choice = next(c for c in field.metadata["choices"] if c != field.default)
        return [choice], choice
    if typing.get_origin(tp) in (list, tuple):
        return ["1", "2"], [1, 2]
    return {int: (["7"], 7), float: (["0.25"], 0.25), str: (["x"], "x")}[tp]


@pytest.mark.parametrize("tool, cls", [("linear_eval", LinearEvalConfig), ("train_supervised", SupervisedConfig)])
def test_every_field_is_a_flag_of_its_tool_and_no_optional_flags_give_the_dataclass_defaults(tool, cls):
    parse_args = load_script(f"tools/{tool}.py").parse_args
    fields = dataclasses.fields(cls)
    required = [f for f in fields if f.default is dataclasses.MISSING]
    argv = [word for f in required for word in (settings.flags(f)[0], f"/{f.name}")]
    assert vars(parse_args(argv)) == {f.name: f"/{f.name}" if f in required else f.default for f in fields}
    for field in fields:
        words, value = _a_value(field)
        for flag in settings.flags(field):  # every alias, e.g. -b and --batch-size
            assert getattr(parse_args(argv + [flag, *words]), field.name) == value, flag
    for field in required:  # --pretrained and --data of linear evaluation
        with pytest.raises(SystemExit):
            parse_args([word for f in required if f is not field for word in (settings.flags(f)[0], f"/{f.name}")])
