"""SyncFreeRPN: detectron2's RPN targets and losses, without reading GPU values back to the host."""
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling.matcher import Matcher
from detectron2.modeling.proposal_generator import build_proposal_generator
from detectron2.structures import Boxes, ImageList, Instances, pairwise_iou
from detectron2.utils.events import EventStorage

from transfer.d2 import rpn
from transfer.finetune_bench import HostReadbacks


def random_boxes(n, size=100.0, generator=None):
    xy = torch.rand(n, 2, generator=generator) * size * 0.8
    wh = torch.rand(n, 2, generator=generator) * size * 0.4 + 1
    return torch.cat([xy, xy + wh], dim=1)


@pytest.mark.parametrize("matcher", [
    Matcher([0.3, 0.7], [0, -1, 1], allow_low_quality_matches=True),  # RPN's
    Matcher([0.5], [0, 1], allow_low_quality_matches=False),           # the box head's
])
def test_match_equals_detectron2s_matcher(matcher):
    generator = torch.Generator().manual_seed(0)
    anchors = Boxes(random_boxes(500, generator=generator))
    for n in (1, 3, 20):
        gt = Boxes(random_boxes(n, generator=generator))
        quality = pairwise_iou(gt, anchors)
        quality[:, :5] = 0.3  # ties and values on a threshold
        expected_matches, expected_labels = matcher(quality)
        matches, labels = rpn.match(matcher, quality)
        assert torch.equal(labels, expected_labels)
        positive = labels == 1
        assert torch.equal(matches[positive], expected_matches[positive])


@pytest.mark.parametrize("matcher", [
    Matcher([0.3, 0.7], [0, -1, 1], allow_low_quality_matches=True),
    Matcher([0.5], [0, 1], allow_low_quality_matches=False),
])
def test_batched_iou_and_match_equal_detectron2s_per_image(matcher):
    """A batch padded to its most objects (rows of -1): the same IoU, labels and matches as detectron2's
    pairwise_iou and Matcher image by image, an image without objects included."""
    generator = torch.Generator().manual_seed(1)
    counts = (3, 0, 20, 1)
    gt = [random_boxes(n, generator=generator) for n in counts]
    boxes = torch.stack([random_boxes(400, generator=generator) for _ in counts])
    padded = torch.zeros(len(counts), max(counts), 4)
    for i, g in enumerate(gt):
        padded[i, :len(g)] = g
    quality = rpn.batched_iou(padded, boxes)
    for i, n in enumerate(counts):
        quality[i, n:] = -1.0
    matches, labels = rpn.match(matcher, quality)
    for i, g in enumerate(gt):
        expected = pairwise_iou(Boxes(g), Boxes(boxes[i]))
        assert torch.equal(quality[i, :len(g)], expected)
        expected_matches, expected_labels = matcher(expected)
        assert torch.equal(labels[i], expected_labels)
        positive = labels[i] == 1
        assert torch.equal(matches[i][positive], expected_matches[positive])
        assert bool((matches[i] < max(len(g), 1)).all())  # never a padding row


def test_sampling_keeps_detectron2s_counts_and_draws_uniformly():
    torch.manual_seed(0)
    candidates = torch.zeros(3, 1000, dtype=torch.bool)
    candidates[0, :10] = True          # fewer candidates than asked for: all of them
    candidates[1, 100:400] = True      # more: a subset
    counts = torch.tensor([10, 50, 0])
    picked = torch.stack([rpn.sample_per_row(candidates, counts, 64) for _ in range(400)])
    assert (picked.sum(dim=2) == counts).all()
    assert not (picked & ~candidates).any()
    # Each of row 1's 300 candidates is drawn 50/300 of the time (binomial std over 400 draws: 0.019).
    frequency = picked[:, 1, 100:400].float().mean(dim=0)
    assert (frequency - 50 / 300).abs().max() < 0.1 and abs(frequency.mean() - 50 / 300) < 0.005


def build_rpns(**settings):
    cfg = get_cfg()
    cfg.MODEL.RPN.IN_FEATURES = ["p2", "p3"]
    cfg.MODEL.ANCHOR_GENERATOR.SIZES = [[16], [32]]
    cfg.MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS = [[0.5, 1.0, 2.0]]
    cfg.merge_from_list([x for item in settings.items() for x in item])
    shapes = {"p2": ShapeSpec(channels=8, stride=4), "p3": ShapeSpec(channels=8, stride=8)}
    cfg.MODEL.PROPOSAL_GENERATOR.NAME = "RPN"
    reference = build_proposal_generator(cfg, shapes)
    cfg.MODEL.PROPOSAL_GENERATOR.NAME = "SyncFreeRPN"
    ours = build_proposal_generator(cfg, shapes)
    ours.load_state_dict(reference.state_dict())
    return reference.train(), ours.train()


def batch():
    """Two 96x128 images (one without objects), FPN features at strides 4 and 8."""
    generator = torch.Generator().manual_seed(1)
    images = ImageList(torch.zeros(3, 3, 96, 128), [(96, 128), (96, 120), (90, 128)])
    features = {"p2": torch.randn(3, 8, 24, 32, generator=generator),
                "p3": torch.randn(3, 8, 12, 16, generator=generator)}
    gt = []
    for n, size in zip((4, 0, 9), images.image_sizes):
        instances = Instances(size)
        instances.gt_boxes = Boxes(random_boxes(n, 90.0, generator))
        gt.append(instances)
    return images, features, gt


def losses_and_gradients(module, images, features, gt):
    features = {k: v.clone().requires_grad_() for k, v in features.items()}
    with EventStorage():
        _, losses = module(images, features, gt)
    sum(losses.values()).backward()
    return losses, {k: v.grad for k, v in features.items()}, {k: p.grad for k, p in module.named_parameters()}


def test_losses_and_gradients_equal_rpns_when_sampling_takes_every_anchor():
    # A per-image sample larger than the anchor count (1152) makes detectron2's draw deterministic.
    reference, ours = build_rpns(**{"MODEL.RPN.BATCH_SIZE_PER_IMAGE": 100000, "MODEL.RPN.POSITIVE_FRACTION": 0.5})
    images, features, gt = batch()
    expected = losses_and_gradients(reference, images, features, gt)
    got = losses_and_gradients(ours, images, features, gt)
    for name in ("loss_rpn_cls", "loss_rpn_loc"):
        torch.testing.assert_close(got[0][name], expected[0][name])
    for got_grads, expected_grads in zip(got[1:], expected[1:]):
        for key in expected_grads:
            torch.testing.assert_close(got_grads[key], expected_grads[key])


def test_sampled_labels_have_rpns_counts():
    reference, ours = build_rpns(**{"MODEL.RPN.BATCH_SIZE_PER_IMAGE": 32})
    images, features, gt = batch()
    anchors = ours.anchor_generator([features[f] for f in ours.in_features])
    torch.manual_seed(0)
    expected, _ = reference.label_and_sample_anchors(anchors, gt)
    got, matched = ours.label_and_sample_anchors(anchors, gt)
    for mine, theirs in zip(got, expected):
        assert mine.dtype == theirs.dtype
        for label in (-1, 0, 1):
            assert (mine == label).sum() == (theirs == label).sum()
    assert (got[1] == 1).sum() == 0 and (got[1] == 0).sum() == 32  # no objects: all background
    assert torch.equal(matched[1], torch.zeros_like(matched[1]))


def test_training_targets_and_losses_read_nothing_back():
    reference, ours = build_rpns(**{"MODEL.RPN.BATCH_SIZE_PER_IMAGE": 32})
    images, features, gt = batch()
    counts = {}
    for name, module in (("RPN", reference), ("SyncFreeRPN", ours)):
        anchors = module.anchor_generator([features[f] for f in module.in_features])
        logits, deltas = module.rpn_head([features[f] for f in module.in_features])
        logits = [x.permute(0, 2, 3, 1).flatten(1) for x in logits]
        deltas = [x.view(x.shape[0], -1, 4, x.shape[-2], x.shape[-1]).permute(0, 3, 4, 1, 2).flatten(1, -2)
                  for x in deltas]
        with EventStorage(), HostReadbacks() as counted:
            labels, boxes = module.label_and_sample_anchors(anchors, gt)
            module.losses(anchors, logits, labels, deltas, boxes)
        counts[name] = dict(counted.readbacks)
    assert not counts["SyncFreeRPN"] and sum(counts["RPN"].values()) >= 3 * 3, counts


@pytest.mark.parametrize("min_box_size", [0.0, 4.0])
def test_training_proposals_equal_detectron2s(min_box_size):
    from detectron2.modeling.proposal_generator.proposal_utils import find_top_rpn_proposals

    generator = torch.Generator().manual_seed(2)
    sizes = [(96, 128), (60, 80)]
    proposals, logits = [], []
    for count in (3000, 800, 200):  # three levels, one with fewer boxes than pre_nms_topk
        centre = torch.rand(2, count, 2, generator=generator) * 140 - 5
        size = torch.rand(2, count, 2, generator=generator) * 30
        size[:, :20] = 0  # empty boxes
        proposals.append(torch.cat([centre - size / 2, centre + size / 2], dim=2))
        logits.append(torch.randn(2, count, generator=generator))
    args = (sizes, 0.7, 1000, 300, min_box_size)
    expected = find_top_rpn_proposals(proposals, logits, *args, True)
    got = rpn.select_proposals(proposals, logits, *args)
    for mine, theirs in zip(got, expected):
        assert mine.image_size == theirs.image_size and 0 < len(theirs) <= 300
        torch.testing.assert_close(mine.proposal_boxes.tensor, theirs.proposal_boxes.tensor, rtol=0, atol=0)
        torch.testing.assert_close(mine.objectness_logits, theirs.objectness_logits, rtol=0, atol=0)
    logits[1][0, 5] = float("nan")
    with pytest.raises(FloatingPointError, match="diverged"):
        rpn.select_proposals(proposals, logits, *args)


def test_a_training_forward_reads_back_once_per_batch_and_twice_per_image():
    reference, ours = build_rpns(**{"MODEL.RPN.BATCH_SIZE_PER_IMAGE": 32})
    images, features, gt = batch()
    counts = {}
    for name, module in (("RPN", reference), ("SyncFreeRPN", ours)):
        with EventStorage(), HostReadbacks() as counted:
            module(images, features, gt)
        counts[name] = sum(counted.readbacks.values())
    # The Inf/NaN check; per image, NMS and dropping the empty boxes after it.
    assert counts["SyncFreeRPN"] == 1 + 2 * len(gt) and counts["RPN"] > 3 * counts["SyncFreeRPN"], counts
