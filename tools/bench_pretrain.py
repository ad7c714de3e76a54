#!/usr/bin/env python
"""MoCo pre-training throughput: end to end, data pipeline alone, training step alone, peak memory.

Prints a Markdown table with a row for our settings and, unless --no-baseline, a row for the
official recipe's equivalent measured in the same run (augmentation in PIL workers, fp32).

    # one GPU, synthetic ImageNet-like JPEGs (written once under --data)
    python tools/bench_pretrain.py --data /tmp/synth --synthetic 6400 --workers 16
    # a CPU smoke run with tiny settings
    python tools/bench_pretrain.py --data /tmp/synth --synthetic 64 --device cpu --arch resnet18 \
        --batch-size 8 --image-size 64 --moco-k 64 --workers 0 --warmup 1 --steps 2
"""
import argparse
import dataclasses
import json
from pathlib import Path

import torch

from transfer.errors import UserError, cli
from transfer.pretrain import benchmark
from transfer.pretrain.config import load_config


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="ImageFolder root (<class>/*.jpg) to read")
    p.add_argument("--synthetic", type=int, default=0, metavar="N",
                   help="first write N random JPEGs of ImageNet-like sizes under --data (once)")
    p.add_argument("--preset", default="v2", help="pre-training preset giving the model and our settings")
    p.add_argument("--arch")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--image-size", type=int)
    p.add_argument("--moco-k", type=int)
    p.add_argument("--workers", type=int)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backend", choices=["cpu", "gpu"], default="gpu", help="our augmentation backend")
    p.add_argument("--decode", choices=["device", "workers"], nargs="+", default=["device"],
                   help="gpu backend: where JPEGs are decoded; several values measure one row each")
    p.add_argument("--precision", choices=["fp32", "bf16"], help="ours (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--bn-splits", type=int, help="ours (default: the preset's, 8 on one device)")
    p.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=True,
                   help="also measure the official recipe's equivalent (cpu backend, fp32, plain BN)")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--steps", type=int, default=30, help="timed batches per rate")
    p.add_argument("--json", help="also write the rows to this JSON file")
    return p.parse_args(argv)


@cli
def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {args.device}: CUDA is not available here")
    cfg = load_config(args.preset, arch=args.arch, batch_size=args.batch_size, image_size=args.image_size,
                      moco_k=args.moco_k, workers=args.workers)
    root = Path(args.data)
    if args.synthetic:
        benchmark.synthetic_imagefolder(root, args.synthetic)
    if not root.is_dir() or not any(root.iterdir()):
        raise UserError(f"--data {root}: expected an ImageFolder root (<class>/*.jpg); pass --synthetic N to write one")
    if cfg.moco_k % cfg.batch_size:
        raise UserError(f"--moco-k {cfg.moco_k}: must be a multiple of --batch-size {cfg.batch_size}")

    cuda = device.type == "cuda"
    ours = benchmark.Setting(
        name="ours", backend=args.backend,
        precision=args.precision or ("bf16" if cuda else "fp32"),
        channels_last=cfg.channels_last if args.channels_last is None else args.channels_last,
        compile=(cfg.compile if args.compile is None else args.compile) and cuda,  # CUDA only, as in training
        bn_splits=args.bn_splits or cfg.bn_splits or 8,
    )
    settings = [dataclasses.replace(ours, name=f"ours, decode on {d}", decode=d) for d in args.decode] \
        if args.backend == "gpu" and len(args.decode) > 1 else [dataclasses.replace(ours, decode=args.decode[0])]
    if args.baseline:
        settings.insert(0, benchmark.Setting("official recipe", "cpu", "fp32", False, False, 1, decode="workers"))

    rows = []
    for s in settings:
        print(f"measuring {s} ...", flush=True)
        result = benchmark.measure(cfg, s, root, cfg.batch_size, cfg.workers, device, args.warmup, args.steps)
        rows.append(vars(s) | result)
        print(f"  {result}", flush=True)
    name = torch.cuda.get_device_name(device) if cuda else "CPU"
    print(f"\nMoCo {cfg.arch}, batch {cfg.batch_size}, {cfg.image_size} px, K={cfg.moco_k}, "
          f"{cfg.workers} workers, {name}, torch {torch.__version__}\n")
    print(benchmark.format_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
