"""The `--device` flag of the model commands: which torch device a name means, checked before any
model loads so that a typo or a missing GPU is a one-line error, not a CUDA traceback mid-load."""

from __future__ import annotations

import re

from rlhf.errors import UserError

DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"
"""What `--device` accepts, for its help text and its error message."""


def resolve_device(name: str | None = "auto") -> str:
    """The torch device string for `name`: "auto" (or None) is cuda if available, else cpu; "cpu";
    "cuda" or "cuda:N" only if that GPU exists. Anything else raises UserError."""
    import torch

    name = "auto" if name is None else name.strip().lower()
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return name
    match = re.fullmatch(r"cuda(?::(\d+))?", name)
    if match is None:
        raise UserError(f"--device {name!r}: expected {DEVICE_CHOICES}")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise UserError(f"--device {name}: no CUDA GPU is available here (use --device cpu)")
    index = int(match.group(1) or 0)
    if index >= count:
        raise UserError(f"--device {name}: this machine has {count} CUDA GPU(s), numbered 0 to {count - 1}")
    return name
