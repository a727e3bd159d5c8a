"""Facts about the machine: device choice, GPU driver, memory readers, out-of-memory errors.

Nothing here decides how much work to do (that is :mod:`fusemycells.runtime.budget`); these functions only
say what the machine has and what it used. torch is imported lazily: a CPU-only reader of
``/proc`` needs none of it.
"""

from __future__ import annotations

import os
import re
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

NVIDIA_VERSION_FILE = "/proc/driver/nvidia/version"
"""Where the host's NVIDIA kernel driver states its version (absent without a GPU driver)."""
CGROUP_LIMITS = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")
"""cgroup v2 and v1 memory limit files (the usage file sits beside each)."""


def cuda_available() -> bool:
    """True when torch sees a CUDA device (False when torch is missing or CPU-only)."""
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def choose_device(requested: str) -> str:
    """'cuda' or 'cpu' for a ``--device`` value; 'cuda' without a GPU is an error, 'auto' falls back."""
    if requested not in ("auto", "cuda", "cpu"):
        raise ValueError(f"unknown device '{requested}' (expected auto, cuda or cpu)")
    if requested == "cpu":
        return "cpu"
    if cuda_available():
        return "cuda"
    if requested == "cuda":
        raise RuntimeError("--device cuda requested but no CUDA device is available")
    return "cpu"


def free_vram_gib() -> float | None:
    """Free memory of CUDA device 0 in GiB, or None without CUDA."""
    if not cuda_available():
        return None
    import torch

    free, _total = torch.cuda.mem_get_info()
    return free / 2**30


def parse_driver_version(text: str) -> str | None:
    """The NVIDIA kernel driver version (e.g. '535.104.05') in the text of :data:`NVIDIA_VERSION_FILE`
    (proprietary or open kernel module)."""
    match = re.search(r"NVRM version:.*?\s(\d+\.\d+(?:\.\d+)*)(?:\s|$)", text)
    return match.group(1) if match else None


def parse_nvidia_smi_version(output: str) -> str | None:
    """The driver version in ``nvidia-smi --query-gpu=driver_version --format=csv,noheader`` output (first GPU)."""
    for line in output.splitlines():
        if re.fullmatch(r"\d+(\.\d+)+", line.strip()):
            return line.strip()
    return None


def nvidia_smi_driver(run: Callable[..., subprocess.CompletedProcess] = subprocess.run) -> str | None:
    """The driver version nvidia-smi reports, or None without nvidia-smi or a working driver."""
    try:
        proc = run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return parse_nvidia_smi_version(proc.stdout) if proc.returncode == 0 else None


def nvidia_driver_version(
    path: str = NVIDIA_VERSION_FILE, run: Callable[..., subprocess.CompletedProcess] = subprocess.run
) -> str | None:
    """The host's NVIDIA driver version: :data:`NVIDIA_VERSION_FILE`, else nvidia-smi; None without a driver.

    The one reader of the driver version (the CUDA route of :mod:`fusemycells.runtime.cuda_support` and the
    budget policy's report both use it).
    """
    try:
        with open(path) as handle:
            version = parse_driver_version(handle.read())
    except OSError:
        version = None
    return version if version is not None else nvidia_smi_driver(run)


def parse_start_ticks(stat: str) -> int | None:
    """The start time (clock ticks after boot) in the text of ``/proc/<pid>/stat`` (field 22).

    The command name (field 2) is in parentheses and may itself hold spaces or ')', so fields are
    counted after the last ')'.
    """
    head, _, tail = stat.rpartition(")")
    fields = tail.split()
    if not head or len(fields) < 20 or not fields[19].isdigit():
        return None
    return int(fields[19])


def process_age_s(
    stat_path: str = "/proc/self/stat",
    boot_clock: Callable[[], float] | None = None,
    ticks_per_s: int | None = None,
) -> float | None:
    """Seconds since this process started (Linux; None where ``/proc`` or ``CLOCK_BOOTTIME`` is missing).

    The kernel's start time of the process, so interpreter start-up, imports, and anything before
    an ``exec()`` into a new program of the same process (the image's entry point may do that) are
    included. Resolution: one clock tick (10 ms).
    """
    try:
        with open(stat_path) as handle:
            start = parse_start_ticks(handle.read())
        clock = boot_clock or (lambda: time.clock_gettime(time.CLOCK_BOOTTIME))
        ticks = ticks_per_s or os.sysconf("SC_CLK_TCK")
        now = clock()
    except (OSError, AttributeError, ValueError):
        return None
    if start is None or ticks <= 0:
        return None
    return max(0.0, now - start / ticks)


def proc_status_mib(key: str) -> float | None:
    """A memory line of /proc/self/status (e.g. 'VmRSS', 'VmHWM') in MiB; None where there is none (not Linux)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 2**10  # kB
    except OSError:
        pass
    return None


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (MiB).

    Linux: ``VmHWM`` of /proc/self/status, the high-water mark of this program's own memory.
    ``ru_maxrss`` is only the fallback: Linux carries it across fork and exec, so a program started
    by a parent that once held 1 GB reports at least 1 GB.
    """
    peak_mib = proc_status_mib("VmHWM")
    if peak_mib is not None:
        return peak_mib
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**20 if sys.platform == "darwin" else 2**10)


def peak_vram_mib() -> float | None:
    """Peak GPU memory torch reserved in this process so far (MiB); None without CUDA in use.

    Covers the TorchScript backend (the default on CUDA); ONNX Runtime's CUDA arena is not seen
    by torch, so with ``--backend onnx`` this is only torch's share (resampling runs on the CPU).
    """
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    try:
        return float(torch.cuda.max_memory_reserved()) / 2**20
    except Exception:  # after a device fault CUDA may refuse even this
        return None


def _read_int(path: str) -> int | None:
    try:
        with open(path) as handle:
            text = handle.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _mem_available_bytes(path: str = "/proc/meminfo") -> int | None:
    try:
        with open(path) as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def available_ram_bytes() -> int | None:
    """Memory the process may still use: MemAvailable, capped by a cgroup limit when one is set."""
    available = _mem_available_bytes()
    candidates = [] if available is None else [available]
    for path in CGROUP_LIMITS:
        limit = _read_int(path)
        if limit is None or limit >= 1 << 60:
            continue
        usage_path = path.replace("memory.max", "memory.current").replace("limit_in_bytes", "usage_in_bytes")
        candidates.append(limit - (_read_int(usage_path) or 0))
    return min(candidates) if candidates else None


def is_out_of_memory(exc: BaseException) -> bool:
    """True for CUDA/ONNX Runtime/host out-of-memory errors."""
    if isinstance(exc, MemoryError):
        return True
    name = type(exc).__name__
    text = str(exc).lower()
    return name == "OutOfMemoryError" or "out of memory" in text or "failed to allocate memory" in text


def free_device_cache() -> None:
    """Return cached CUDA blocks to the driver (no-op without CUDA, or once CUDA itself failed: a sticky
    fault such as an illegal memory access makes every later CUDA call raise)."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        try:
            torch.cuda.empty_cache()
        except Exception:  # the device already failed; its cache is not worth a second error
            pass


@dataclass(frozen=True)
class DeviceFault:
    """The first error the accelerator raised in this run: the step it happened in and the original error."""

    step: str  # e.g. 'global stage', 'patch stage', 'output filter'
    error: str  # 'ExceptionType: message' of the original error

    def as_report(self) -> dict[str, str]:
        """A file entry's ``device_fault``: where, the original error, and where the step was rerun."""
        return {"step": self.step, "error": self.error, "rerun_on": "cpu"}


class DeviceHealth:
    """Whether the run still trusts its accelerator (owned by the run's budget policy, the one place that
    says where work runs).

    The first fault on the device (any exception but an out-of-memory error, which has its own ladder) is
    recorded here; from then on every step of the run runs on the CPU: a CUDA context after an illegal
    memory access or a device-side assert fails every later call, and a missing kernel or a broken
    library fails again the next time.
    """

    def __init__(self) -> None:
        self.fault: DeviceFault | None = None

    @property
    def failed(self) -> bool:
        return self.fault is not None

    def record(self, step: str, exc: BaseException) -> DeviceFault:
        """Record ``exc`` as the device's fault (the first one is kept); the fault kept."""
        if self.fault is None:
            self.fault = DeviceFault(step, f"{type(exc).__name__}: {exc}")
        return self.fault


@contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """torch's intra-op thread count set to ``count`` inside the block, restored after (None: unchanged).

    The count is process-wide, so it also applies to the resampling done meanwhile.
    """
    torch = sys.modules.get("torch")
    if count is None or torch is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
