"""Manifest format_version 2 (the overlapping post-processing knobs merged) and the loader for version 1.

Version 1 had two knobs for each weight-map filter (voxels, and µm overriding when > 0) and two for the
output σ (a constant, and noise knots overriding when non-empty); version 2 has one of each
(``config.upgrade_manifest`` converts). Both versions of the same policy must behave the same."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile

from fusemycells import cli
from fusemycells.config import (
    DEFAULT_RESOURCES,
    ManifestError,
    _postprocess,
    load_manifest,
    parse_manifest,
    postprocess_v1_to_v2,
    upgrade_manifest,
)
from fusemycells.postprocess import adaptive_settings, weight_filters
from training import export

REPO = Path(__file__).resolve().parent.parent

SHIPPED_V1: dict[str, dict[str, Any]] = {
    "nucleus": {
        "diff_grid": [128, 128, 128], "max_filter": 9, "sigma": 3.0, "max_filter_um": 0.0, "sigma_um": 0.0,
        "weight_percentiles": [2.0, 98.0], "output_max_filter": 0, "output_gaussian_sigma": 0.0,
        "output_sigma_isotropic_um": True, "output_percentiles": [2.0, 99.8],
        "sigma_knots": [[0.008, 0.0], [0.01, 0.7], [0.02, 0.9], [0.035, 1.0], [0.06, 1.2], [0.09, 1.4]],
        "gate_knots": [[0.06, 0.5], [0.09, 0.0]], "background_threshold": 0.1,
    },
    "membrane": {
        "diff_grid": [128, 128, 128], "max_filter": 9, "sigma": 3.0, "max_filter_um": 0.0, "sigma_um": 0.0,
        "weight_percentiles": [2.0, 98.0], "output_max_filter": 0, "output_gaussian_sigma": 0.0,
        "output_sigma_isotropic_um": True, "output_percentiles": [2.0, 99.8],
        "sigma_knots": [[0.01, 0.4], [0.02, 0.6], [0.03, 0.7], [0.045, 0.9], [0.06, 1.1], [0.1, 1.3]],
        "gate_knots": [[0.06, 0.25], [0.09, 0.0]], "background_threshold": 0.1,
    },
}  # fmt: skip
"""The shipped manifest's ``postprocess`` blocks as format_version 1 wrote them (before the merge)."""


def shipped_raw() -> dict[str, Any]:
    return json.loads((DEFAULT_RESOURCES / "manifest.json").read_text())


def as_version_1(raw: dict[str, Any]) -> dict[str, Any]:
    """The shipped manifest ``raw`` (format 2) with the format-1 ``postprocess`` blocks of the same policy."""
    old = copy.deepcopy(raw)
    old["format_version"] = 1
    for name, channel in old["channels"].items():
        channel["postprocess"] = copy.deepcopy(SHIPPED_V1[name])
    return old


def test_the_shipped_manifest_is_format_2_and_its_format_1_form_parses_to_the_same_channels() -> None:
    raw = shipped_raw()
    assert raw["format_version"] == 2
    new, old = parse_manifest(raw, DEFAULT_RESOURCES), parse_manifest(as_version_1(raw), DEFAULT_RESOURCES)
    assert new.channels == old.channels and set(new.channels) == {"nucleus", "membrane"}
    assert old.channel("membrane").postprocess.output_sigma_knots[-1] == (0.1, 1.3)


@pytest.mark.parametrize(
    ("old", "fields"),
    [
        ({"max_filter": 5}, {"weight_max_filter": 5, "weight_sigma": 3.0, "weight_filter_unit": "voxel"}),
        ({"max_filter_um": 2.7, "sigma_um": 0.9}, {"weight_max_filter": 2.7, "weight_sigma": 0.9, "weight_filter_unit": "um"}),
        ({"max_filter_um": 2.7, "max_filter": 1, "sigma": 0.0}, {"weight_max_filter": 2.7, "weight_sigma": 0.0, "weight_filter_unit": "um"}),
        ({"output_gaussian_sigma": 0.6}, {"output_sigma_knots": ((0.0, 0.6),)}),
        ({"output_gaussian_sigma": 0.6, "sigma_knots": [[0.01, 0.4], [0.03, 1.0]]}, {"output_sigma_knots": ((0.01, 0.4), (0.03, 1.0))}),
        ({"output_gaussian_sigma": 0.0}, {"output_sigma_knots": ()}),
    ],
)  # fmt: skip
def test_format_1_knobs_convert_to_the_one_format_2_knob_that_does_the_same(old: dict[str, Any], fields: dict[str, Any]) -> None:
    spec = _postprocess(postprocess_v1_to_v2(old))
    assert {key: getattr(spec, key) for key in fields} == fields


def test_format_1_filters_in_um_and_a_constant_sigma_behave_as_they_did() -> None:
    """The converted specs give version 1's filter sizes (µm over voxels) and its constant σ at any noise."""
    um = _postprocess(postprocess_v1_to_v2({"max_filter": 9, "sigma": 3.0, "max_filter_um": 2.7, "sigma_um": 0.9}))
    size, sigma = weight_filters(um, (92.16, 38.4, 38.4))  # diff voxels of 0.72, 0.3, 0.3 µm
    assert size == (3, 9, 9) and sigma == pytest.approx((1.25, 3.0, 3.0))
    constant = _postprocess(postprocess_v1_to_v2({"output_gaussian_sigma": 0.6, "gate_knots": [[0.06, 1.0], [0.09, 0.0]]}))
    for noise in (0.0, 0.05, 0.075, 1.0):
        assert adaptive_settings(noise, constant) == (0.6, pytest.approx(float(np.interp(noise, [0.06, 0.09], [1, 0]))))


def test_a_format_1_manifest_with_one_filter_in_um_and_the_other_in_voxels_is_refused() -> None:
    raw = as_version_1(shipped_raw())
    raw["channels"]["nucleus"]["postprocess"]["sigma_um"] = 1.2  # max_filter stays 9 voxels
    with pytest.raises(ManifestError, match="one unit"):
        parse_manifest(raw, DEFAULT_RESOURCES)


@pytest.mark.parametrize("version", [3, 0, None, "2"])
def test_unknown_manifest_versions_are_refused(version: Any) -> None:
    raw = shipped_raw()
    raw["format_version"] = version
    with pytest.raises(ManifestError, match="format_version"):
        parse_manifest(raw, DEFAULT_RESOURCES)
    assert upgrade_manifest(shipped_raw()) == shipped_raw()  # version 2 passes as it is


def test_format_2_refuses_format_1_field_names_instead_of_ignoring_them() -> None:
    raw = shipped_raw()
    raw["channels"]["nucleus"]["postprocess"]["sigma_um"] = 1.2
    with pytest.raises(ManifestError, match="unknown field"):
        parse_manifest(raw, DEFAULT_RESOURCES)


def test_the_training_policy_file_is_format_2_and_holds_the_shipped_values() -> None:
    policy = export.read_policy(REPO / "training" / "policy" / "postprocess.json")
    shipped = load_manifest(DEFAULT_RESOURCES)
    for channel, fields in policy.items():
        spec = _postprocess({**fields, "diff_grid": list(shipped.channel(channel).postprocess.diff_grid)})
        assert {key: getattr(spec, key) for key in fields} == {
            key: getattr(shipped.channel(channel).postprocess, key) for key in fields
        }


def test_export_keeps_a_previous_constant_sigma_and_takes_the_flag_over_it() -> None:
    assert export.output_sigma_knots({"output_sigma_knots": [[0.0, 0.4]]}, None) == [[0.0, 0.4]]
    assert export.output_sigma_knots({"output_sigma_knots": [[0.0, 0.4], [0.1, 1.0]]}, None) == []  # as version 1
    assert export.output_sigma_knots({}, 0.5) == [[0.0, 0.5]] and export.output_sigma_knots({}, 0.0) == []


def run_sample(resources: Path, out: Path) -> dict[str, np.ndarray]:
    code = cli.main(["--input", str(REPO / "test" / "input"), "--output", str(out), "--resources", str(resources),
                     "--device", "cpu", "--output-dtype", "float32", "--threads", "2"])  # fmt: skip
    assert code == 0
    return {path.name: tifffile.imread(path) for path in sorted(out.rglob("*.tif"))}


def test_the_sample_fuses_identically_from_format_1_and_format_2_manifests_with_the_networks_on(tmp_path: Path) -> None:
    """Trust off (the noise gate alone), so both networks and the blend run on the sample's cases."""
    outputs = []
    for version, raw in ((2, shipped_raw()), (1, as_version_1(shipped_raw()))):
        resources = tmp_path / f"v{version}"
        shutil.copytree(DEFAULT_RESOURCES, resources)
        for channel in raw["channels"].values():
            channel.pop("trust", None)
        (resources / "manifest.json").write_text(json.dumps(raw))
        outputs.append(run_sample(resources, tmp_path / f"out{version}"))
    assert len(outputs[0]) == 2 and outputs[0].keys() == outputs[1].keys()
    for name, image in outputs[0].items():
        np.testing.assert_array_equal(image, outputs[1][name])
