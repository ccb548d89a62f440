"""Device and compute-dtype choice, made once per stage and logged: every stage asks here."""

from __future__ import annotations

import logging

import torch

from ghsae.config import is_device_name
from ghsae.errors import ModelError

log = logging.getLogger(__name__)


def pick_device(name: str, option: str = "model.device (--device)") -> torch.device:
    """`name` is auto | cpu | cuda | cuda:N; `option` is the setting the user gave, named in the error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not is_device_name(name):
        # the config refuses these too; this covers a device given to the public API
        raise ModelError(f"{option} is {name!r}; expected auto, cpu, cuda or cuda:N (N a device number)")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(f"{option} is {name} but torch sees no CUDA device; use --device cpu or auto")
    return torch.device(name)


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        # bfloat16 halves memory traffic on GPUs with tensor cores; on CPU, float32 matmuls
        # are faster than bfloat16 ones on most hosts and keep the probe exact.
        chosen = torch.bfloat16 if device.type == "cuda" else torch.float32
        log.info("compute dtype %s (auto on %s)", chosen, device.type)
        return chosen
    return getattr(torch, name)
