#!/usr/bin/env python
"""Issue 21, step 3 (accuracy parity of detectron2's heads and the sync-free ones), the parts around
the training runs that scripts/device/check.sh starts with tools/finetune.py:

    python scripts/device/parity.py weights DIR        # random-init R50 weights, the same for every run
    python scripts/device/parity.py table RUN_DIR ...  # one row per run, then each run minus the first

The table reads each run's metrics.json (through transfer.runs) and its detectron2 training log
(train_log.json): the heads the run trained with (from the resolved config it records), the final
losses (the mean of the last logged values, which detectron2 already averages over its logging
period) and the APs. With runs given as (detectron2, seed 0), (sync_free, seed 0), (detectron2,
seed 1), the second delta row is the run-to-run noise the first one is to be judged against.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

LOSSES = ("total_loss", "loss_cls", "loss_box_reg", "loss_mask", "loss_rpn_cls", "loss_rpn_loc")
METRICS = ("APbb", "APbb50", "APmk", "APmk50")
LAST_LOGGED = 3  # logged values averaged for a final loss (each already a mean over 20 iterations)


def weights(folder: str) -> Path:
    """Random-init ResNet-50 detectron2 weights, drawn from a fixed seed: every run starts alike."""
    import torch

    from transfer.finetune_bench import random_init_weights

    torch.manual_seed(0)
    return random_init_weights(folder)


def final_losses(run: Path) -> dict:
    """Each loss: the mean of its last ``LAST_LOGGED`` logged values in train_log.json."""
    try:
        lines = (run / "train_log.json").read_text().splitlines()
    except OSError:
        return {}
    logged = [entry for entry in map(json.loads, filter(None, lines)) if "total_loss" in entry]
    tail = logged[-LAST_LOGGED:]
    return {name: sum(e[name] for e in tail) / len(tail) for name in LOSSES if tail and all(name in e for e in tail)}


def heads_of(record: dict) -> str:
    """'RPN / ROI heads' as the run's resolved config names them."""
    import yaml

    model = (yaml.safe_load(record.get("config") or "{}") or {}).get("MODEL", {})
    return f"{model.get('PROPOSAL_GENERATOR', {}).get('NAME', '?')} / {model.get('ROI_HEADS', {}).get('NAME', '?')}"


def row(run: Path) -> dict:
    from transfer import runs

    record = runs.read_record(run) or {"status": "missing", "error": "no metrics.json (killed or not run)"}
    metrics = record.get("metrics") or {}
    return {"run": run.name, "heads": heads_of(record), "seed": record.get("seed"), "status": record["status"],
            "error": record.get("error"), "iterations": record.get("iterations"), "s/iter": record.get("s_per_iter"),
            "wall s": record.get("wall_time_s"), **{m: metrics.get(m) for m in METRICS}, **final_losses(run)}


def _cell(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def table(folders: list[str]) -> str:
    rows = [row(Path(f)) for f in folders]
    numbers = ["iterations", "s/iter", "wall s", *METRICS, *LOSSES]
    columns = ["run", "heads", "seed", "status", *numbers]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(r.get(c)) for c in columns) + " |" for r in rows]
    first = rows[0]
    for r in rows[1:]:  # each run minus the first: heads' effect, then the seed's (noise)
        deltas = [_cell(r[c] - first[c]) if isinstance(r.get(c), (int, float)) and
                  isinstance(first.get(c), (int, float)) else "n/a" for c in numbers]
        lines.append(f"| {r['run']} minus {first['run']} | | | | " + " | ".join(deltas) + " |")
    errors = [f"{r['run']}: {r['error']}" for r in rows if r["status"] != "ok"]
    return "\n".join(lines + errors)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("weights", help="write the random-init weights; print their path").add_argument("folder")
    sub.add_parser("table", help="the runs' table").add_argument("runs", nargs="+")
    args = p.parse_args(argv)
    print(weights(args.folder) if args.command == "weights" else table(args.runs))


if __name__ == "__main__":
    main()
