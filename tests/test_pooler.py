"""SyncFreeROIPooler: detectron2's ROIPooler output, with one read-back per call."""
import pytest
import torch
from detectron2.modeling.poolers import ROIPooler
from detectron2.structures import Boxes

from transfer.d2.pooler import SyncFreeROIPooler
from transfer.finetune_bench import HostReadbacks


def box_lists(sizes, generator):
    """Boxes from 4 to 400 pixels wide (every FPN level) in images of 512 x 512."""
    lists = []
    for n in sizes:
        xy = torch.rand(n, 2, generator=generator) * 100
        wh = 4 * 100 ** torch.rand(n, 2, generator=generator)
        lists.append(Boxes(torch.cat([xy, xy + wh], dim=1)))
    return lists


@pytest.mark.parametrize("scales", [(1 / 4, 1 / 8, 1 / 16, 1 / 32), (1 / 16,)], ids=["fpn", "c4"])
def test_pools_what_detectron2_pools_without_read_backs(scales):
    generator = torch.Generator().manual_seed(0)
    reference = ROIPooler((7, 7), scales, sampling_ratio=0, pooler_type="ROIAlignV2")
    ours = SyncFreeROIPooler(reference)
    features = [torch.randn(3, 4, int(512 * s), int(512 * s), generator=generator) for s in scales]
    boxes = box_lists([50, 0, 80], generator)  # an image without boxes in between
    with HostReadbacks() as detectron2s:
        expected = reference(features, boxes)
    with HostReadbacks() as counted:
        got = ours(features, boxes)
    torch.testing.assert_close(got, expected)
    # detectron2: a nonzero per level and a repeat_interleave; ours: one copy (uncounted on a CPU).
    assert not counted.readbacks and sum(detectron2s.readbacks.values()) == len(scales) + (len(scales) > 1)
    assert type(reference) is ROIPooler and ours.pooler.level_poolers is reference.level_poolers
    assert ours.state_dict().keys() == reference.state_dict().keys()  # (none: the same weights files load)


def test_gradients_are_detectron2s():
    generator = torch.Generator().manual_seed(1)
    scales = (1 / 4, 1 / 8, 1 / 16, 1 / 32)
    reference = ROIPooler((7, 7), scales, sampling_ratio=0, pooler_type="ROIAlignV2")
    features = [torch.randn(2, 4, int(512 * s), int(512 * s), generator=generator, requires_grad=True) for s in scales]
    boxes = box_lists([30, 40], generator)
    weights = torch.randn(70, 4, 7, 7, generator=generator)
    grads = []
    for pooler in (reference, SyncFreeROIPooler(reference)):
        grads.append(torch.autograd.grad((pooler(features, boxes) * weights).sum(), features))
    for got, expected in zip(*grads):
        torch.testing.assert_close(got, expected)
