"""Which precision a device computes in: the one decision behind every tool's ``--precision``.

``auto`` (the default everywhere) picks the fastest precision the hardware runs natively:

- CPU: bf16 autocast when the CPU has bf16 matrix instructions (AMX, or AVX512-BF16); fp32
  otherwise, since without them bf16 products are emulated and run about 25x slower than fp32.
- CUDA: bf16 autocast on GPUs with native bf16 (compute capability 8.0 and later: A100, H100,
  RTX 30xx...); fp16 autocast on older ones (V100, T4), with a gradient scaler for training,
  as DINO's ``--use_fp16``.

An explicit ``bf16`` where it is emulated still runs, with a one-line warning; ``fp16`` on a CPU
is refused (CPU autocast has no fp16 matrix kernels worth using, and no gradient scaler).

The environment variable ``SIMPOOL_NATIVE_BF16`` overrides the hardware probe: ``0`` makes
``auto`` behave as on a device without native bf16 (fp32 on a CPU, fp16 on a GPU), ``1`` as on
one with it. Tests use it to run both branches on any machine; users can use it to compare.

Example:
    >>> import os
    >>> os.environ["SIMPOOL_NATIVE_BF16"] = "0"
    >>> choice = resolve_precision("auto", torch.device("cpu"))
    >>> choice.name, choice.dtype, choice.scaler
    ('fp32', None, False)
    >>> choice.log_line()
    'precision: fp32 (this CPU has no bf16 matrix instructions (SIMPOOL_NATIVE_BF16=0); bf16 would be ~25x slower)'
    >>> del os.environ["SIMPOOL_NATIVE_BF16"]
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Optional

import torch

from simpool.utils import UserError

__all__ = [
    "PRECISIONS",
    "ENV_NATIVE_BF16",
    "Precision",
    "PrecisionError",
    "native_bf16",
    "resolve_precision",
    "log_precision",
    "autocast",
    "autocast_dtype",
]

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
ENV_NATIVE_BF16 = "SIMPOOL_NATIVE_BF16"
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}

logger = logging.getLogger("simpool")


class PrecisionError(UserError, ValueError):
    """A precision this device cannot run (fp16 on a CPU, an unknown name)."""


@dataclass(frozen=True)
class Precision:
    """A resolved precision: ``name`` 'bf16', 'fp16' or 'fp32'; ``dtype`` the autocast dtype
    (None: fp32, no autocast); ``scaler``: training needs a gradient scaler (fp16); ``reason``:
    why, for the log line; ``slow``: a warning when the choice is emulated on this device."""

    name: str
    reason: str
    scaler: bool = False
    slow: Optional[str] = None

    @property
    def dtype(self) -> Optional[torch.dtype]:
        return autocast_dtype(self.name)

    def log_line(self) -> str:
        what = "fp16 with a gradient scaler" if self.scaler else self.name
        return f"precision: {what} ({self.reason})"

    def autocast(self, device_type: str) -> torch.autocast:
        """``torch.autocast`` in this precision (disabled for fp32)."""
        return autocast(device_type, self.dtype)


def autocast_dtype(name: str) -> Optional[torch.dtype]:
    """The autocast dtype of a resolved precision name: bf16, fp16, or None for fp32."""
    return _DTYPES[name]


def autocast(device_type: str, dtype: Optional[torch.dtype]) -> torch.autocast:
    """``torch.autocast`` to ``dtype`` on ``device_type``; None runs fp32 (autocast off)."""
    return torch.autocast(device_type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


def _cpu_bf16_instructions() -> Optional[str]:
    cpu = getattr(torch, "cpu", None)
    for name, label in (("_is_amx_tile_supported", "AMX"), ("_is_avx512_bf16_supported", "AVX512-BF16")):
        probe = getattr(cpu, name, None)
        if probe is not None and probe():
            return label
    return None


def _cuda_native_bf16(device: torch.device) -> bool:
    major, _ = torch.cuda.get_device_capability(device)
    return major >= 8


def native_bf16(device: torch.device) -> tuple[bool, str]:
    """(whether ``device`` computes bf16 matrix products natively, a phrase saying why)."""
    forced = os.environ.get(ENV_NATIVE_BF16)
    if forced not in (None, "", "0", "1"):
        raise PrecisionError(f"{ENV_NATIVE_BF16}={forced!r}: expected 0 (no native bf16) or 1 (native bf16)")
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device) if forced is None else f"this GPU ({ENV_NATIVE_BF16}={forced})"
        has = _cuda_native_bf16(device) if forced in (None, "") else forced == "1"
        return has, f"{name} {'computes bf16 natively' if has else 'has no native bf16'}"
    if forced in ("0", "1"):
        has = forced == "1"
        return has, f"this CPU has {'' if has else 'no '}bf16 matrix instructions ({ENV_NATIVE_BF16}={forced})"
    label = _cpu_bf16_instructions()
    if label:
        return True, f"this CPU has {label} bf16 matrix instructions"
    return False, "this CPU has no bf16 matrix instructions"


def resolve_precision(requested: str, device: torch.device, use_fp16: bool = False, training: bool = True) -> Precision:
    """The precision ``requested`` ('auto', 'bf16', 'fp16' or 'fp32') resolves to on ``device``;
    fp16 comes with a gradient scaler when ``training``. ``use_fp16`` is DINO's flag: on CUDA it
    asks for fp16 (with ``requested`` 'auto' or 'fp16'); on a CPU it is ignored. Raises
    ``PrecisionError`` for a request the device cannot run."""
    if requested not in PRECISIONS:
        raise PrecisionError(f"unknown precision {requested!r}; choose one of {', '.join(PRECISIONS)}")
    cuda = device.type == "cuda"
    if use_fp16 and cuda:
        if requested not in ("auto", "fp16"):
            raise PrecisionError(
                f"--use_fp16 True asks for fp16 and --precision {requested} for another precision; pass one of them"
            )
        return Precision("fp16", "--use_fp16 True", scaler=training)
    if requested == "fp32":
        return Precision("fp32", "asked for")
    if requested == "fp16":
        if not cuda:
            raise PrecisionError("--precision fp16 runs on CUDA GPUs only; on a CPU use auto, bf16 or fp32")
        return Precision("fp16", "asked for", scaler=training)
    has, why = native_bf16(device)
    if requested == "bf16":
        slow = None
        if not has:
            slow = (
                f"warning: --precision bf16 on a device without native bf16 ({why}): bf16 products are "
                f"emulated, {'about 25x slower than fp32' if not cuda else 'slower than fp16'}; "
                "--precision auto picks the fast one"
            )
        return Precision("bf16", f"asked for; {why}", slow=slow)
    if has:
        return Precision("bf16", why)
    if cuda:
        return Precision("fp16", why, scaler=training)
    return Precision("fp32", f"{why}; bf16 would be ~25x slower")


def log_precision(choice: Precision) -> None:
    """The one log line of a resolved precision, and its warning when it is emulated here."""
    logger.info(choice.log_line())
    if choice.slow:
        logger.warning(choice.slow)
