"""Every pre-training setting, declared once: ``PretrainConfig``'s fields and their metadata.

From the fields come the flags of tools/pretrain_moco.py (settings.add_arguments) and the check
of the YAML presets in configs/pretrain/ (an unknown key, a missing one or a value of the wrong type
is one line naming the file). A preset gives every field without a default; a flag overrides one.
"""
import argparse
import dataclasses
from pathlib import Path
from typing import Optional

from transfer import REPO, fileio
from transfer.errors import UserError
from transfer.pretrain import settings
from transfer.pretrain.mechanisms import MECHANISMS
from transfer.pretrain.precision import PRECISIONS
from transfer.pretrain.settings import setting

PRESETS = REPO / "configs" / "pretrain"


@dataclasses.dataclass(kw_only=True)
class PretrainConfig:
    # the run
    output: str = setting("run folder (checkpoint, logs, figures)", "output/pretrain")
    data: Optional[str] = setting("root with train/<class>/*.jpg (val/<class>/ for the k-NN monitor); "
                                  "default: the built-in demo images", None)
    resume: Optional[str] = setting("checkpoint to continue from (ours or the official code's)", None)
    max_steps: Optional[int] = setting("stop at this global step with a checkpoint (time-limited jobs); "
                                       "--resume continues", None)
    device: str = setting("auto: CUDA (the GPU LOCAL_RANK) when available, else the CPU", "auto",
                          choices=("auto", "cuda", "cpu"))
    # the method
    mechanism: str = setting("where keys and negatives come from: moco (momentum encoder + queue), memory_bank "
                             "(one stored feature per image), end_to_end (the current batch)", "moco",
                             choices=MECHANISMS)
    arch: str = setting("torchvision ResNet, e.g. resnet50", flags=("-a", "--arch"))
    moco_dim: int = setting("feature dimension")
    moco_k: int = setting("dictionary size: MoCo's queue length (a multiple of --batch-size), the memory bank's "
                          "negatives per step (end_to_end: the batch)", used_by=("moco", "memory_bank"))
    moco_m: float = setting("key-encoder momentum", used_by=("moco",))
    bank_m: float = setting("memory-bank momentum: a seen image's row <- m * row + (1 - m) * query feature", 0.5,
                            used_by=("memory_bank",))
    moco_t: float = setting("softmax temperature")
    mlp: bool = setting("MLP projection head (v2)")
    shuffle_bn: bool = setting("shuffle the key batch across BatchNorm groups (split BN on one device, across "
                               "ranks under torchrun); --no-shuffle-bn lets query and key share BN statistics",
                               True, used_by=("moco", "end_to_end"))
    bn_splits: Optional[int] = setting("BatchNorm groups per process; null: 8 on one process with shuffle-BN, "
                                       "else 1")
    small_stem: bool = setting("3x3 stem convolution, no max-pool (CIFAR-style, for 32-96 px images; "
                               "not convertible for detectron2)", False)
    # data
    aug_plus: bool = setting("v2 augmentation (blur, stronger jitter)")
    image_size: int = setting("crop size (224 for ImageNet)")
    aug_backend: str = setting("where the two crops are augmented: cpu (loader workers) or gpu (the accelerator)",
                               choices=("cpu", "gpu"))
    workers: int = setting("data loading processes per training process", flags=("-j", "--workers"))
    # optimisation
    lr: float = setting("learning rate for the global batch", flags=("--lr", "--learning-rate"))
    schedule: list[int] = setting("epochs at which lr *= 0.1 (without --cos)")
    cos: bool = setting("cosine learning-rate schedule")
    epochs: int = setting("training epochs")
    batch_size: int = setting("global batch size over all processes", flags=("-b", "--batch-size"))
    wd: float = setting("weight decay", flags=("--wd", "--weight-decay"))
    momentum: float = setting("SGD momentum")
    seed: int = setting("seed of the weights, the data order and every crop")
    # speed
    precision: str = setting("auto: bf16 autocast on CUDA, fp32 on CPU", choices=PRECISIONS)
    channels_last: bool = setting("channels_last memory format (CUDA only: on a CPU it slows the step)")
    compile: bool = setting("torch.compile the encoders (CUDA only)")
    # monitoring
    print_freq: int = setting("steps per log row", flags=("-p", "--print-freq"))
    monitor_every: int = setting("epochs between k-NN / dictionary-consistency checks (0: never)")
    knn_k: int = setting("neighbours of the k-NN monitor")
    knn_t: float = setting("temperature of the k-NN monitor's votes")
    knn_max_images: Optional[int] = setting("cap on the k-NN monitor's bank (train) and query (val) images; "
                                            "default: the whole splits", None)
    consistency_keys: int = setting("stored keys re-encoded by the dictionary-consistency monitor")


FIELDS = {f.name: f for f in dataclasses.fields(PretrainConfig)}


def flags(name):
    """The command-line names of a setting, e.g. ("-b", "--batch-size")."""
    return settings.flags(FIELDS[name])


def flag(name):
    """The setting's long flag, as error messages name it: --batch-size."""
    return next(f for f in flags(name) if f.startswith("--"))


def used_by(name, mechanism):
    """Whether the setting matters to ``mechanism`` (moco_m does not to the memory bank): its ``used_by``,
    which the ablation table reads too; a setting without one matters to all."""
    mechanisms = FIELDS[name].metadata.get("used_by")
    return mechanisms is None or mechanism in mechanisms


def value_type(name):
    """(the type of a setting's values, whether null is allowed)."""
    return settings.value_type(FIELDS[name])


def add_arguments(parser: argparse.ArgumentParser):
    """One flag per setting (a bool as --x / --no-x); default None: the preset's value stays."""
    settings.add_arguments(parser, PretrainConfig, defaults=False)


_EXPECTED = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
             list[int]: "a list of integers"}


def check_value(name, value):
    """None, or what is wrong with ``value`` for the setting ``name``."""
    tp, nullable = value_type(name)
    if value is None:
        return None if nullable else "expected a value, found null"
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = {bool: isinstance(value, bool), int: is_number and isinstance(value, int), float: is_number,
          str: isinstance(value, str),
          list[int]: isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)}[tp]
    if not ok:
        return f"expected {_EXPECTED[tp]}, found {value!r}"
    choices = FIELDS[name].metadata["choices"]
    if choices and value not in choices:
        return f"expected one of {', '.join(choices)}, found {value!r}"
    return None


def named_yaml(name_or_path, folder: Path, flag: str, what: str) -> Path:
    """``<folder>/<name>.yaml``, or a YAML file's path; otherwise one line listing the names there."""
    path = Path(name_or_path) if str(name_or_path).endswith((".yaml", ".yml")) else folder / f"{name_or_path}.yaml"
    if not path.is_file():
        names = sorted(p.stem for p in folder.glob("*.yaml"))
        raise UserError(f"{flag} {name_or_path}: no such {what} ({', '.join(names)}) or YAML file")
    return path


def preset_path(preset) -> Path:
    """configs/pretrain/<name>.yaml, or a YAML file's path."""
    return named_yaml(preset, PRESETS, "--preset", "preset")


def load_config(preset="v2", **overrides) -> PretrainConfig:
    """A preset name (configs/pretrain/<name>.yaml) or YAML path, with overrides (None means: keep)."""
    path = preset_path(preset)
    values = fileio.read_yaml_mapping(path, "a mapping of pre-training settings")
    for key, value in values.items():
        if key not in FIELDS:
            raise UserError(f"{path}: unknown setting '{key}' (the settings are the flags of "
                            "tools/pretrain_moco.py --help, with _ for -)")
        problem = check_value(key, value)
        if problem:
            raise UserError(f"{path}: {key}: {problem}")
    values |= _checked({k: v for k, v in overrides.items() if v is not None})
    missing = [name for name, f in FIELDS.items() if f.default is dataclasses.MISSING and name not in values]
    if missing:
        raise UserError(f"{path}: missing settings {', '.join(map(repr, missing))}")
    return PretrainConfig(**_numbers(values))


def override(cfg: PretrainConfig, **values) -> PretrainConfig:
    """``cfg`` with ``values``, each checked as an override; None is a value here (a null setting)."""
    return dataclasses.replace(cfg, **_numbers(_checked(values)))


def _checked(overrides):
    unknown = sorted(set(overrides) - set(FIELDS))
    if unknown:
        raise UserError(f"unknown settings {unknown} (not fields of PretrainConfig)")
    for key, value in overrides.items():
        problem = check_value(key, value)
        if problem:
            raise UserError(f"{flag(key)}: {problem}")
    return overrides


def _numbers(values):
    """Integers of float settings as floats: 0 and 0.0 are one setting (config.yaml, an ablation's identity)."""
    return {k: float(v) if v is not None and value_type(k)[0] is float else v for k, v in values.items()}
