"""tools/bench_finetune.py measures the real training step of a task (no timing assertions)."""
import pytest

from transfer import finetune_bench
from transfer.d2 import sync_free
from transfer.datasets import demo
from transfer.errors import UserError


@pytest.mark.slow
def test_bench_times_the_tasks_training_step(tmp_path):
    weights = finetune_bench.random_init_weights(tmp_path)
    row = finetune_bench.time_steps("coco_fpn_1x", weights, "fp32", "demo", batch=2, warmup=1, iters=2,
                                    datasets_root=demo.ensure())
    assert (row.task, row.precision, row.batch) == ("coco_fpn_1x", "fp32", 2)
    assert row.s_per_iter > 0 and 0 <= row.data_s_per_iter < row.s_per_iter
    assert row.images_per_s == 2 / row.s_per_iter
    table = finetune_bench.markdown([row]).splitlines()
    assert table[0].startswith("| task | precision") and table[2].startswith("| coco_fpn_1x | fp32 | detectron2 | 2 |")
    # A training step dispatches thousands of operators (backward included), some of them read-backs.
    assert row.ops_per_step > 1000 and 0 < row.readbacks_per_step < row.ops_per_step
    sync_free = finetune_bench.time_steps("coco_fpn_1x", weights, "fp32", "demo", batch=2, warmup=1, iters=1,
                                          datasets_root=demo.ensure(), heads="sync_free")
    assert sync_free.heads == "sync_free" and sync_free.readbacks_per_step < row.readbacks_per_step / 4
    # The trainer's data ends at the schedule's last iteration: the bench's steps must come before it.
    with pytest.raises(UserError, match="5 warm-up \\+ 55 timed steps \\+ 1 counted do not fit in coco_fpn_1x's demo "
                                        "schedule \\(60 iterations\\)"):
        finetune_bench.time_steps("coco_fpn_1x", weights, "fp32", "demo", warmup=5, iters=55,
                                  datasets_root=demo.ensure())



@pytest.mark.slow
def test_bench_times_a_custom_dataset_task(tmp_path):
    from test_finetune import _coco_custom  # a user's COCO json, described by a dataset YAML

    task = _coco_custom(demo.ensure(), tmp_path / "shapes")
    row = finetune_bench.time_steps(str(task), finetune_bench.random_init_weights(tmp_path), "fp32", "demo",
                                    batch=2, warmup=1, iters=1)
    assert row.batch == 2 and row.s_per_iter > 0

def test_sync_free_heads_replace_detectron2s_rpn_and_our_roi_heads(moco_weights):
    from transfer.finetune import resolve_config
    from transfer.tasks import get_task

    fpn = sync_free.with_heads(resolve_config(get_task("coco_fpn_1x"), moco_weights, "demo"), "sync_free")
    assert (fpn.MODEL.PROPOSAL_GENERATOR.NAME, fpn.MODEL.ROI_HEADS.NAME) == ("SyncFreeRPN", "SyncFreeStandardROIHeads")
    c4 = sync_free.with_heads(resolve_config(get_task("coco_c4_1x"), moco_weights, "demo"), "sync_free")
    assert c4.MODEL.PROPOSAL_GENERATOR.NAME == "SyncFreeRPN"
    assert c4.MODEL.ROI_HEADS.NAME == "SyncFreeRes5ROIHeadsExtraNorm"
    custom = resolve_config(get_task("coco_fpn_1x"), moco_weights, "demo",
                            opts=["MODEL.ROI_HEADS.NAME", "Res5ROIHeads"])
    assert sync_free.with_heads(custom, "sync_free").MODEL.ROI_HEADS.NAME == "Res5ROIHeads"  # no sync-free twin


def test_the_readback_counter_sees_what_waits_for_a_gpu():
    import torch

    x = torch.arange(6.0)
    with finetune_bench.HostReadbacks() as counted:
        (x * 2).exp()  # before the first read-back
        x.sum().item()
        x[x > 2]
        torch.nonzero(x)
        x[torch.tensor([0, 1])]  # integer indexing needs no read-back
        (x * 2).exp()
    assert counted.readbacks == {"aten::_local_scalar_dense": 1, "aten::index": 1, "aten::nonzero": 1}
    assert counted.ops >= 9
    # Dispatched after the first read-back (.item()): all but the first three (mul, exp, sum) and it.
    assert counted.ops_after_wait == counted.ops - 4
    # With the model on a GPU, the same operators on host tensors wait for nothing.
    with finetune_bench.HostReadbacks("cuda") as on_the_host:
        x.sum().item()
        x[x > 2]
        torch.nonzero(x)
    assert not on_the_host.readbacks and on_the_host.ops >= 5


def test_synthetic_coco_has_cocos_load(tmp_path):
    """The --synthetic data: COCO-format, 640x480, several polygon instances per image, loadable by detectron2."""
    from detectron2.data.datasets import load_coco_json

    root = demo.synthetic_coco(tmp_path, num_images=6)
    records = load_coco_json(str(root / "coco/annotations/instances_train2017.json"), str(root / "coco/train2017"))
    assert len(records) == 6
    assert all((r["width"], r["height"]) == (640, 480) for r in records)
    counts = [len(r["annotations"]) for r in records]
    assert min(counts) >= 3 and sum(counts) / len(counts) >= 5
    assert all(a["segmentation"] and a["bbox"][2] > 0 for r in records for a in r["annotations"])
    assert demo.synthetic_coco(tmp_path, num_images=6) == root  # written once


def test_mask_target_bench_times_both_rasterizers_on_the_same_proposals(tmp_path):
    root = demo.synthetic_coco(tmp_path, num_images=2)
    rows = finetune_bench.time_mask_targets(root, "cpu", images=2, rois_per_image=8, repeats=1)
    assert [(r.rasterizer, r.rois) for r in rows] == [("detectron2", 16), ("packed_polygons", 16),
                                                      ("packed_polygons per image", 16)]
    assert all(r.ms_per_batch > 0 for r in rows)
    # ours (detectron2's reads the matched indices back: a copy, uncounted on a CPU)
    assert rows[1].readbacks == rows[2].readbacks == 0
