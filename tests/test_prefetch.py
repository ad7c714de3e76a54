"""Prefetcher: the loader's batches, in order, drawn ahead in a thread, copied to the device without waits."""
import threading
import time

import numpy as np
import pytest
import torch
from detectron2.structures import BitMasks, Boxes, Instances, Keypoints, PolygonMasks

from transfer.d2.prefetch import Prefetcher, to_device
from transfer.finetune_bench import HostReadbacks


def batch(index: int, images: int = 2):
    """A batch as detectron2's DatasetMapper makes it, with every annotation structure."""
    inputs = []
    for i in range(images):
        instances = Instances((32, 48))
        instances.gt_boxes = Boxes(torch.tensor([[1.0, 2.0, 20.0, 30.0], [5.0, 5.0, 9.0, 9.0]]) + index)
        instances.gt_classes = torch.tensor([index, i])
        instances.gt_masks = PolygonMasks([[np.array([1, 2, 20, 2, 20, 30], dtype=np.float64)]] * 2)
        instances.gt_keypoints = Keypoints(torch.rand(2, 17, 3))
        instances.gt_bitmasks = BitMasks(torch.zeros(2, 32, 48, dtype=torch.bool))
        inputs.append({"file_name": f"{index}_{i}.jpg", "height": 32, "width": 48, "image_id": index,
                       "image": torch.full((3, 32, 48), index, dtype=torch.uint8), "instances": instances})
    return inputs


class CountingLoader:
    """Batches 0, 1, ... (``fail_at``: raise instead); counts how many were drawn and whether iteration ended."""

    def __init__(self, length: int, fail_at: int | None = None):
        self.length, self.fail_at, self.drawn, self.closed = length, fail_at, 0, False

    def __iter__(self):
        try:
            for index in range(self.length):
                if index == self.fail_at:
                    raise ValueError(f"data/{index}.jpg: cannot identify image file")
                self.drawn += 1
                yield batch(index)
        finally:
            self.closed = True


def prefetch_threads():
    return [t for t in threading.enumerate() if t.name == "prefetch"]


def wait_for(condition, seconds: float = 20.0) -> bool:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    return condition()


def test_yields_the_loaders_batches_in_order():
    got = list(Prefetcher(CountingLoader(7), "cpu"))
    assert [b[0]["image_id"] for b in got] == list(range(7))
    expected = batch(3)
    for ours, theirs in zip(got[3], expected):
        assert ours["file_name"] == theirs["file_name"]
        torch.testing.assert_close(ours["image"], theirs["image"])
        torch.testing.assert_close(ours["instances"].gt_boxes.tensor, theirs["instances"].gt_boxes.tensor)
        torch.testing.assert_close(ours["instances"].gt_classes, theirs["instances"].gt_classes)
    assert not prefetch_threads()


def test_draws_at_most_depth_batches_ahead():
    loader = CountingLoader(100)
    batches = iter(Prefetcher(loader, "cpu", depth=2))
    assert next(batches)[0]["image_id"] == 0
    # 1 taken + 2 queued + 1 in the thread's hands, waiting for room.
    assert wait_for(lambda: loader.drawn == 4)
    time.sleep(0.3)
    assert loader.drawn == 4
    assert [next(batches)[0]["image_id"] for _ in range(3)] == [1, 2, 3]
    batches.close()  # what happens when the trainer drops its iterator
    assert not prefetch_threads() and loader.closed


def test_closing_the_prefetcher_ends_its_open_iterations_and_their_threads():
    loaders = [CountingLoader(100), CountingLoader(100)]
    prefetchers = [Prefetcher(loaders[0], "cpu", depth=2), Prefetcher(loaders[1], "cpu", depth=0)]
    iterations = [iter(p) for p in prefetchers]
    assert [next(batches)[0]["image_id"] for batches in iterations] == [0, 0]
    assert len(prefetch_threads()) == 1  # depth 0: no thread
    for prefetcher in prefetchers:
        prefetcher.close()  # what the trainer does after its last step
    assert not prefetch_threads() and all(loader.closed for loader in loaders)
    for batches in iterations:
        with pytest.raises(StopIteration):
            next(batches)


def test_a_loader_error_reaches_the_training_thread():
    batches = iter(Prefetcher(CountingLoader(10, fail_at=2), "cpu"))
    assert [next(batches)[0]["image_id"] for _ in range(2)] == [0, 1]
    with pytest.raises(ValueError, match="data/2.jpg: cannot identify image file"):
        next(batches)
    assert not prefetch_threads()


def test_to_device_moves_every_tensor_and_keeps_the_structures():
    inputs = batch(1)
    moved = to_device(inputs, torch.device("meta"))
    assert len(moved) == len(inputs)
    for ours, theirs in zip(moved, inputs):
        assert {k: v for k, v in ours.items() if k not in ("image", "instances")} == \
               {k: v for k, v in theirs.items() if k not in ("image", "instances")}
        assert ours["image"].device.type == "meta" and ours["image"].shape == theirs["image"].shape
        instances = ours["instances"]
        assert instances.image_size == (32, 48)
        assert instances.get_fields().keys() == theirs["instances"].get_fields().keys()
        for name in ("gt_boxes", "gt_keypoints", "gt_bitmasks"):
            assert type(instances.get(name)) is type(theirs["instances"].get(name))
            assert instances.get(name).tensor.device.type == "meta"
        assert instances.gt_classes.device.type == "meta"
        assert instances.gt_masks is theirs["instances"].gt_masks  # polygons stay on the host


@pytest.mark.gpu  # copies to a GPU
def test_copies_to_the_gpu_without_waiting():
    inputs = batch(1)
    with HostReadbacks("cuda") as detectron2s:  # what GeneralizedRCNN does with a batch: 5 blocking copies per image
        for x in inputs:
            x["image"].to("cuda"), x["instances"].to("cuda")
    with HostReadbacks("cuda") as counted:
        moved = to_device(inputs, torch.device("cuda"))
    assert sum(detectron2s.readbacks.values()) == 5 * len(inputs) and not counted.readbacks
    torch.testing.assert_close(moved[1]["instances"].gt_boxes.tensor.cpu(), inputs[1]["instances"].gt_boxes.tensor)
