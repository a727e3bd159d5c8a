"""Progress: a bar on an interactive terminal, the periodic log lines elsewhere (Grand Challenge logs)."""

from __future__ import annotations

import dataclasses
import io
import logging
import os
import select
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, blob_volume, write_case

from fusemycells import batch
from fusemycells.backends import LoadedStage, load_stage
from fusemycells.config import INPUT_SUBDIR, load_manifest
from fusemycells.patch_stage import PatchStage
from fusemycells.runtime.budget import BudgetPolicy
from fusemycells.runtime.deadline import Countdown
from fusemycells.runtime.ladder import PatchRateWatcher
from fusemycells.runtime.progress import Bar, LogLines, interactive, log_lines_only, progress_for
from fusemycells.sources import ArraySource


class FakeTerminal(io.StringIO):
    """A text stream that says it is a terminal (what ``stderr`` is in an interactive shell)."""

    def isatty(self) -> bool:
        super().isatty()  # ValueError once closed, as a real stream
        return True


class Ticks:
    """A clock that advances one second per reading."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


def test_only_an_interactive_terminal_counts_as_one() -> None:
    closed = FakeTerminal()
    closed.close()
    assert interactive(FakeTerminal())
    assert not interactive(io.StringIO()) and not interactive(closed) and not interactive(object())


def test_a_terminal_gets_a_bar_with_done_total_and_time_left(caplog: pytest.LogCaptureFixture) -> None:
    screen = FakeTerminal()
    shown = progress_for(8, "patches", step=2, stream=screen)
    assert isinstance(shown, Bar)
    with caplog.at_level(logging.INFO, logger="fusemycells"):
        for done in (2, 4, 6, 8):
            shown.update(done, float(done))
        shown.close()
    text = screen.getvalue()
    assert "patches: 100%" in text and "8/8" in text and "left" in text and "elapsed" in text
    assert "\r" in text  # redrawn in place
    assert "patches 8/8" not in caplog.text  # no log lines besides the bar


def test_elsewhere_the_log_gets_a_line_about_every_tenth_and_at_the_end(caplog: pytest.LogCaptureFixture) -> None:
    shown = progress_for(16, "patches", step=2, stream=io.StringIO())
    assert isinstance(shown, LogLines)
    with caplog.at_level(logging.INFO, logger="fusemycells"):
        for done in range(2, 17, 2):
            shown.update(done, done / 2)
        shown.close()
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "    patches 2/16 (1.0 s)" and lines[-1] == "    patches 16/16 (8.0 s)"
    assert len(lines) == 8  # every batch of 2 crosses a tenth (16 // 10 = 1 patch) here

    caplog.clear()
    sparse = LogLines(100, "patches", step=1)
    with caplog.at_level(logging.INFO, logger="fusemycells"):
        for done in range(1, 101):
            sparse.update(done, 0.0)
    assert [r.getMessage().split()[1] for r in caplog.records] == [f"{n}/100" for n in range(10, 101, 10)]


def test_log_records_written_while_the_bar_is_shown_go_above_it_and_the_handlers_come_back(monkeypatch: pytest.MonkeyPatch) -> None:
    screen = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", screen)  # the console handler writes to stderr, as logging.basicConfig sets it
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [handler])
    monkeypatch.setattr(root, "level", logging.INFO)
    shown = progress_for(4, "patches")
    shown.update(1, 1.0)
    logging.getLogger("fusemycells.test").warning("budget: something happened")
    assert root.handlers != [handler]  # tqdm's handler meanwhile
    shown.update(4, 2.0)
    shown.close()
    shown.close()  # a second close changes nothing
    assert root.handlers == [handler]
    lines = screen.getvalue().replace("\r", "\n").splitlines()
    assert "WARNING budget: something happened" in lines  # a line of its own, not glued to the bar


def test_the_patch_watcher_shows_its_run_on_the_stream_it_is_given(caplog: pytest.LogCaptureFixture) -> None:
    screen = FakeTerminal()
    watcher = PatchRateWatcher(Ticks(), progress=partial(progress_for, stream=screen))
    with caplog.at_level(logging.INFO, logger="fusemycells"):
        watcher.start(6, Countdown(), batch_size=2)
        assert [watcher.after_batch(done, 6) for done in (2, 4, 6)] == [None, None, None]
        watcher.finish()
    assert "6/6" in screen.getvalue() and "patches 6/6" not in caplog.text
    assert watcher.seconds_per_patch == pytest.approx(0.5)  # the rate is learned as before

    plain = PatchRateWatcher(Ticks(), progress=partial(progress_for, stream=io.StringIO()))
    with caplog.at_level(logging.INFO, logger="fusemycells"):
        plain.start(6, Countdown(), batch_size=2)
        for done in (2, 4, 6):
            plain.after_batch(done, 6)
        plain.finish()
    assert "    patches 6/6 (3.0 s)" in caplog.text  # today's lines, unchanged


class FailingAfter:
    """A patch runner that fails (not out of memory) after ``ok`` batches."""

    def __init__(self, runner, ok: int) -> None:
        self.runner, self.ok = runner, ok
        self.backend, self.provider, self.device = runner.backend, runner.provider, runner.device
        self.precision = runner.precision

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        self.ok -= 1
        if self.ok < 0:
            raise ValueError("broken network")
        return self.runner(batch)


def test_the_patch_stage_closes_its_bar_when_the_network_fails(fixture_resources: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    screen = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", screen)
    root = logging.getLogger()
    console = logging.StreamHandler(sys.stderr)
    monkeypatch.setattr(root, "handlers", [console])
    manifest = load_manifest(fixture_resources)
    spec = manifest.channel("nucleus").patch_stage

    def load(device: str) -> LoadedStage:
        loaded = load_stage(manifest, spec, "onnx", "cpu", threads=1)
        return dataclasses.replace(loaded, runner=FailingAfter(loaded.runner, ok=1))

    policy = BudgetPolicy(device="cpu", half=False, vram_budget_gib=None, time_budget_s=None, threads=1)
    stage = PatchStage(spec, load, policy)  # the default progress: decided on sys.stderr, a terminal here
    rng = np.random.default_rng(0)
    x_h, p1_h = (ArraySource(rng.random((16, 24, 40), dtype=np.float32)) for _ in range(2))
    with pytest.raises(ValueError, match="broken network"):
        stage(x_h, p1_h, Countdown())
    assert root.handlers == [console]  # the console handler is back
    assert "patches:" in screen.getvalue()


def test_batch_shows_files_on_a_bar_on_a_terminal_and_a_line_per_file_elsewhere(caplog: pytest.LogCaptureFixture) -> None:
    entries = [{"file": "a.tif", "status": "ok"}, {"file": "b.tif", "status": "refused"}, {"file": "c.tif", "status": "skipped"}]
    screen = FakeTerminal()
    shown = batch.Progress(3, stream=screen)
    with caplog.at_level(logging.INFO, logger="fusemycells"):
        for entry in entries:
            shown.update(entry)
    assert "files: 100%" in screen.getvalue() and "3/3" in screen.getvalue()
    assert "1 written, 1 skipped, 1 refused" in screen.getvalue() and "a.tif" not in caplog.text
    with caplog.at_level(logging.INFO, logger="fusemycells"):
        plain = batch.Progress(3, stream=io.StringIO())
        for entry in entries:
            plain.update(entry)
        plain.close()
    assert "refused b.tif: 2/3 files (1 written, 0 skipped, 1 refused)" in caplog.text


def test_dask_workers_never_draw_bars() -> None:
    assert isinstance(log_lines_only(8, "patches", step=2, stream=FakeTerminal()), LogLines)


def _run_on_a_terminal(cmd: list[str], timeout: float) -> tuple[int, str]:
    """Run ``cmd`` with its stderr on a pseudo-terminal; (exit code, what it wrote there)."""
    primary, secondary = os.openpty()
    proc = subprocess.Popen(cmd, stderr=secondary, stdout=subprocess.DEVNULL, cwd=str(REPO), env={**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "100"})
    os.close(secondary)
    chunks: list[bytes] = []
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        ready, _, _ = select.select([primary], [], [], 0.5)
        if ready:
            try:
                data = os.read(primary, 65536)
            except OSError:  # the child closed its side
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    os.close(primary)
    return proc.wait(timeout=30), b"".join(chunks).decode(errors="replace")


def test_inference_draws_the_bar_on_a_terminal_and_writes_log_lines_to_a_pipe(fixture_resources: Path, tmp_path: Path) -> None:
    write_case(tmp_path / INPUT_SUBDIR, "case.tif", blob_volume((12, 60, 60), seed=3))
    cmd = [sys.executable, "inference.py", "--input", str(tmp_path), "--output", str(tmp_path / "tty"), "--resources", str(fixture_resources), "--device", "cpu", "--threads", "1"]
    code, screen = _run_on_a_terminal(cmd, timeout=120)
    assert code == 0, screen[-3000:]
    assert "patches: 100%" in screen and "left" in screen, screen[-3000:]
    assert "INFO        patches " not in screen  # the bar instead of the periodic lines
    assert "INFO      patch_stage" in screen  # the rest of the log as usual
    piped = subprocess.run([*cmd[:5], str(tmp_path / "pipe"), *cmd[6:]], capture_output=True, text=True, timeout=120, cwd=str(REPO), env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert piped.returncode == 0, piped.stderr[-3000:]
    assert "INFO        patches " in piped.stderr and "%|" not in piped.stderr
