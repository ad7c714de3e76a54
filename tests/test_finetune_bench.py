"""tools/bench_finetune.py measures the real training step of a task (no timing assertions)."""
from transfer import finetune_bench
from transfer.datasets import demo


def test_bench_times_the_tasks_training_step(tmp_path):
    weights = finetune_bench.random_init_weights(tmp_path)
    row = finetune_bench.time_steps("coco_fpn_1x", weights, "fp32", "demo", batch=2, warmup=1, iters=2,
                                    datasets_root=demo.ensure())
    assert (row.task, row.precision, row.batch) == ("coco_fpn_1x", "fp32", 2)
    assert row.s_per_iter > 0 and 0 <= row.data_s_per_iter < row.s_per_iter
    assert row.images_per_s == 2 / row.s_per_iter
    table = finetune_bench.markdown([row]).splitlines()
    assert table[0].startswith("| task | precision") and table[2].startswith("| coco_fpn_1x | fp32 | 2 |")
