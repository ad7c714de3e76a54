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
    ("runs on disk", ["transfer/runs"]),
    ("one run", ["transfer/finetune"]),
    ("suite", ["transfer/suite"]),
    ("reports", ["transfer/report", "transfer/label_efficiency"]),
]


def _layer(module_path: str) -> int:
    if module_path == "transfer":
        return 0
    return next(i for i, (_, prefixes) in enumerate(LAYERS) if any(module_path.startswith(p) for p in prefixes))


def _imports(source: str) -> list[str]:
    """The transfer modules a source imports: ``import transfer.x``, ``from transfer.x import ...`` and each
    module named in ``from transfer import x, y`` (a name that is no module is transfer/__init__'s)."""
    modules = re.findall(r"^\s*(?:from|import) (transfer(?:\.\w+)+)", source, re.M)
    for names in re.findall(r"^\s*from transfer import \(?([\w, ]+)", source, re.M):
        for name in (n.strip() for n in names.split(",") if n.strip()):
            is_module = (REPO / "transfer" / f"{name}.py").is_file() or (REPO / "transfer" / name).is_dir()
            modules.append(f"transfer.{name}" if is_module else "transfer")
    return modules


def test_no_module_imports_a_higher_layer():
    upward = []
    for path in sorted((REPO / "transfer").rglob("*.py")):
        mine = _layer(str(path.relative_to(REPO).with_suffix("")))
        for imported in _imports(path.read_text()):
            theirs = _layer(imported.replace(".", "/"))
            if theirs > mine:
                upward.append(f"{path.relative_to(REPO)} ({LAYERS[mine][0]}) imports {imported} ({LAYERS[theirs][0]})")
    assert upward == []
