"""The QC figure (fusemycells.evaluation.qc): projections in metric units and µm, layout, one scale per case."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO

from fusemycells.evaluation import qc
from fusemycells.evaluation.metrics import CaseScore

needs_matplotlib = pytest.mark.skipif(
    importlib.util.find_spec("matplotlib") is None, reason="the QC figure is optional: pip install -r requirements-eval.txt (CI does)"
)


def _score(name: str, channel: str = "nucleus") -> CaseScore:
    return CaseScore(name=name, channel=channel, shape=(16, 40, 36), ssim_input=0.5, ssim_pred=0.75, ssim_gaussian=0.6, n_ssim=0.5, n_ssim_gaussian=0.2)


def _grey(path: Path) -> np.ndarray:
    """The PNG as 0..1 luminance, (height, width)."""
    from matplotlib.image import imread

    return imread(path)[..., :3].mean(axis=2)


def test_projections_are_in_metric_units_with_the_voxel_size_in_um():
    vol = np.zeros((10, 40, 30), dtype=np.uint16)
    vol[5, 20, 15] = 1000
    vol[:, :2] = 100  # 2 rows of every plane at 100: the 99.8th percentile is 100, the 2nd is 0
    views = qc.projections(vol, spacing=(2.0, 0.5, 0.25))
    assert views.xy.shape == (40, 30) and views.xz.shape == (10, 30)
    assert views.xy[20, 15] == pytest.approx(10.0) and views.xy[0, 0] == pytest.approx(1.0) and views.xy[30, 3] == 0.0
    assert views.xz[5, 15] == pytest.approx(10.0)
    assert views.extent_um == pytest.approx((20.0, 20.0, 7.5))  # (Z, Y, X) µm: the XZ aspect is physical


def test_projections_of_a_large_stack_are_block_maxima_keeping_a_single_bright_voxel():
    vol = np.zeros((30, 100, 90), dtype=np.float32)
    vol[:, :2] = 1.0
    vol[17, 61, 44] = 5.0
    views = qc.projections(vol, spacing=(1.0, 0.4, 0.4), max_size=32)
    assert views.xy.shape == (25, 23) and views.xz.shape == (30, 23)  # Y/X stride 4, Z stride 1
    assert views.xy.max() == pytest.approx(5.0) and views.xy[61 // 4, 44 // 4] == pytest.approx(5.0)
    assert views.pixel_um == pytest.approx((1.0, 1.6, 1.6))


def test_scale_bar_is_a_round_length_of_at_most_a_fifth_of_the_panel():
    assert qc.scale_bar_um(40.0) == 5.0 and qc.scale_bar_um(100.0) == 20.0 and qc.scale_bar_um(750.0) == 100.0
    assert qc.scale_bar_um(3.0) == pytest.approx(0.5)


@needs_matplotlib
def test_qc_figure_is_written_at_its_layout_size_with_titles_and_row_labels(tmp_path: Path):
    rng = np.random.default_rng(0)
    cases = []
    for name, shape, spacing in (("a_nucleus.tif", (16, 40, 36), (1.0, 0.5, 0.5)), ("b_membrane.tif", (8, 30, 60), (2.0, 0.3, 0.3))):
        vol = rng.random(shape).astype(np.float32)
        views = tuple(qc.projections(v, spacing) for v in (vol, vol**2, vol))
        cases.append(qc.CaseViews(score=_score(name), views=views))
    path = tmp_path / "deep" / "qc.png"
    size = qc.write_figure(path, cases, diff=True)
    image = _grey(path)
    # by hand: width 60 + 4·300 + 2·90; case a: XY 300·20/18 = 333 px, XZ 300·16/18 = 267 px;
    # case b: XY 300·9/18 = 150 px, XZ 300·16/18 = 267 px; each case adds 64 + 12 + 24 px
    assert size == (1440, 700 + 517) and image.shape == (1217, 1440)
    dark = image < 0.5  # text is black on white
    for top, xy_h, xz_h in ((0, 333, 267), (700, 150, 267)):
        assert dark[top + 2 : top + 24, 60:900].any(), "case title line"
        for c in range(4):  # column titles just above the XY panels (input | prediction | GT | difference)
            x = 60 + c * 300 + (90 if c == 3 else 0)
            assert dark[top + 44 : top + 62, x + 100 : x + 200].any(), f"column title {c}"
        for row_top, row_h in ((top + 64, xy_h), (top + 64 + xy_h + 12, xz_h)):
            assert dark[row_top : row_top + row_h, 5:55].any(), "row label"
        gap = top + 64 + xy_h + 12 + xz_h
        assert not dark[gap + 8 : gap + 22, :].any(), "the gap below a case stays blank (a colour bar's end label may reach into its top)"


@needs_matplotlib
def test_every_panel_of_a_case_shares_one_intensity_scale(tmp_path: Path):
    flat = np.full((40, 40), 0.5, np.float32)
    ramp = np.tile(np.linspace(0.0, 1.0, 40, dtype=np.float32), (40, 1))
    views = (
        qc.Projections(xy=flat, xz=flat, pixel_um=(0.5, 0.5, 0.5)),  # input: mid grey on the common scale
        qc.Projections(xy=flat * 2, xz=flat * 2, pixel_um=(0.5, 0.5, 0.5)),  # prediction: the top of it
        qc.Projections(xy=ramp, xz=ramp, pixel_um=(0.5, 0.5, 0.5)),
    )
    path = tmp_path / "qc.png"
    qc.write_figure(path, [qc.CaseViews(score=_score("c.tif"), views=views)])
    image = _grey(path)
    centre_y = 64 + 150  # XY row of 300 px
    inp, pred = image[centre_y - 20 : centre_y + 20, 60 + 130 : 60 + 170], image[centre_y - 20 : centre_y + 20, 360 + 130 : 360 + 170]
    assert inp.std() < 0.01 and pred.std() < 0.01
    assert inp.mean() == pytest.approx(0.5, abs=0.03) and pred.mean() == pytest.approx(1.0, abs=0.01)  # not each stretched alone


@needs_matplotlib
def test_figure_without_cases_is_refused(tmp_path: Path):
    with pytest.raises(ValueError, match="no cases"):
        qc.write_figure(tmp_path / "qc.png", [])


def test_inference_and_evaluation_import_without_matplotlib():
    """matplotlib is an extra of the evaluation figure only: the image does not install it."""
    code = "import sys; sys.modules['matplotlib'] = None; import fusemycells.cli, fusemycells.pipeline, fusemycells.evaluate"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "matplotlib" not in (REPO / "requirements.txt").read_text()


def _texts(fig) -> list[str]:
    """Every text the figure draws (titles, labels, colour-bar labels, panel annotations)."""
    from matplotlib.text import Text

    return [t.get_text() for t in fig.findobj(Text) if t.get_text()]


def _case(name: str = "c_nucleus.tif", networks: str = qc.NO_REPORT) -> qc.CaseViews:
    vol = np.random.default_rng(1).random((12, 30, 40)).astype(np.float32)
    views = tuple(qc.projections(v, (2.0, 0.5, 0.5)) for v in (vol, vol**2, vol))
    return qc.CaseViews(score=_score(name), views=views, networks=networks)  # type: ignore[arg-type]


@needs_matplotlib
def test_figure_names_its_scales_the_z_direction_and_what_n_ssim_means():
    fig, _ = qc.draw_figure([_case()], diff=True)
    texts = _texts(fig)
    assert "normalised intensity: 2nd–99.8th percentile → 0–1" in texts  # the grey panels' colour bar
    assert qc.DIFFERENCE_LABEL in texts and "normalised intensity" in qc.DIFFERENCE_LABEL  # the difference's scale
    assert any("0 = no better than the input, 1 = equal to the fused ground truth" in t for t in texts)
    assert any("(input = 0)" in t for t in texts)  # the title's scores, explained by the line under it
    assert qc.Z_DIRECTION in texts and "↓" in qc.Z_DIRECTION
    assert qc.NO_REPORT in texts  # without a run report the figure says it does not know about the networks


@needs_matplotlib
def test_xz_panels_draw_plane_0_at_the_top_as_the_z_arrow_says():
    fig, _ = qc.draw_figure([_case()])
    labelled = [ax for ax in fig.axes if any(t.get_text() == qc.Z_DIRECTION for t in ax.texts)]
    assert len(labelled) == 1
    bottom, top = labelled[0].get_ylim()
    assert top == 0.0 and bottom > top  # z in µm grows downwards: plane 0 is the top row
    z_um = 12 * 2.0
    assert bottom == pytest.approx(z_um)


@needs_matplotlib
def test_networks_note_is_drawn_red_when_the_networks_were_off():
    off = qc.networks_note({"status": "ok", "trust": {"mode": "case", "factor": 0.0}, "degradation": 0})
    full = qc.networks_note({"status": "ok", "weight_map": {"w>0.5": 0.25}, "adaptive": {"network_gate": 1.0}})
    fig, _ = qc.draw_figure([_case("a.tif", off), _case("b.tif", full)])
    from matplotlib.text import Text

    colours = {t.get_text(): t.get_color() for t in fig.findobj(Text)}
    assert colours[off] == qc.ALERT_COLOUR and colours[full] == "black"


def test_networks_note_says_off_reduced_full_or_unknown_from_the_report_entry():
    note = qc.networks_note
    assert note(None) == qc.NO_REPORT
    assert note({"status": "fallback_identity"}).startswith("networks off: fallback_identity")
    trust_off = {"status": "ok", "trust": {"mode": "case", "factor": 0.0}}
    assert note(trust_off) == "networks off: trust factor 0.00"
    assert note({"status": "ok", "adaptive": {"network_gate": 0.0}}) == "networks off: the input's noise gates them off"
    skipped = {"status": "ok", "degradation": 3, "degradation_name": "percentile-normalised input (no network)"}
    assert note(skipped).startswith("networks off: no time left for them; time budget: level 3")
    reduced = {"status": "ok", "weight_map": {"w>0.5": 0.1}, "trust": {"mode": "case", "factor": 0.4}}
    assert note(reduced) == "networks blended in (weight > 0.5 on 10% of the stack, factor 0.40: reduced)"
    hurried = {"status": "ok", "weight_map": {"w>0.5": 0.1}, "degradation": 1, "degradation_name": "no overlap"}
    assert ": reduced" in note(hurried) and "time budget: level 1 (no overlap)" in note(hurried)
    full = {"status": "ok", "weight_map": {"w>0.5": 0.1}, "adaptive": {"network_gate": 1.0}}
    assert note(full) == "networks blended in (weight > 0.5 on 10% of the stack, factor 1.00)"
    assert qc.networks_acted_fully(note(full)) and not qc.networks_acted_fully(note(reduced))
