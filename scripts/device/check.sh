#!/usr/bin/env bash
# Issue 21's GPU checks as ONE command for the device machine (one H200, ~15 min of device time in
# all, start-up counted; nothing can be fetched there). The call to make (device tool `run`):
#
#   command:   bash scripts/device/check.sh
#   carry:     [".whl", ".devicekit"]
#   timeout_s: 560
#
# First, here: `bash scripts/device/wheels.sh` (fills .whl/ and .devicekit/), then the same command
# lines with tiny settings on this CPU:
#   OUT=/tmp/devcheck PYTHON=.venv/bin/python bash scripts/device/check.sh --cpu-smoke   (or CPU_SMOKE=1)
# A rerun of some steps only (one that failed or ran out of time), only while the machine is still
# warm (30 s after a call; a fresh start costs minutes) and time is left, as the same call with e.g.
#   STEPS="pretrain" TOTAL_S=150 bash scripts/device/check.sh        (timeout_s 190)
# (on a warm machine a second torch.compile may reuse the first one's cache: its time is not a cold start)
#
# Steps, each under its own `timeout` (a failing or hung step does not stop the next); the whole ends
# within TOTAL_S (520 s) of its start, plus at most ~15 s:
#   setup     .whl/*.whl installed into /tmp/site (--no-index --no-deps); PYTHONPATH=/tmp/site:.devicekit:.
#   env       nvidia-smi, versions and where each package comes from, what d2compat patched -> $OUT/env.txt
#   bench     BENCH_S (160 s). Issue step 2: tools/bench_finetune.py, coco_fpn_1x then coco_c4_2x,
#             synthetic COCO-size data, batch 16, fp32 and AMP, detectron2's heads and the sync-free
#             ones, random-init R50 with BN; each row printed as measured     -> $OUT/bench_finetune.txt
#   parity    PARITY_S (190 s). Step 3: tools/finetune.py coco_fpn_1x, demo schedule at batch 16 for
#             PARITY_ITERS (200) iterations on the demo COCO data, all from the same random-init weights:
#             detectron2's heads seed 0, sync_free seed 0, detectron2's seed 1 (the run-to-run noise),
#             then scripts/device/parity.py's table                             -> $OUT/parity.txt
#   pretrain  the time left. Step 4: tools/bench_pretrain.py --compile (all but 50 s), then --no-compile;
#             each line carries the seconds since its run started: the compile time is the gap between
#             "measuring ..." and its result, less the same gap without compile -> $OUT/bench_pretrain.txt
# $OUT/summary.txt: each step's exit code (124: timed out) and seconds, then every table; the console
# ends with it. $OUT/runs.tar.gz: the parity runs' metrics.json, train_log.json, log.txt and
# bench_pretrain's JSON rows.
set -uo pipefail
cd "$(dirname "$0")/../.."
REPO=$PWD
SMOKE=${CPU_SMOKE:-0}
[ "${1:-}" = "--cpu-smoke" ] && SMOKE=1
PY=${PYTHON:-python3}
OUT=${OUT:?set OUT to the folder for the logs (the device sets it)}
WORK=${WORK:-/tmp/devcheck-work}
STEPS=${STEPS:-"bench parity pretrain"}
DATA=$REPO/.devicekit/datasets  # the demo COCO split (scripts/device/wheels.sh)
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg

if [ "$SMOKE" = 1 ]; then  # the same command lines, CPU-sized
    TOTAL_S=${TOTAL_S:-3000}; BENCH_S=${BENCH_S:-900}; PARITY_S=${PARITY_S:-900}
    BENCH=(--schedule demo --precision fp32 --datasets "$DATA" --warmup 1 --iters 2)
    PARITY=(SOLVER.IMS_PER_BATCH 2 SOLVER.MAX_ITER 6 SOLVER.STEPS "(4,)" SOLVER.WARMUP_ITERS 2
            DATALOADER.NUM_WORKERS 0)
    PRETRAIN=(--synthetic 64 --device cpu --arch resnet18 --batch-size 8 --image-size 64 --moco-k 64 --workers 0
              --warmup 1 --steps 2)
else
    TOTAL_S=${TOTAL_S:-520}; BENCH_S=${BENCH_S:-160}; PARITY_S=${PARITY_S:-190}
    BENCH=(--schedule full --batch 16 --precision fp32,amp --synthetic "$WORK/coco_synth" --warmup 3 --iters 10)
    ITERS=${PARITY_ITERS:-200}  # LR step at 3/4, as in the demo schedule
    PARITY=(SOLVER.IMS_PER_BATCH 16 SOLVER.MAX_ITER "$ITERS" SOLVER.STEPS "($((ITERS * 3 / 4)),)"
            SOLVER.WARMUP_ITERS $((ITERS / 5)) DATALOADER.NUM_WORKERS 4)
    PRETRAIN=(--synthetic 2560 --workers 16 --warmup 5 --steps 16)
fi
DEADLINE=$((SECONDS + TOTAL_S))

if [ "$SMOKE" = 1 ]; then
    echo "cpu-smoke: .whl not installed ($($PY -V), not the device's 3.12; this venv has those packages)"
    export PYTHONPATH=$REPO/.devicekit:$REPO
else
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || echo "setup: pip install of .whl failed (rc $?); going on"
    export PYTHONPATH=/tmp/site:$REPO/.devicekit:$REPO
fi

SUMMARY=$OUT/summary.txt
: >"$SUMMARY"
left() { echo $((DEADLINE - SECONDS)); }

# [STAMP=1] run_step LOG BUDGET_S CMD...: CMD under `timeout` (its whole process group, loader workers
# too), its output appended to LOG and shown (with STAMP=1 each line prefixed by the seconds since
# CMD started); a line in summary.txt with its exit code and seconds.
run_step() {
    local log=$1 budget=$2 start=$SECONDS rc
    shift 2
    [ "$budget" -gt "$(left)" ] && budget=$(left)
    if [ "$budget" -lt 5 ]; then
        echo "SKIPPED (no time left): $*" | tee -a "$log" "$SUMMARY"
        return 0
    fi
    echo "\$ $* (timeout ${budget}s)" | tee -a "$log"
    timeout -k 10 "$budget" "$@" 2>&1 | if [ "${STAMP:-0}" = 1 ]; then stamped; else cat; fi | tee -a "$log"
    rc=${PIPESTATUS[0]}
    printf 'rc %-3s %4ss  %s\n' "$rc" $((SECONDS - start)) "$*" | tee -a "$log" >>"$SUMMARY"
}

stamped() {
    local t0=${EPOCHREALTIME/./} line ds
    while IFS= read -r line; do
        ds=$(( (${EPOCHREALTIME/./} - t0) / 100000 ))
        printf '[%5d.%ds] %s\n' $((ds / 10)) $((ds % 10)) "$line"
    done
}

versions() {  # python, torch, the GPU, and where each package the steps import comes from
    timeout 120 $PY - <<'EOF'
import importlib
import platform

import torch

print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "cudnn", torch.backends.cudnn.version(), "gpu", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
import transfer.d2  # noqa: E402,F401  (imports detectron2 through d2compat)
from transfer import d2compat  # noqa: E402

for name in ("torchvision", "numpy", "PIL", "cv2", "detectron2", "pycocotools", "fvcore", "iopath", "yacs",
             "omegaconf", "hydra", "termcolor", "scipy", "pandas", "matplotlib", "tensorboard"):
    try:
        m = importlib.import_module(name)
        print(f"{name} {getattr(m, '__version__', '?')} {m.__file__}")
    except Exception as e:  # report every missing one
        print(f"{name} MISSING: {type(e).__name__}: {e}")
print("d2compat patched:", d2compat.PATCHED, "compiled ops:", d2compat.has_compiled_ops())
EOF
}

{
    command -v nvidia-smi >/dev/null && timeout 30 nvidia-smi -L \
        && timeout 30 nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
    echo "cpus $(nproc); $(free -g | awk '/Mem/ {print "memory " $2 " GiB"}');" \
         "/dev/shm $(df -h /dev/shm | awk 'NR==2 {print $2}'); $(date -u +%FT%TZ)"
    echo "commit $(git rev-parse HEAD 2>/dev/null || echo 'unknown (no .git here)')"
    versions
    echo "rc $? (versions)"
} 2>&1 | tee "$OUT/env.txt"

if [[ " $STEPS " == *" bench "* ]]; then
    run_step "$OUT/bench_finetune.txt" "$BENCH_S" $PY tools/bench_finetune.py --tasks coco_fpn_1x,coco_c4_2x \
        --heads detectron2,sync_free "${BENCH[@]}" MODEL.RESNETS.NORM BN MODEL.FPN.NORM BN
fi

if [[ " $STEPS " == *" parity "* ]]; then
    log=$OUT/parity.txt
    parity_end=$((SECONDS + PARITY_S))
    rm -rf "$WORK/parity"
    run_step "$log" 60 $PY scripts/device/parity.py weights "$WORK/parity/weights"
    weights=$(ls "$WORK"/parity/weights/*.pkl 2>/dev/null | head -1)
    runs=()
    for run in "detectron2 0" "sync_free 0" "detectron2 1"; do
        read -r heads seed <<<"$run"
        # ours by name (transfer/d2/sync_free.py's SYNC_FREE); parity.py's table shows what each run used
        opts=(); [ "$heads" = sync_free ] && opts=(MODEL.PROPOSAL_GENERATOR.NAME SyncFreeRPN
                                                   MODEL.ROI_HEADS.NAME SyncFreeStandardROIHeads)
        budget=$((parity_end - SECONDS))  # the two compared runs first; the noise run gets the rest
        [ "$run" = "detectron2 0" ] && budget=$((budget / 2))
        [ "$run" = "sync_free 0" ] && budget=$((budget * 6 / 10))
        runs+=("$WORK/parity/$heads-seed$seed")
        run_step "$log" "$budget" $PY tools/finetune.py --task coco_fpn_1x --schedule demo --weights "${weights:-none}" \
            --seed "$seed" --datasets "$DATA" --output "$WORK/parity/$heads-seed$seed" --no-resume \
            "${PARITY[@]}" "${opts[@]}"
    done
    run_step "$log" 30 $PY scripts/device/parity.py table "${runs[@]}"
fi

if [[ " $STEPS " == *" pretrain "* ]]; then
    log=$OUT/bench_pretrain.txt
    rm -f "$WORK"/pretrain_*.json
    # --compile first (never run on a GPU yet; its start is said to take ~2 min), keeping 50 s for the
    # run without it, which gets whatever is left
    for compile in compile no-compile; do
        budget=$(left); [ $compile = compile ] && budget=$((budget - 50))
        STAMP=1 run_step "$log" "$budget" $PY tools/bench_pretrain.py --data "$WORK/synth" "${PRETRAIN[@]}" \
            --no-baseline --$compile --json "$WORK/pretrain_$compile.json"
    done
fi

kept=$(cd "$WORK" && ls -d parity/*/metrics.json parity/*/train_log.json parity/*/log.txt pretrain_*.json 2>/dev/null)
[ -n "$kept" ] && tar -czf "$OUT/runs.tar.gz" -C "$WORK" $kept
# tables LOG HEADER PREFIX...: the Markdown tables our tools printed in LOG (not detectron2's): the
# lines starting with "MoCo ", then HEADER's row and separator, then the rows whose first cell starts
# with a PREFIX; each line once (bench_finetune.py prints each row as measured and the table at the end).
tables() {
    local log=$1 header=$2 rows
    shift 2
    rows=$(printf '|%s' "$@")
    sed -E 's/^\[ *[0-9.]+s\] //' "$log" | awk -v h="| $header |" -v re="^[|] (${rows:1})" '
        /^MoCo / { top = top $0 "\n"; next }
        index($0, h) == 1 { if (!head) head = $0 "\n"; sep = 1; next }
        sep && /^[|]---/ { if (!line) line = $0 "\n"; sep = 0; next }
        { sep = 0 }
        $0 ~ re && !seen[$0]++ { body = body $0 "\n" }
        END { printf "%s%s%s%s", top, head, line, body }'
}
{
    echo; echo "== tables (full logs in the other files) =="
    [ -f "$OUT/bench_finetune.txt" ] && tables "$OUT/bench_finetune.txt" "task" coco_
    [ -f "$OUT/parity.txt" ] && tables "$OUT/parity.txt" "run" detectron2-seed sync_free-seed
    [ -f "$OUT/bench_pretrain.txt" ] && tables "$OUT/bench_pretrain.txt" "setting" ours official
} >>"$SUMMARY"
echo; echo "== summary =="; cat "$SUMMARY"
