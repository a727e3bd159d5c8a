"""Memory of a mid-size run: what the output pass and the networks hold beyond the input (issue #29 item 4).

The full 160×900×900 command is measured by ``benchmarks/mid_memory.py`` (too slow for CI); here a smaller
proxy of its largest step, the output pass, and the release of the global stage's OpenVINO memory.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from fusemycells import trust
from fusemycells.backends import OpenVinoRunner, load_stage
from fusemycells.config import load_manifest

REPO = Path(__file__).resolve().parent.parent

OUTPUT_PASS = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    from fusemycells.config import PostprocessSpec, with_output_sigma
    from fusemycells.ops import choose_ops
    from fusemycells.postprocess import final_source
    from fusemycells.runtime import allocator
    from fusemycells.runtime.devices import proc_status_mib
    from fusemycells.sources import ArraySource

    allocator.configure()
    shape = (160, 600, 600)
    data = np.random.default_rng(0).integers(100, 4000, size=shape, dtype=np.uint16)
    spec = with_output_sigma(PostprocessSpec(), 0.5)
    ops = choose_ops("cpu", threads=2)
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # VmHWM := VmRSS now: the peak of what follows
    live = proc_status_mib("VmRSS")
    with allocator.reuse_freed_memory():  # as the pipeline's output pass (Fuser._finish, then the write)
        out = final_source(ArraySource(data, 100.0, 1 / 3900), spec, "uint16", (1.0, 0.39, 0.39), ops=ops)
        for z0 in range(0, shape[0], 8):  # as io.tiff's writer asks for planes
            out.planes(z0, min(shape[0], z0 + 8))
    print(json.dumps({"above_mib": proc_status_mib("VmHWM") - live, "input_mib": data.nbytes / 2**20}))
    """
)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc peak-RSS reset")
def test_output_pass_of_a_mid_size_stack_holds_at_most_twice_its_input_above_it() -> None:
    """With 256 MiB per worker the output pass of this 160×600×600 stack held 668 MiB above the 110 MiB input
    (a 160×900×900 run peaked at 5.4× its input); bounded to a share of the stack, 125–134 MiB, most of it the
    percentile sample's copies (4·10⁶ voxels)."""
    proc = subprocess.run(
        [sys.executable, "-c", OUTPUT_PASS], cwd=REPO, capture_output=True, text=True, check=True, timeout=300
    )
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["above_mib"] <= 2 * result["input_mib"], result


def test_openvino_global_stage_releases_its_intermediate_memory_after_each_call(fixture_resources: Path) -> None:
    """The global stage runs once per file: its OpenVINO intermediate tensors (290 MiB for the shipped 128³
    network) are released after the call, not held through the rest of the file; the patch stage keeps them."""
    pytest.importorskip("openvino")
    manifest = load_manifest(fixture_resources)
    channel = manifest.channel("nucleus")
    released: list[str] = []

    class Counting:
        def __init__(self, model, name: str) -> None:
            self.model, self.name = model, name

        def release_memory(self) -> None:
            released.append(self.name)
            self.model.release_memory()

    for name, spec, channels in (("global", channel.global_stage, 1), ("patch", channel.patch_stage, 2)):
        runner = load_stage(manifest, spec, "openvino", "cpu", strict=True, threads=1).runner
        assert isinstance(runner, OpenVinoRunner)
        runner.model = Counting(runner.model, name)
        shape = spec.grid if spec.patch_size is None else spec.patch_size
        out = runner(np.zeros((1, channels, *shape), dtype=np.float32))
        assert out.shape == (1, 1, *shape) and np.isfinite(out).all()
    assert released == ["global"]


def test_mid_memory_benchmark_runs_the_networks_with_a_manifest_without_trust(tmp_path: Path) -> None:
    """``benchmarks/mid_memory.py --no-trust``: the shipped manifest without trust blocks (the constant gate),
    every other file the shipped one (linked), so that the worst case runs both networks."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import mid_memory

    folder = mid_memory.untrusted_resources(tmp_path)
    manifest = load_manifest(folder)
    assert all(not trust.never(spec.trust) and spec.trust.mode == "off" for spec in manifest.channels.values())
    shipped = {p.name for p in (REPO / "resources").iterdir()}
    assert {p.name for p in folder.iterdir()} == shipped
    assert all((folder / name).resolve() == (REPO / "resources" / name).resolve() for name in shipped - {"manifest.json"})
