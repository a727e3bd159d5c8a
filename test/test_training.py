"""Training codebase: models, losses, pair discovery, one step per stage, export parity."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from fusemycells.config import load_manifest
from training import export, train
from training.data import bright_centres, cached_pair, find_pairs, load_pair, random_crop
from training.losses import difference_weighted_mae, difference_weights, lsgan_discriminator_loss, lsgan_generator_loss
from training.models import PatchDiscriminator3D, ResidualUNet3D
from training.simulate import simulate_pair, write_pair

REPO = Path(__file__).resolve().parent.parent
TINY = ["--grid", "24", "24", "24", "--global-crop", "16", "16", "16", "--patch", "16", "16", "16", "--base", "4", "--depth", "2", "--batch", "2"]


def _randomise_head(model: ResidualUNet3D) -> ResidualUNet3D:
    with torch.no_grad():
        model.head.weight.normal_(0, 0.5)
        model.head.bias.fill_(0.1)
    return model.eval()


@pytest.mark.parametrize("first_stride,channels", [(1, 2), (2, 1)])
def test_untrained_unet_is_the_identity_on_the_image_channel(first_stride, channels):
    model = ResidualUNet3D(channels, base=4, depth=2, first_stride=first_stride).eval()
    x = torch.randn(1, channels, 13, 22, 17)
    with torch.no_grad():
        torch.testing.assert_close(model(x), x[:, :1])


def test_traced_unet_runs_at_other_shapes_like_eager():
    model = _randomise_head(ResidualUNet3D(2, base=4, depth=2))
    with torch.no_grad():
        traced = torch.jit.trace(model, torch.randn(1, 2, 16, 16, 16))
        x = torch.randn(2, 2, 11, 19, 26)
        torch.testing.assert_close(traced(x), model(x), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(model(x), x[:, :1])  # the head is live: the check is not trivial


def test_difference_weighting_emphasises_voxels_that_must_change():
    inp = torch.zeros(1, 1, 4, 4, 4)
    target = inp.clone()
    target[0, 0, 0, 0, 0] = 1.0
    w = difference_weights(inp, target, alpha=2.0)
    assert w[0, 0, 0, 0, 0] > 10 * w[0, 0, 1, 1, 1]
    assert difference_weighted_mae(target, target, inp).item() == 0.0
    assert difference_weighted_mae(inp, target, inp).item() > (inp - target).abs().mean().item()


def test_lsgan_losses_have_their_minimum_at_the_labels():
    ones, zeros = torch.ones(2, 1, 3, 3, 3), torch.zeros(2, 1, 3, 3, 3)
    assert lsgan_discriminator_loss(ones, zeros).item() == 0.0
    assert lsgan_generator_loss(ones).item() == 0.0
    assert lsgan_discriminator_loss(zeros, ones).item() == pytest.approx(1.0)


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    study = root / "study_a"
    study.mkdir()
    for i in range(2):
        write_pair(simulate_pair(100 + i, "nucleus", shape=(10, 48, 48), spacing=(2.0, 0.4, 0.4)), study, i, "study_a")
    write_pair(simulate_pair(200, "membrane", shape=(10, 48, 48), spacing=(2.0, 0.4, 0.4)), study, 7, "study_a")
    (study / "image_9_nucleus_angle.tif").write_bytes((study / "image_0_nucleus_angle.tif").read_bytes())  # no _fused: skipped
    return root


def test_find_pairs_matches_challenge_names_and_filters_by_channel(tiny_dataset):
    nuclei = find_pairs(tiny_dataset, "nucleus")
    assert [p.angle.name for p in nuclei] == ["image_0_nucleus_angle.tif", "image_1_nucleus_angle.tif"]
    assert all(p.fused.name.endswith("_fused.tif") and p.study == "study_a" for p in nuclei)
    assert [p.channel for p in find_pairs(tiny_dataset)] == ["nucleus", "nucleus", "membrane"]


def test_load_pair_resamples_both_volumes_to_the_isotropic_grid(tiny_dataset):
    x, y = load_pair(find_pairs(tiny_dataset, "nucleus")[0], {"kind": "percentile", "low": 1.0, "high": 99.8}, 0.6)
    assert x.shape == y.shape == (33, 32, 32)  # 10·2.0/0.6, 48·0.4/0.6 (µm / µm)
    assert x.dtype == np.float32 and np.isfinite(x).all()


def test_cached_pairs_are_memory_mapped_and_equal_to_the_loaded_ones(tiny_dataset, tmp_path):
    pair = find_pairs(tiny_dataset, "nucleus")[0]
    norm = {"kind": "percentile", "low": 1.0, "high": 99.8}
    x, y = cached_pair(pair, norm, 0.6, tmp_path)
    assert isinstance(x, np.memmap) and isinstance(y, np.memmap) and not x.flags.writeable
    ref_x, ref_y = load_pair(pair, norm, 0.6)
    np.testing.assert_array_equal(x, ref_x)
    np.testing.assert_array_equal(y, ref_y)
    written = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.npy")}
    assert len(written) == 2
    cached_pair(pair, norm, 0.6, tmp_path)  # second use: read from the cache, nothing rewritten
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.npy")} == written
    cached_pair(pair, norm, 0.4, tmp_path)  # another grid: another cache entry
    assert len(list(tmp_path.rglob("*.npy"))) == 4


def test_bright_centres_point_at_bright_voxels_and_centre_the_crops():
    rng = np.random.default_rng(0)
    vol = np.zeros((40, 30, 20), dtype=np.float32)
    vol[30:34, 5:9, 10:14] = 1.0
    idx = bright_centres(vol, rng, percentile=99.0, slab=7)
    assert len(idx) == 64 and (vol.reshape(-1)[idx] == 1.0).all()
    (crop,) = random_crop([vol], (8, 8, 8), rng, centres=idx)
    assert crop[4, 4, 4] == 1.0 or crop.sum() >= 27  # centred on the bright block
    assert len(bright_centres(np.random.default_rng(1).random((20, 20, 20)).astype(np.float32), rng, max_count=100)) == 100


def test_random_crop_pads_small_arrays_and_keeps_arrays_aligned():
    rng = np.random.default_rng(0)
    a = np.arange(5 * 6 * 7, dtype=np.float32).reshape(5, 6, 7)
    ca, cb = random_crop([a, a + 1], (8, 4, 4), rng)
    assert ca.shape == (8, 4, 4)
    np.testing.assert_array_equal(cb, ca + 1)


@pytest.fixture(scope="module")
def checkpoints(tiny_dataset, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ckpt")
    for channel in ("nucleus", "membrane"):
        rc = train.main(["--data", str(tiny_dataset), "--channel", channel, "--out", str(out / channel), *TINY, "--steps-global", "2", "--steps-patch", "2", "--threads", "1"])
        assert rc == 0
    return out


def test_one_training_step_per_stage_writes_checkpoints_and_log(checkpoints):
    log = json.loads((checkpoints / "nucleus" / "train_log.json").read_text())
    assert log["global_steps"] == 2 and log["patch_steps"] == 2
    ckpt = torch.load(checkpoints / "nucleus" / "patch.pt", weights_only=False)
    assert ckpt["config"]["in_channels"] == 2 and ckpt["patch_size"] == [16, 16, 16]
    assert ckpt["normalisation"] == train.DEFAULT_NORMALISATION


def test_one_adversarial_step_updates_generator_and_discriminator(tiny_dataset, tmp_path):
    torch.manual_seed(0)
    disc = PatchDiscriminator3D(2, base=4)
    before = [p.detach().clone() for p in disc.parameters()]
    rc = train.main(["--data", str(tiny_dataset), "--channel", "nucleus", "--out", str(tmp_path), *TINY, "--steps-global", "1", "--steps-patch", "1", "--adversarial", "--threads", "1"])
    assert rc == 0
    assert (tmp_path / "patch.pt").is_file()
    # train_patch really stepped its discriminator: one loss recorded and its parameters moved
    (record,) = [r for r in json.loads((tmp_path / "train_log.json").read_text())["history"] if r["stage"] == "discriminator"]
    assert record["steps"] == 1 and np.isfinite(record["d_loss"]) and record["param_change"] > 0
    # the discriminator term itself: a step of the discriminator lowers its loss on a fixed batch
    opt = torch.optim.SGD(disc.parameters(), lr=0.05)
    real, fake = torch.rand(2, 2, 16, 16, 16), torch.rand(2, 2, 16, 16, 16) * 0.2
    loss0 = lsgan_discriminator_loss(disc(real), disc(fake))
    opt.zero_grad()
    loss0.backward()
    opt.step()
    assert lsgan_discriminator_loss(disc(real), disc(fake)).item() < loss0.item()
    assert any(not torch.equal(a, b) for a, b in zip(before, disc.parameters()))


def test_init_fine_tunes_from_exported_torchscript_weights(checkpoints, tiny_dataset, tmp_path):
    exported = tmp_path / "exported"
    assert export.main(["--checkpoints", str(checkpoints), "--out", str(exported), "--channels", "nucleus"]) == 0
    torch.manual_seed(1)
    for stage in ("global", "patch"):  # make the exported weights distinguishable from a fresh model
        traced = torch.jit.load(str(exported / f"nucleus_{stage}.pt"))
        with torch.no_grad():
            traced.head.weight.normal_(0, 0.3)
        traced.save(str(exported / f"nucleus_{stage}.pt"))
    out = tmp_path / "ft"
    assert train.main(["--data", str(tiny_dataset), "--channel", "nucleus", "--out", str(out), *TINY, "--steps-global", "0", "--steps-patch", "0", "--threads", "1", "--init", str(exported)]) == 0
    for stage in ("global", "patch"):  # zero steps: the checkpoint is exactly the exported network
        saved = torch.load(out / f"{stage}.pt", weights_only=False)["state_dict"]
        source = torch.jit.load(str(exported / f"nucleus_{stage}.pt")).state_dict()
        assert saved.keys() == source.keys()
        assert all(torch.equal(saved[k], source[k]) for k in saved)
        assert saved["head.weight"].abs().sum() > 0
    wide = [*TINY[: TINY.index("--base")], "--base", "8", "--depth", "2", "--batch", "2"]
    assert train.main(["--data", str(tiny_dataset), "--channel", "nucleus", "--out", str(tmp_path / "bad"), *wide, "--steps-global", "0", "--steps-patch", "0", "--init", str(exported)]) == 2
    with pytest.raises(train.InitError, match="membrane_global.pt"):
        train.init_state(exported, "membrane", "global", ResidualUNet3D(1, base=4, depth=2, first_stride=2).config)


def test_pairs_whose_shapes_differ_are_skipped(tiny_dataset, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for name in ("image_0_nucleus_angle.tif", "image_0_nucleus_fused.tif", "image_1_nucleus_angle.tif"):
        (data / name).write_bytes((tiny_dataset / "study_a" / name).read_bytes())
    small = simulate_pair(300, "nucleus", shape=(8, 40, 40), spacing=(2.0, 0.4, 0.4))
    write_pair(small, data, 5, "study_a")
    (data / "image_1_nucleus_fused.tif").write_bytes((data / "image_5_nucleus_fused.tif").read_bytes())  # 8×40×40 vs 10×48×48
    rc = train.main(["--data", str(data), "--channel", "nucleus", "--out", str(tmp_path / "ckpt"), *TINY, "--steps-global", "1", "--steps-patch", "1", "--threads", "1"])
    assert rc == 0
    assert json.loads((tmp_path / "ckpt" / "train_log.json").read_text())["pairs"] == 2


def test_a_failed_export_leaves_the_existing_resources_untouched(checkpoints, tmp_path):
    resources = tmp_path / "resources"
    assert export.main(["--checkpoints", str(checkpoints), "--out", str(resources), "--channels", "nucleus", "--time-budget", "1234"]) == 0
    before = {p.name: p.read_bytes() for p in resources.iterdir()}
    with pytest.raises(export.ExportError):
        export.main(["--checkpoints", str(checkpoints), "--out", str(resources), "--tolerance", "-1"])
    assert {p.name: p.read_bytes() for p in resources.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["resources"]  # no staging folder left behind
    # a later export of the other channel keeps the first one and the time budget
    assert export.main(["--checkpoints", str(checkpoints), "--out", str(resources), "--channels", "membrane"]) == 0
    raw = json.loads((resources / "manifest.json").read_text())
    assert raw["time_budget_s"] == 1234 and sorted(raw["channels"]) == ["membrane", "nucleus"]
    assert (resources / "nucleus_global.pt").read_bytes() == before["nucleus_global.pt"]
    load_manifest(resources)


def test_shipped_resources_stay_within_the_size_limit():
    files = [p for p in (REPO / "resources").rglob("*") if p.is_file()]
    assert files, "resources/ is empty"
    assert sum(p.stat().st_size for p in files) <= 20e6  # bytes


def test_export_stage_refuses_a_network_that_does_not_reproduce(tmp_path):
    model = _randomise_head(ResidualUNet3D(1, base=4, depth=2))
    result = export.export_stage(model, (1, 1, 16, 16, 16), (1, 1, 13, 18, 15), tmp_path, "ok", tolerance=1e-4)
    assert result["parity"]["onnx"] <= 1e-4 and result["parity"]["torchscript"] <= 1e-4
    with pytest.raises(export.ExportError):
        export.export_stage(model, (1, 1, 16, 16, 16), (1, 1, 13, 18, 15), tmp_path, "bad", tolerance=-1.0)


def test_export_writes_a_verified_manifest_and_both_backends_agree_in_inference(checkpoints, tiny_dataset, tmp_path):
    torch.manual_seed(0)  # the random heads must not depend on which tests ran before
    for channel in ("nucleus", "membrane"):  # make the exported networks non-trivial
        path = checkpoints / channel / "patch.pt"
        ckpt = torch.load(path, weights_only=False)
        ckpt["state_dict"]["head.weight"].normal_(0, 0.3)
        torch.save(ckpt, path)
    resources = tmp_path / "resources"
    assert export.main(["--checkpoints", str(checkpoints), "--out", str(resources), "--output-gaussian-sigma", "membrane=0.5"]) == 0
    manifest = load_manifest(resources)  # checksums verified
    assert manifest.channel("membrane").postprocess.output_sigma_knots == ((0.0, 0.5),)
    assert manifest.channel("nucleus").global_stage.grid == (24, 24, 24)
    raw = json.loads((resources / "manifest.json").read_text())
    assert raw["format_version"] == 2 and "output_gaussian_sigma" not in raw["channels"]["membrane"]["postprocess"]
    for stage in ("global", "patch"):
        assert raw["channels"]["nucleus"]["parity"][stage]["onnx"] <= 1e-4
    inp_root = tmp_path / "in" / "images" / "fluorescence-lightsheet-3D-microscopy"
    inp_root.mkdir(parents=True)
    (inp_root / "case.tif").write_bytes((tiny_dataset / "study_a" / "image_0_nucleus_angle.tif").read_bytes())
    outputs = {}
    for backend in ("torchscript", "onnx"):
        out = tmp_path / f"out_{backend}"
        cmd = [sys.executable, "inference.py", "--input", str(tmp_path / "in"), "--output", str(out), "--resources", str(resources), "--backend", backend, "--device", "cpu", "--output-dtype", "float32"]  # values, not uint16 levels
        subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, timeout=300)
        outputs[backend] = tifffile.imread(out / "images" / "fused-fluorescence-lightsheet-3D-microscopy" / "case.tif")
    assert outputs["onnx"].shape == (10, 48, 48)
    # each network is within 1e-4 of eager (export parity); chained through two stages and the
    # post-processing, single voxels reach ≈1e-4 between the backends
    np.testing.assert_allclose(outputs["onnx"], outputs["torchscript"], atol=3e-4)
