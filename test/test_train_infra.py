"""Training infrastructure: presets, step-based schedule, resume, DDP replicas, augmentations, provenance."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from training import train
from training.augment import add_noise, augment, coarse_axis_resample, intensity_map
from training.data import CropDataset, save_npy
from training.provenance import hardware, portable_command, portable_legacy_command, portable_path
from training.simulate import Effects, simulate_pair, write_pair

REPO = Path(__file__).resolve().parent.parent
TINY = ["--grid", "24", "24", "24", "--global-crop", "16", "16", "16", "--patch", "16", "16", "16", "--base", "4", "--depth", "2", "--batch", "2"]


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    for i in range(2):
        write_pair(simulate_pair(100 + i, "nucleus", shape=(10, 48, 48), spacing=(2.0, 0.4, 0.4), effects=Effects(randomise=True)), root, i, "study_a")
    return root


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=False)["state_dict"]


def test_resume_continues_to_the_same_weights_as_an_uninterrupted_run(tiny_dataset, tmp_path):
    common = ["--data", str(tiny_dataset), "--channel", "nucleus", *TINY, "--steps-global", "4", "--steps-patch", "4", "--threads", "1", "--log-every", "1"]
    assert train.main([*common, "--out", str(tmp_path / "a")]) == 0
    b = tmp_path / "b"
    assert train.main([*common, "--out", str(b), "--stop-after-steps", "2"]) == 0  # interrupted in stage 1
    assert not (b / "global.pt").exists()
    state = torch.load(b / "state.pt", weights_only=False)
    assert (state["stage"], state["step"], state["complete"]) == ("global", 2, False)
    assert train.main([*common, "--out", str(b)]) == 2  # an existing state is never overwritten silently
    assert train.main([*common, "--out", str(b), "--resume", "--stop-after-steps", "3"]) == 0  # finishes stage 1, 1 step of stage 2
    assert torch.load(b / "state.pt", weights_only=False)["stage"] == "patch" and not (b / "patch.pt").exists()
    assert train.main([*common, "--out", str(b), "--resume"]) == 0
    for stage in ("global", "patch"):
        wa, wb = _weights(tmp_path / "a" / f"{stage}.pt"), _weights(b / f"{stage}.pt")
        assert all(torch.equal(wa[k], wb[k]) for k in wa), stage
        assert not torch.equal(wa["head.weight"], torch.zeros_like(wa["head.weight"]))  # it trained
    log_a, log_b = (json.loads((d / "train_log.json").read_text()) for d in (tmp_path / "a", b))
    assert log_a["complete"] and log_b["complete"]
    assert (log_b["global_steps"], log_b["patch_steps"]) == (log_a["global_steps"], log_a["patch_steps"]) == (4, 4)
    assert [r["loss"] for r in log_b["history"] if "loss" in r] == pytest.approx([r["loss"] for r in log_a["history"] if "loss" in r], abs=0)


def test_two_ddp_processes_keep_identical_replicas(tiny_dataset, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "training.train",
           "--data", str(tiny_dataset), "--channel", "nucleus", "--out", str(out), *TINY, "--steps-global", "1", "--steps-patch", "1",
           "--threads", "1", "--device", "cpu"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    log = json.loads((out / "train_log.json").read_text())
    records = [r for r in log["history"] if "replica_digests" in r]
    assert [r["stage"] for r in records] == ["global", "patch"]
    for r in records:
        assert len(r["replica_digests"]) == 2 and len(set(r["replica_digests"])) == 1
        assert r["replica_digests"][0] != r["initial_digest"]  # one step changed the weights on both replicas alike
    assert log["provenance"]["world_size"] == 2


def test_ranks_draw_different_samples_and_a_sample_is_a_function_of_its_index(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for name in ("x", "y"):
        save_npy(tmp_path / f"{name}.npy", rng.random((20, 20, 20), dtype=np.float32))
        paths.append(tmp_path / f"{name}.npy")
    rank0, rank1 = CropDataset([paths], (8, 8, 8), 0, 0, rank=0, augment=True), CropDataset([paths], (8, 8, 8), 0, 0, rank=1, augment=True)
    x0, y0 = rank0[5]
    x0_again, _ = CropDataset([paths], (8, 8, 8), 0, 0, rank=0, augment=True)[5]
    assert x0.shape == (1, 8, 8, 8) and y0.shape == (1, 8, 8, 8) and x0.dtype == torch.float32
    assert torch.equal(x0, x0_again)
    assert not torch.equal(x0, rank1[5][0]) and not torch.equal(x0, rank0[6][0])


def test_presets_set_defaults_and_flags_override_them():
    cpu = train.parse_args(["--preset", "cpu", "--data", "d", "--channel", "nucleus", "--out", "o"])
    assert (cpu.base, cpu.depth, cpu.grid) == (8, 3, [128, 128, 128])
    paper = train.parse_args(["--preset", "paper", "--data", "d", "--channel", "nucleus", "--out", "o", "--steps-patch", "7"])
    assert paper.grid == [224, 224, 224] and paper.base > 8 and paper.steps_patch == 7
    for preset in (REPO / "training" / "presets").glob("*.json"):  # every key is a flag
        train.parse_args(["--preset", str(preset), "--data", "d", "--channel", "nucleus", "--out", "o"])


def test_learning_rate_follows_the_step_fraction():
    assert train.lr_at(1.0, 0.0) == pytest.approx(0.1)
    assert train.lr_at(1.0, 0.03) == pytest.approx(1.0)
    assert train.lr_at(1.0, 1.0) == pytest.approx(0.02)
    values = [train.lr_at(1.0, f) for f in np.linspace(0.03, 1.0, 50)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_mixed_precision_only_on_cuda():
    assert train.amp_dtype("auto", torch.device("cpu")) is None
    assert train.amp_dtype("fp16", torch.device("cpu")) is None


def test_intensity_map_is_one_monotone_map_for_all_arrays():
    a = np.linspace(-0.2, 1.5, 50, dtype=np.float32)
    out_a, out_b = intensity_map([a, a.copy()], 0.8, 1.2, 0.03)
    np.testing.assert_array_equal(out_a, out_b)
    assert (np.diff(out_a) > 0).all() and out_a[np.argmin(np.abs(a))] == pytest.approx(0.03, abs=0.05)


def test_coarse_axis_resample_smooths_only_that_axis_and_keeps_ramps():
    ramp = np.broadcast_to(np.arange(16, dtype=np.float32)[:, None, None], (16, 8, 8)).copy()
    np.testing.assert_allclose(coarse_axis_resample(ramp, 0, 2.5), ramp, atol=1e-4)
    stripes = np.zeros((16, 16, 16), dtype=np.float32)
    stripes[::2] = 1.0  # alternating Z planes
    out = coarse_axis_resample(stripes, 0, 3.0)
    assert np.abs(out - stripes).mean() > 0.2  # the fine Z detail is lost
    assert (np.diff(out, axis=1) == 0).all() and (np.diff(out, axis=2) == 0).all()  # nothing mixed across Y, X
    np.testing.assert_array_equal(coarse_axis_resample(stripes, 2, 3.0), stripes)  # constant along X: unchanged


def test_augment_adds_noise_to_the_image_only():
    rng = np.random.default_rng(1)
    x, p1, y = (np.full((8, 8, 8), v, dtype=np.float32) for v in (0.2, 0.3, 0.4))
    assert add_noise(x, 0.1, rng).std() == pytest.approx(0.1, rel=0.2)
    for seed in range(20):
        (ax, ap1), ay = augment([x, p1], y, np.random.default_rng(seed))
        assert ap1.std() < 1e-6 and ay.std() < 1e-6  # intensity maps keep constants constant
        assert ap1.mean() < ay.mean()  # one monotone map for all channels
        if ax.std() > 1e-3:
            return
    pytest.fail("no sample drew the noise augmentation in 20 seeds (p = 0.3)")


def test_provenance_holds_no_machine_paths(tmp_path):
    assert portable_path(str(REPO / "work_dirs" / "data")) == "work_dirs/data"
    assert portable_path("/somewhere/else/nucleus") == "<outside>/nucleus"
    assert portable_path("--lr") == "--lr" and portable_path("1e-3") == "1e-3"
    cmd = portable_command(["--data", "/x/y/train", "--out", str(REPO / "work_dirs" / "ckpt"), "--lr", "1e-3"])
    assert cmd == "python -m training.train --data '<outside>/train' --out work_dirs/ckpt --lr 1e-3"
    legacy = portable_legacy_command(f"{REPO}/training/train.py --data work_dirs/data2/train --channel nucleus --init resources")
    assert legacy == "python -m training.train --data work_dirs/data2/train --channel nucleus --init resources"
    hw = hardware(torch.device("cpu"))
    assert hw.startswith("CPU ") and "cores" in hw and str(REPO) not in hw


def test_training_records_steps_hardware_and_a_portable_command(tiny_dataset, tmp_path):
    out = tmp_path / "ckpt"
    assert train.main(["--data", str(tiny_dataset), "--channel", "nucleus", "--out", str(out), *TINY, "--steps-global", "1", "--steps-patch", "2", "--threads", "1"]) == 0
    ckpt = torch.load(out / "patch.pt", weights_only=False)
    prov = ckpt["provenance"]
    assert prov["steps"] == {"global": 1, "patch": 2} and prov["hardware"][0].startswith("CPU ")
    assert prov["seconds"]["patch"] > 0 and "/" not in prov["command"].split("--out")[0].replace("<outside>/", "")
    assert str(tmp_path) not in json.dumps(prov) and prov["command"].startswith("python -m training.train")
    shutil.rmtree(out)


def test_export_records_steps_seconds_and_hardware_without_machine_paths():
    from training.export import training_record

    config = {"in_channels": 1, "out_channels": 1, "base": 8, "depth": 3, "first_stride": 2}
    legacy = training_record({"steps": 202, "command": "/work/main/training/train.py --data work_dirs/data2/train --init resources", "config": config}, {"steps": 759, "config": config})
    assert legacy["command"] == "python -m training.train --data work_dirs/data2/train --init resources" and (legacy["global_steps"], legacy["patch_steps"]) == (202, 759)
    prov = {"seconds": {"global": 10.0, "patch": 20.0}, "hardware": ["CPU x"], "world_size": 1, "amp": "off", "preset": "cpu", "command": "python -m training.train"}
    new = training_record({"steps": 3, "command": "python -m training.train --preset cpu", "config": config}, {"steps": 4, "config": config, "provenance": prov})
    assert new["seconds"] == {"global": 10.0, "patch": 20.0} and new["hardware"] == ["CPU x"] and new["preset"] == "cpu"


def test_evaluate_sets_gates_the_networks_and_compares_each_case_with_networks_off():
    from training.evaluate_sets import markdown, summarise, with_constant_gate

    trust = {"mode": "case", "rules": [["s12_ratio", [[1.0, 0.0], [2.0, 0.75]]]]}
    manifest = {"channels": {"nucleus": {"postprocess": {"gate_knots": [[0.06, 0.5], [0.09, 0.0]], "sigma": 3.0}, "trust": trust}, "membrane": {}}}
    gated = with_constant_gate(manifest, 0.0)
    assert "trust" not in gated["channels"]["nucleus"] and manifest["channels"]["nucleus"]["trust"] == trust  # the gate is the factor
    assert gated["channels"]["nucleus"]["postprocess"] == {"gate_knots": [[0.0, 0.0], [1.0, 0.0]], "sigma": 3.0}
    assert gated["channels"]["membrane"]["postprocess"]["gate_knots"] == [[0.0, 0.0], [1.0, 0.0]]
    assert manifest["channels"]["nucleus"]["postprocess"]["gate_knots"][0] == [0.06, 0.5]  # the original is untouched

    def cases(values):
        return {"cases": [{"name": f"c{i}", "channel": "nucleus", "n_ssim": v, "n_ssim_gaussian": 0.1} for i, v in enumerate(values)]}

    table = summarise({"set": {"policy": cases([0.5, 0.2]), "gate0": cases([0.4, 0.3]), "gate1": cases([0.7, -0.1])}})
    row = table["set"]["nucleus"]
    assert row["policy_minus_off_mean"] == pytest.approx(0.0) and row["policy_minus_off_worst"] == pytest.approx(-0.1)
    assert row["gate1_minus_off_worst"] == pytest.approx(-0.4) and row["gate1_below0"] == 1 and row["gate0_min"] == pytest.approx(0.3)
    assert "| set | nucleus | 2 | 0.350 (0.200) |" in markdown(table)
