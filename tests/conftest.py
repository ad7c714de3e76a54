"""Fixtures shared by the fine-tuning tests."""
import pytest
import torch
import torchvision


@pytest.fixture(scope="session")
def moco_weights(tmp_path_factory):
    """A random torchvision ResNet-50 in MoCo's checkpoint layout, converted by our converter."""
    from transfer.convert import convert

    folder = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    state = {f"module.encoder_q.{k}": v for k, v in torchvision.models.resnet50().state_dict().items()}
    torch.save({"epoch": 1, "arch": "resnet50", "state_dict": state}, folder / "moco.pth.tar")
    return convert(folder / "moco.pth.tar", output=folder / "moco.pkl").weights_path
