"""Where tensors live and in what precision: the one table of dtype names (configs and command lines
say `fp32`, `bf16`, `fp16`) and the one device policy (`auto`, `cpu`, `cuda`).

Used by the training run (`run.device`), the frozen real-scale parts (`components.device`,
`components.*_dtype`) and `convert --dtype`.
"""

from __future__ import annotations

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def dtype_of(name: str, key: str = "dtype") -> torch.dtype:
    """The torch dtype of a name of `DTYPES`.

    Raises:
        ValueError: one line naming `key` (the config key or flag) and the accepted names.
    """
    if name not in DTYPES:
        raise ValueError(f"{key}: expected one of {', '.join(DTYPES)}, got '{name}'")
    return DTYPES[name]


def resolve_device(name: str, key: str = "device") -> torch.device:
    """The device a setting names: `auto` → cuda when a CUDA device is visible, else cpu; `cpu`; `cuda`
    (or any other torch device name) as named.

    Raises:
        ValueError: one line naming `key`, for a name torch does not know, or `cuda` when no CUDA device is
            visible (rather than a run silently falling back to the CPU, or failing later inside torch).
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"{key}: expected auto, cpu or cuda, got '{name}'") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{key}={name}, but no CUDA device is visible; use auto or cpu")
    return device
