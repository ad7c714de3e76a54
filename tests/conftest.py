"""Fixtures shared by several test modules."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from PIL import Image

import transfer  # noqa: F401  (before any test module imports detectron2: transfer/d2compat.py patches it)

REPO = Path(__file__).resolve().parent.parent


def pytest_collection_modifyitems(config, items):
    """``@pytest.mark.gpu`` tests need a CUDA device: skipped, saying so, on a machine without one."""
    if torch.cuda.is_available():
        return
    no_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(no_gpu)


def load_script(path):
    """A script of the repository (``tools/run_suite.py``, ...) imported as a module, not run."""
    spec = importlib.util.spec_from_file_location(Path(path).stem, REPO / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

COLOURS = [(220, 40, 40), (40, 200, 60), (50, 60, 220)]


def _write_colour_image_folder(root, per_class, val_per_class, size=(40, 48), seed=0):
    rng = np.random.default_rng(seed)
    for split, n in (("train", per_class), ("val", val_per_class)):
        for c, colour in enumerate(COLOURS):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = rng.normal(colour, 30, size=(*size, 3)).clip(0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.jpg")
    return root


@pytest.fixture(scope="session")
def colour_image_folder():
    """A writer of ``root/{train,val}/<class>/*.jpg``: noisy images of one colour per class (3 classes),
    which k-NN and a linear classifier can tell apart."""
    return _write_colour_image_folder


@pytest.fixture(scope="session")
def moco_weights(tmp_path_factory):
    """A random torchvision ResNet-50 in MoCo's checkpoint layout, converted by our converter."""
    from transfer.convert import convert

    folder = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    state = {f"module.encoder_q.{k}": v for k, v in torchvision.models.resnet50().state_dict().items()}
    torch.save({"epoch": 1, "arch": "resnet50", "state_dict": state}, folder / "moco.pth.tar")
    return convert(folder / "moco.pth.tar", output=folder / "moco.pkl").weights_path

class Tiny(nn.Module):
    """A small torchvision-like encoder (num_classes, norm_layer); batch_independent drops the norm
    layer, so a key depends on its own image only and can be checked sample by sample."""

    def __init__(self, num_classes, norm_layer=nn.BatchNorm2d, batch_independent=False):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.Identity() if batch_independent else norm_layer(8)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        return self.fc(F.relu(self.bn(self.conv(x))).mean((2, 3)))
