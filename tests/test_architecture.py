"""The layering of ARCHITECTURE.md holds: no module of transfer/ imports a module of a higher layer."""
import re

from conftest import REPO

# Lowest first, as in ARCHITECTURE.md's table; a module belongs to the first layer whose prefix it starts with.
LAYERS = [
    ("base", ["transfer/__init__", "transfer/errors", "transfer/fileio", "transfer/stats", "transfer/image_folder",
              "transfer/d2compat", "transfer/slurm"]),
    ("detectron2 and data", ["transfer/d2", "transfer/datasets", "transfer/regimes"]),
    ("pre-training", ["transfer/pretrain", "transfer/linear_eval"]),
    ("conversion", ["transfer/checkpoint_layouts", "transfer/convert"]),
    ("tasks", ["transfer/tasks"]),
    ("one run", ["transfer/finetune"]),
    ("runs on disk", ["transfer/runs"]),
    ("suite", ["transfer/suite"]),
    ("reports", ["transfer/report", "transfer/label_efficiency"]),
]


def _layer(module_path: str) -> int:
    if module_path == "transfer":
        return 0
    return next(i for i, (_, prefixes) in enumerate(LAYERS) if any(module_path.startswith(p) for p in prefixes))


def test_no_module_imports_a_higher_layer():
    upward = []
    for path in sorted((REPO / "transfer").rglob("*.py")):
        mine = _layer(str(path.relative_to(REPO).with_suffix("")))
        for imported in re.findall(r"^\s*(?:from|import) (transfer[\w.]*)", path.read_text(), re.M):
            theirs = _layer(imported.replace(".", "/"))
            if theirs > mine:
                upward.append(f"{path.relative_to(REPO)} ({LAYERS[mine][0]}) imports {imported} ({LAYERS[theirs][0]})")
    assert upward == []
