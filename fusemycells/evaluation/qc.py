"""Quality-control figure: max-intensity projections of input, prediction and ground truth.

One block per case: a title line (file name, channel, N-SSIM of the prediction and of the
Gaussian baseline), then an XY row (max over Z) and an XZ row (max over Y), columns input |
prediction | ground truth, optionally prediction − ground truth. Every panel of a case shares one
intensity scale: each volume is first mapped as the challenge metric maps it (its own 2nd / 99.8th
percentiles → 0 / 1, see :mod:`fusemycells.evaluation.metrics`), so the panels show what SSIM compares.
Panels are drawn in µm (XZ with its true aspect, plane 0 at the top: z runs down) with a scale bar.
The words are for microscopists: the colour bars name their units, the title says what N-SSIM's 0 and 1 mean,
and a line under it says whether the networks acted on the case, from the inference run's report
(:func:`networks_note`).

Rendered with matplotlib's Agg canvas (no display, no pyplot state), an optional dependency of the
evaluation tool only (``pip install -r requirements-eval.txt``), never of the inference image.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fusemycells.evaluation.metrics import METRIC_PERCENTILES, CaseScore

DPI = 100
PANEL_W = 300  # px, width of one image panel
LABEL_W = 60  # px, left column with the row labels
CBAR_W = 90  # px, colour bar with its tick labels and title
HEADER_H = 64  # px, above each case: title line and column titles
ROW_GAP = 12  # px between the XY and the XZ row
CASE_GAP = 24  # px below each case
ROW_MIN, ROW_MAX = 40, 2 * PANEL_W  # px, clamp of a row's height (very flat or very deep stacks)
COLUMNS = ("input", "prediction", "ground truth")
INSTALL_HINT = "the QC figure needs matplotlib: pip install -r requirements-eval.txt"
INTENSITY_LABEL = "normalised intensity: 2nd–99.8th percentile → 0–1"
DIFFERENCE_LABEL = "prediction − ground truth (normalised intensity, ±)"
N_SSIM_MEANING = "N-SSIM: 0 = no better than the input, 1 = equal to the fused ground truth, < 0 = worse than the input"
Z_DIRECTION = "z ↓ (plane 0 at top)"
NO_REPORT = "networks: not known for this case (no run report: evaluate --report FILE of the inference run)"
NOT_IN_REPORT = "networks: not known for this case (not in the run report given)"
ALERT_COLOUR = "firebrick"  # the networks note when the networks were off or reduced, or it is not known


def require_matplotlib() -> None:
    """Raise ImportError with the install command when matplotlib is missing (checked before scoring)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise ImportError(INSTALL_HINT) from exc


@dataclass(frozen=True)
class Projections:
    """XY (max over Z, shape Y'×X') and XZ (max over Y, shape Z'×X') projections of a ZYX volume,
    in metric units (the volume's 2 / 99.8 % percentiles → 0 / 1); ``pixel_um``: (z, y, x) µm per
    projection pixel after block-max shrinking."""

    xy: np.ndarray
    xz: np.ndarray
    pixel_um: tuple[float, float, float]

    @property
    def extent_um(self) -> tuple[float, float, float]:
        """(Z, Y, X) size of the projected volume in µm."""
        return (
            self.xz.shape[0] * self.pixel_um[0],
            self.xy.shape[0] * self.pixel_um[1],
            self.xy.shape[1] * self.pixel_um[2],
        )


@dataclass(frozen=True)
class CaseViews:
    """What the figure shows of one case: its scores and the projections of each column."""

    score: CaseScore
    views: tuple[Projections, Projections, Projections]  # input, prediction, ground truth
    networks: str = NO_REPORT  # whether the networks acted (:func:`networks_note` of the run report's entry)


def networks_note(entry: Mapping[str, Any] | None) -> str:
    """In words, whether the networks acted on a case, from its entry in the inference run's JSON report
    (``--report``; keys ``status``, ``weight_map``, ``trust``, ``adaptive``, ``degradation``): off (and why),
    blended in (reduced by a trust factor or gate below 1, or by the time budget), or not known (None)."""
    if entry is None:
        return NO_REPORT
    status = entry.get("status", "ok")
    if status != "ok":
        return f"networks off: {status} output (the normalised input, no network)"
    trust = entry.get("trust") or {}
    level = int(entry.get("degradation", 0) or 0)
    degraded = f"; time budget: level {level} ({entry.get('degradation_name', '')})" if level else ""
    weight = entry.get("weight_map") or {}
    gate = float((entry.get("adaptive") or {}).get("network_gate", 1.0))
    if not weight:
        if trust:
            why = trust.get("why") or f"trust factor {float(trust.get('factor', 0.0)):.2f}"
        elif gate == 0.0:
            why = "the input's noise gates them off"
        elif level >= 3:
            why = "no time left for them"
        else:
            why = "the channel's calibrated trust keeps them off"
        return f"networks off: {why}{degraded}"
    factor = float(trust.get("factor", gate))
    reduced = ": reduced" if factor < 1.0 or level else ""
    share = float(weight.get("w>0.5", 0.0))
    return f"networks blended in (weight > 0.5 on {share:.0%} of the stack, factor {factor:.2f}{reduced}){degraded}"


def networks_acted_fully(note: str) -> bool:
    """Whether a :func:`networks_note` says the networks acted in full (drawn in black; else in red)."""
    return note.startswith("networks blended in") and ": reduced" not in note


def block_max(image: np.ndarray, stride: tuple[int, int]) -> np.ndarray:
    """Shrink a 2D image by integer strides, each output pixel the maximum of its block (edge blocks
    may be partial), so that small bright objects survive the shrinking of a projection."""
    sy, sx = stride
    if sy == sx == 1:
        return image
    h, w = -(-image.shape[0] // sy), -(-image.shape[1] // sx)
    padded = np.full((h * sy, w * sx), image.min(), dtype=image.dtype)
    padded[: image.shape[0], : image.shape[1]] = image
    return padded.reshape(h, sy, w, sx).max(axis=(1, 3))


def projections(volume: np.ndarray, spacing: Sequence[float], max_size: int = 384) -> Projections:
    """Max-intensity projections of a ZYX ``volume`` (``spacing`` (z, y, x) µm) in metric units.

    The percentiles are those of the whole volume (the max projection commutes with that increasing
    affine map). Y and X share one stride, Z its own, so that no side exceeds ``max_size`` pixels.
    """
    data = np.asarray(volume)
    lo, hi = (float(v) for v in np.percentile(data, METRIC_PERCENTILES))
    scale = 1.0 / (hi - lo) if hi > lo else 1.0  # a flat histogram is only shifted, like the metric
    s_yx = max(1, -(-max(data.shape[1], data.shape[2]) // max_size))
    s_z = max(1, -(-data.shape[0] // max_size))
    xy = block_max(data.max(axis=0), (s_yx, s_yx))
    xz = block_max(data.max(axis=1), (s_z, s_yx))

    def to_metric(image: np.ndarray) -> np.ndarray:
        return (image.astype(np.float32) - np.float32(lo)) * np.float32(scale)

    pixel = (float(spacing[0]) * s_z, float(spacing[1]) * s_yx, float(spacing[2]) * s_yx)
    return Projections(xy=to_metric(xy), xz=to_metric(xz), pixel_um=pixel)


def display_range(panels: Sequence[np.ndarray], percentile: float = 99.5) -> tuple[float, float]:
    """One (vmin, vmax) for all panels of a case: 0 (each volume's 2nd percentile) to the given
    percentile of all their pixels pooled."""
    pooled = np.concatenate([np.ravel(p) for p in panels])
    top = float(np.percentile(pooled, percentile))
    return 0.0, top if top > 1e-6 else 1.0


def difference_range(panels: Sequence[np.ndarray], percentile: float = 99.5) -> float:
    """Symmetric colour limit for difference panels: the percentile of |difference| pooled."""
    pooled = np.abs(np.concatenate([np.ravel(p) for p in panels]))
    top = float(np.percentile(pooled, percentile))
    return top if top > 1e-6 else 1.0


def scale_bar_um(width_um: float) -> float:
    """A round length (1, 2 or 5 × 10^k µm) of at most a fifth of the panel width."""
    target = width_um / 5.0
    if target <= 0:
        return 1.0
    power = 10.0 ** math.floor(math.log10(target))
    return max(m * power for m in (1.0, 2.0, 5.0) if m * power <= target)


def row_heights(extent_um: tuple[float, float, float]) -> tuple[int, int]:
    """Pixel heights of the XY and XZ rows for a panel PANEL_W wide, true aspect, clamped."""
    z_um, y_um, x_um = extent_um

    def clamp(h: float) -> int:
        return int(min(ROW_MAX, max(ROW_MIN, round(h))))

    return clamp(PANEL_W * y_um / x_um), clamp(PANEL_W * z_um / x_um)


def figure_size(extents: Sequence[tuple[float, float, float]], diff: bool) -> tuple[int, int]:
    """(width, height) in pixels of the figure for cases of the given (Z, Y, X) µm extents."""
    width = LABEL_W + len(COLUMNS) * PANEL_W + CBAR_W + ((PANEL_W + CBAR_W) if diff else 0)
    height = sum(HEADER_H + sum(row_heights(e)) + ROW_GAP + CASE_GAP for e in extents)
    return width, height


def case_title(score: CaseScore) -> str:
    """The title line of one case."""
    return (
        f"{score.name}  ·  {score.channel}  ·  N-SSIM: prediction {score.n_ssim:+.3f}, "
        f"Gaussian baseline {score.n_ssim_gaussian:+.3f} (input = 0)"
    )


@dataclass(frozen=True)
class _Page:
    """The figure being drawn and its size in pixels (for :meth:`rect`)."""

    fig: Any
    width: int
    height: int

    def rect(self, x: float, y_top: float, w: float, h: float) -> list[float]:
        """Figure-fraction rectangle from pixels measured from the top-left corner."""
        return [x / self.width, 1.0 - (y_top + h) / self.height, w / self.width, h / self.height]


@dataclass(frozen=True)
class _Shading:
    """One case's display ranges: the grey panels' (vmin, vmax) and the difference panels' (±limit)."""

    vmin: float
    vmax: float
    differences: tuple[np.ndarray, np.ndarray] | None  # prediction − ground truth (XY, XZ), when drawn
    limit: float


def write_figure(path: Path, cases: Sequence[CaseViews], diff: bool = False) -> tuple[int, int]:
    """Render the QC figure of ``cases`` (:func:`draw_figure`) to the PNG ``path``; returns its (width, height)
    in pixels."""
    fig, size = draw_figure(cases, diff)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, facecolor="white")
    return size


def draw_figure(cases: Sequence[CaseViews], diff: bool = False) -> tuple[Any, tuple[int, int]]:
    """The QC figure of ``cases`` (a matplotlib ``Figure`` on the Agg canvas) and its (width, height) in pixels.

    Layout in pixels from :func:`figure_size` (cases top to bottom); ``diff`` adds a prediction −
    ground truth column (of the projections shown, in metric units) with its own colour bar.
    """
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not cases:
        raise ValueError("no cases to draw")
    extents = [c.views[2].extent_um for c in cases]
    width, height = figure_size(extents, diff)
    # + 0.5 px: the Agg canvas truncates width·dpi to an integer
    fig = Figure(figsize=((width + 0.5) / DPI, (height + 0.5) / DPI), dpi=DPI, facecolor="white")
    FigureCanvasAgg(fig)
    page = _Page(fig, width, height)
    top = 0
    for case, extent in zip(cases, extents):
        top = _draw_case(page, case, extent, top, diff)
    return fig, (width, height)


def _draw_case(page: _Page, case: CaseViews, extent: tuple[float, float, float], top: int, diff: bool) -> int:
    """Draw one case (title, XY and XZ rows) from ``top`` px down; returns where the next case starts."""
    xy_h, xz_h = row_heights(extent)
    fig, width, height = page.fig, page.width, page.height
    _draw_header(page, case, top)
    vmin, vmax = display_range([p for v in case.views for p in (v.xy, v.xz)])
    gt = case.views[2]
    differences = (case.views[1].xy - gt.xy, case.views[1].xz - gt.xz) if diff else None
    dlim = difference_range(differences) if differences is not None else 1.0
    shading = _Shading(vmin, vmax, differences, dlim)
    titles = [*COLUMNS, "prediction − ground truth"] if diff else list(COLUMNS)
    rows = (("XY", "max over Z", xy_h, "xy"), ("XZ", "max over Y", xz_h, "xz"))
    y = top + HEADER_H
    for r, (name, how, row_h, attr) in enumerate(rows):
        label_x, label_y = (LABEL_W / 2) / width, 1.0 - (y + row_h / 2) / height
        fig.text(label_x, label_y, f"{name}\n({how})", ha="center", va="center", rotation=90, fontsize=9)
        for c, title in enumerate(titles):
            x = LABEL_W + c * PANEL_W + (CBAR_W if c == len(COLUMNS) else 0)
            ax = fig.add_axes(page.rect(x + 4, y, PANEL_W - 8, row_h))
            mapped = _draw_panel(ax, case, r, c, attr, shading)
            if r == 0:
                ax.set_title(title, fontsize=9, pad=3)
            if r == 0 and c in (len(COLUMNS) - 1, len(COLUMNS)):
                cax = fig.add_axes(page.rect(x + PANEL_W + 6, y, 10, xy_h + ROW_GAP + xz_h))
                cb = fig.colorbar(mapped, cax=cax)
                cb.ax.tick_params(labelsize=7)
                cb.set_label(INTENSITY_LABEL if c < len(COLUMNS) else DIFFERENCE_LABEL, fontsize=7)
        y += row_h + ROW_GAP
    return top + HEADER_H + xy_h + ROW_GAP + xz_h + CASE_GAP


def _draw_header(page: _Page, case: CaseViews, top: int) -> None:
    """A case's three header lines from ``top`` px down: its title with the scores (bold), what N-SSIM's values
    mean, and whether the networks acted (red when they were off or reduced, or when it is not known)."""
    x = LABEL_W / page.width
    page.fig.text(x, 1.0 - (top + 6) / page.height, case_title(case.score), ha="left", va="top", fontsize=10,
                  fontweight="bold")  # fmt: skip
    page.fig.text(x, 1.0 - (top + 22) / page.height, N_SSIM_MEANING, ha="left", va="top", fontsize=8)
    colour = "black" if networks_acted_fully(case.networks) else ALERT_COLOUR
    page.fig.text(x, 1.0 - (top + 34) / page.height, case.networks, ha="left", va="top", fontsize=8, color=colour)


def _draw_panel(ax: Any, case: CaseViews, r: int, c: int, attr: str, shading: _Shading) -> Any:
    """Draw one panel (row ``r``: XY or XZ; column ``c``: input, prediction, ground truth, difference) in
    µm extents, with a scale bar in the first column; returns the image for a colour bar."""
    from matplotlib.font_manager import FontProperties
    from mpl_toolkits.axes_grid1.anchored_artists import AnchoredSizeBar

    if c < len(COLUMNS):
        image, kw = getattr(case.views[c], attr), {"cmap": "gray", "vmin": shading.vmin, "vmax": shading.vmax}
    else:
        assert shading.differences is not None
        image, kw = shading.differences[r], {"cmap": "RdBu_r", "vmin": -shading.limit, "vmax": shading.limit}
    z_um, y_um, x_um = case.views[min(c, 2)].extent_um
    mapped = ax.imshow(image, extent=(0, x_um, y_um if attr == "xy" else z_um, 0), **kw)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    if c == 0:
        bar = scale_bar_um(x_um)
        font = FontProperties(size=8)
        size_bar = AnchoredSizeBar(
            ax.transData, bar, f"{bar:g} µm", "lower right", pad=0.3, color="yellow", frameon=False,
            size_vertical=max(x_um, 1e-9) / 150, fontproperties=font,
        )
        ax.add_artist(size_bar)
        if attr == "xz":  # imshow's origin is the top left: plane 0 is the top row, z grows downwards
            ax.text(0.02, 0.96, Z_DIRECTION, transform=ax.transAxes, ha="left", va="top", fontsize=7, color="yellow")
    return mapped
