#!/usr/bin/env bash
# Fill the two git-ignored folders that travel to the GPU machine (device tool, `carry`) for
# scripts/device/check.sh (issue 21): run HERE, where PyPI is reachable; the device reaches nothing.
#
#   .whl/                  cp312 manylinux x86_64 wheels of what the device's image lacks (KINDS.md,
#                          shared/notes/detectron2-install.md "The GPU machine"): detectron2 0.6's own
#                          runtime dependencies and pycocotools (COCO evaluation), at constraints.txt's
#                          versions. Everything else the three steps import is in the image (torch 2.11,
#                          torchvision, numpy 2.x, Pillow, opencv, matplotlib, pandas, scipy, tabulate,
#                          cloudpickle, tqdm, pyyaml, portalocker, tensorboard).
#   .devicekit/detectron2/ detectron2 0.6 as pure Python, copied from this venv (no compiled files:
#                          checked below), put on PYTHONPATH there.
#   .devicekit/datasets/coco/  the built-in demo data's COCO split (made here if missing; 1 MB): what the
#                          parity step trains and evaluates on (the device cannot make the whole demo data:
#                          its Cityscapes part needs cityscapesscripts).
#
# Idempotent: a wheel already in .whl/ is not fetched again. Prints the total size (the working
# tree plus carried paths must stay under 64 MiB).
set -euo pipefail
cd "$(dirname "$0")/../.."

PY=${PYTHON:-.venv/bin/python}
SITE=$($PY -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
# The packages the device lacks, pinned to constraints.txt (the versions this venv runs).
BINARY="iopath yacs omegaconf hydra-core pycocotools termcolor"
SDIST="fvcore antlr4-python3-runtime"  # published as source only: built here (pure Python)

pin() {  # NAME -> NAME==VERSION from constraints.txt
    local line
    line=$(grep -i "^$1==" constraints.txt) || { echo "wheels.sh: $1 is not pinned in constraints.txt" >&2; exit 2; }
    echo "${line%%[[:space:]#]*}"
}

have() {  # whether .whl/ already holds NAME==VERSION (wheel names use _ for - and may differ in case)
    local name=${1%%==*} version=${1##*==}
    ls .whl 2>/dev/null | grep -qi "^${name//-/_}-${version}-.*\.whl$"
}

mkdir -p .whl
for name in $BINARY; do
    spec=$(pin "$name")
    have "$spec" && continue
    $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "$spec"
done
for name in $SDIST; do
    spec=$(pin "$name")
    have "$spec" && continue
    $PY -m pip wheel -q --no-deps -w .whl "$spec"
done
# Wheels built here must not be tied to this Python (3.11) or platform.
# Allowed: pure Python, CPython 3.12's own ABI, or the stable ABI (abi3) of a CPython <= 3.12.
if ls .whl | grep -Ev -e '-py3-none-any\.whl$' -e '-cp312-cp312-[^-]*x86_64\.whl$' \
        -e '-cp3([0-9]|1[0-2])-abi3-[^-]*x86_64\.whl$' | grep .; then
    echo "wheels.sh: the wheels above would not install on the device's CPython 3.12 x86_64" >&2
    exit 1
fi
# One version of each package: two stop the whole install there.
dupes=$(ls .whl | cut -d- -f1 | tr 'A-Z' 'a-z' | sort | uniq -d)
[ -z "$dupes" ] || { echo "wheels.sh: several versions in .whl/ of: $dupes" >&2; exit 1; }

# detectron2 as pure Python; caches left out.
compiled=$(find "$SITE/detectron2" -type f \( -name '*.so' -o -name '*.pyd' -o -name '_C*' \) -print)
[ -z "$compiled" ] || { echo "wheels.sh: compiled files in detectron2, tied to this Python: $compiled" >&2; exit 1; }
mkdir -p .devicekit
rm -rf .devicekit/detectron2.tmp
cp -r "$SITE/detectron2" .devicekit/detectron2.tmp
find .devicekit/detectron2.tmp -name __pycache__ -type d -prune -exec rm -rf {} +
rm -rf .devicekit/detectron2
mv .devicekit/detectron2.tmp .devicekit/detectron2

# The demo COCO split, as the demo generator wrote it (the same data as `make demo` trains on).
DEMO=$($PY -c 'from transfer.datasets import demo; print(demo.ensure())')
rm -rf .devicekit/datasets
mkdir -p .devicekit/datasets
cp -r "$DEMO/coco" .devicekit/datasets/coco

ls -1 .whl
du -sh .whl .devicekit
echo "total carried: $(du -cm .whl .devicekit | tail -1 | cut -f1) MiB (limit 64 MiB with the working tree)"
