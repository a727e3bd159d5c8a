"""Worker-side test hooks of ``fusemycells.batch`` (``before_file``), importable by the workers of a
subprocess's local cluster: they reach this module through the ``sys.path`` the spawned workers inherit."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class StallInWrite:
    """Test hook: while file ``name`` is being written (its temporary ``.fmc-*.partial`` open and its
    first planes in it), write the worker's pid to ``marker`` and stall ``seconds``; other files run at
    once. The stall is inside ``fusemycells.io.tiff.write_volume``'s plane stream, so a signal that stops
    the run finds a real write in progress."""

    def __init__(self, name: str, marker: str, seconds: float = 120.0) -> None:
        self.name, self.marker, self.seconds = name, marker, seconds

    def __call__(self, name: str) -> None:
        from fusemycells.io import tiff as io

        if name != self.name:
            return
        chunks = io._flat_chunks
        marker, seconds = Path(self.marker), self.seconds

        def stalling(data: Any, dtype: Any) -> Iterator[Any]:
            for index, chunk in enumerate(chunks(data, dtype)):
                yield chunk
                if index == 1:  # the first chunk is in the temporary file by now
                    marker.write_text(str(os.getpid()))
                    time.sleep(seconds)

        io._flat_chunks = stalling
