#!/usr/bin/env python
"""MoCo v1 / v2 pre-training (and the memory-bank / end-to-end baselines), with the official main_moco.py flag names.

    python tools/pretrain_moco.py --preset v2 --data /datasets/imagenet --output runs/moco_v2
    torchrun --nproc_per_node 8 tools/pretrain_moco.py --preset v2 --data ... --output ...

A preset (configs/pretrain/<name>.yaml) gives every setting; each flag overrides one. Without
--data the built-in demo images are used. With neither --preset nor --data: the demo preset on
a machine without a GPU (a CPU run of a minute or two), an error on one with a GPU. Writes
OUTPUT/checkpoint_last.pth.tar (official layout).
"""
import argparse
import os
from pathlib import Path

import torch.distributed

from transfer import image_folder
from transfer.errors import UserError, cli
from transfer.pretrain import config
from transfer.pretrain.engine import data_dirs, pretrain


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", help="v1, v2, demo, or a YAML file (default: v2 with --data; without "
                                     "--data, demo on a machine without a GPU)")
    p.add_argument("--check-data", action="store_true", default=None,  # None: not a preset setting to override
                   help="decode every training image first; list the ones that fail (more than 1%%: stop)")
    # Every setting of transfer/pretrain/config.py; default None keeps the preset's value.
    config.add_arguments(p.add_argument_group("settings (each overrides the preset's value)"))
    return p.parse_args(argv)


def choose_preset(preset, data, device, gpu: bool) -> tuple[str, str | None]:
    """The preset a run uses and, when it was not asked for, the line that says why.

    The v2 preset on the demo images would run for hours on a CPU: with neither --preset nor
    --data, a CPU gets the demo preset and a GPU gets an error naming what to pass.
    """
    if preset is not None:
        return preset, None
    if data is not None:
        return "v2", None
    if gpu and device != "cpu":
        raise UserError("no --data: pass --data DIR (an ImageFolder root with train/<class>/*.jpg) "
                        "with --preset v1 or v2, or --preset demo for the built-in demo images")
    return "demo", ("no GPU and no --preset/--data: running the demo preset on the built-in demo "
                    "images (pass --preset v2 --data DIR for ImageNet settings)")


@cli
def main(argv=None):
    args = vars(parse_args(argv))
    args["preset"], note = choose_preset(args["preset"], args["data"], args["device"], torch.cuda.is_available())
    if note:
        print(note, flush=True)
    check_data = args.pop("check_data")
    cfg = config.load_config(**args)
    if check_data and int(os.environ.get("RANK", 0)) == 0:
        image_folder.scan(data_dirs(cfg.data)[0], Path(cfg.output) / image_folder.SKIPPED)
    checkpoint = pretrain(cfg)
    if torch.distributed.is_initialized():  # under torchrun: one line from rank 0, then a clean exit
        rank = torch.distributed.get_rank()
        torch.distributed.destroy_process_group()
        if rank:
            return
    print(f"checkpoint: {checkpoint}")


if __name__ == "__main__":
    main()
