"""What a checkpoint records about how it was made: the command (relative to the repository, no
machine paths) and the hardware (CPU model and cores, or GPU name and count)."""

from __future__ import annotations

import os
import platform
import shlex
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


def portable_path(value: str, repo: Path = REPO) -> str:
    """An absolute path made relative to the repository, or ``<outside>/<name>`` when it lies elsewhere; other strings unchanged."""
    if not value.startswith("/"):
        return value
    path = Path(value)
    try:
        return str(path.resolve().relative_to(repo.resolve())) or "."
    except ValueError:
        return f"<outside>/{path.name}"


def portable_command(argv: list[str], module: str = "training.train", repo: Path = REPO) -> str:
    """``python -m <module> <args>`` with every absolute path made portable (:func:`portable_path`)."""
    args = [portable_path(a, repo) for a in argv]
    return " ".join(["python", "-m", module, *(shlex.quote(a) for a in args)])


def portable_legacy_command(command: str, repo: Path = REPO) -> str:
    """An old checkpoint's command (``/abs/path/training/train.py --data ...``) without machine paths."""
    words = shlex.split(command)
    if words and words[0].endswith("train.py"):
        words = words[1:]
    return portable_command(words, repo=repo)


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux, else ``platform.processor()``)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware(device: torch.device, world: int = 1) -> str:
    """One line: GPU name × processes, or CPU model, cores and threads per process."""
    if device.type == "cuda":
        return f"{world} x {torch.cuda.get_device_name(device)}"
    return f"CPU {cpu_model()} ({os.cpu_count()} cores), {world} process(es) x {torch.get_num_threads()} thread(s)"
