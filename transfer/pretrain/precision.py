"""The mixed-precision rule of every training and evaluation loop here: ``--precision auto`` is bf16
autocast on CUDA and float32 on the CPU (where bf16 matmuls are slow and change the numbers)."""
import torch

from transfer.errors import UserError

PRECISIONS = ("auto", "bf16", "fp32")


def autocast_dtype(precision, device):
    """torch.bfloat16, or None for float32 (no autocast)."""
    if precision not in PRECISIONS:
        raise UserError(f"--precision {precision}: expected auto, bf16 or fp32")
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    return torch.bfloat16 if precision == "bf16" else None


def autocast(device, dtype):
    """The autocast context for ``autocast_dtype``'s answer (a no-op for None)."""
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)
