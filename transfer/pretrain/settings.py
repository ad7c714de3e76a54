"""Settings declared once, as dataclass fields with metadata, and the command-line flags made from them.

``PretrainConfig`` (config.py), ``SupervisedConfig`` (supervised.py) and ``LinearEvalConfig``
(transfer/linear_eval.py) declare each setting as ``setting(help, default, flags=..., choices=...)``;
``add_arguments(parser, Config)`` makes their tools' flags from the fields (name, help, type, nargs,
choices, default), so a setting, its default and its help are written in one place.
"""
import argparse
import dataclasses
import types
import typing


def setting(help, default=dataclasses.MISSING, *, flags=(), choices=None, **metadata):
    """A dataclass field that is a setting. flags: the command-line names when not just ``--field-name``;
    metadata: what the config itself reads besides (PretrainConfig's ``used_by``)."""
    return dataclasses.field(default=default, metadata={"help": help, "flags": flags, "choices": choices, **metadata})


def flags(field: dataclasses.Field):
    """The command-line names of a setting, e.g. ("-b", "--batch-size")."""
    return field.metadata["flags"] or ("--" + field.name.replace("_", "-"),)


def value_type(field: dataclasses.Field):
    """(the type of a setting's values, whether null is allowed)."""
    tp = field.type
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return next(a for a in typing.get_args(tp) if a is not type(None)), True
    return tp, False


def add_arguments(parser, cls, *, defaults=True):
    """One flag per field of the dataclass ``cls``: a bool as --x / --no-x, a list or tuple as one or more values.

    defaults: each flag defaults to its field's default, and a field without one is a required flag.
    Without, every flag defaults to None, so that a preset's value stays (tools/pretrain_moco.py).
    """
    for field in dataclasses.fields(cls):
        tp, _ = value_type(field)
        kwargs = dict(dest=field.name, default=None, help=field.metadata["help"].replace("%", "%%"))
        if defaults and field.default is dataclasses.MISSING:
            kwargs["required"] = True
        elif defaults:
            kwargs["default"] = field.default
            if field.default is not None and tp is not bool:  # argparse writes a bool's default itself
                kwargs["help"] += " (default: %(default)s)"
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(tp) in (list, tuple):
            kwargs.update(type=typing.get_args(tp)[0], nargs="+")
        else:
            kwargs.update(type=tp, choices=field.metadata["choices"])
        parser.add_argument(*flags(field), **kwargs)
