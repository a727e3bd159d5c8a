"""Which numeric precision the networks run in, chosen from what the processor supports.

One place for the decision: ``--precision`` (``auto``, ``fp32``, ``bf16``) and the CPU's flags give the
precision of a CPU forward; on CUDA the existing ``half`` policy (fp16 autocast) stays as it is. ``auto``
takes bf16 only where the CPU computes it natively (AMX or AVX512-BF16): elsewhere PyTorch emulates bf16
and it is slower than fp32, so fp32 is kept.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path

PRECISIONS = ("auto", "fp32", "bf16")
BF16_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})


@lru_cache(maxsize=1)
def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The feature flags of the first CPU in ``cpuinfo`` (Linux); empty where the file is missing."""
    try:
        with open(cpuinfo) as handle:
            for line in handle:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_precision(requested: str, flags: Iterable[str]) -> str:
    """The precision of a CPU forward: ``requested`` when it is 'fp32' or 'bf16', else (``auto``) 'bf16'
    where ``flags`` include native bf16 (:data:`BF16_FLAGS`) and 'fp32' elsewhere."""
    if requested not in PRECISIONS:
        raise ValueError(f"unknown precision '{requested}' (expected one of {', '.join(PRECISIONS)})")
    if requested != "auto":
        return requested
    return "bf16" if BF16_FLAGS & set(flags) else "fp32"
