"""Start a function on every process of a fine-tuning run: detectron2's launch, or gloo on CPU.

detectron2 0.6's ``launch`` spawns one process per GPU with NCCL and asserts CUDA in each; on a
machine without GPUs, more than one process (useful to test the multi-process path, or to use
many cores) goes through the same steps with torch.distributed's gloo backend instead.
"""
from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from detectron2.engine import launch as d2_launch
from detectron2.utils import comm

from transfer import d2compat

TIMEOUT = timedelta(minutes=30)


def launch(main_func, num_processes: int, num_machines: int = 1, machine_rank: int = 0,
           dist_url: str = "auto", args=()):
    """Run ``main_func(*args)`` in ``num_processes`` processes per machine (in this one when 1)."""
    if torch.cuda.is_available() or num_processes * num_machines == 1:
        return d2_launch(main_func, num_processes, num_machines, machine_rank, dist_url, args=args, timeout=TIMEOUT)
    if dist_url == "auto":
        if num_machines != 1:
            raise ValueError("dist_url 'auto' works on one machine only; pass tcp://HOST:PORT")
        dist_url = f"tcp://127.0.0.1:{d2compat.find_free_port()}"
    mp.spawn(_cpu_worker, nprocs=num_processes, daemon=False,
             args=(main_func, num_processes, num_machines, machine_rank, dist_url, args))


def _cpu_worker(local_rank, main_func, num_processes, num_machines, machine_rank, dist_url, args):
    world_size = num_processes * num_machines
    dist.init_process_group("gloo", init_method=dist_url, world_size=world_size,
                            rank=machine_rank * num_processes + local_rank, timeout=TIMEOUT)
    # detectron2's comm helpers (get_local_rank, ...) read the per-machine group, as its launch sets it
    for machine in range(num_machines):
        group = dist.new_group(list(range(machine * num_processes, (machine + 1) * num_processes)))
        if machine == machine_rank:
            d2compat.set_local_process_group(group)
    d2compat.allow_cpu_ddp()
    comm.synchronize()
    try:
        main_func(*args)
        comm.synchronize()  # leave together: tearing gloo down while a peer still uses it can abort
    finally:
        dist.destroy_process_group()
