"""
The evaluation's pictures, drawn with matplotlib's Agg canvas (no display, no pyplot state).

Every function writes one PNG atomically (temporary file, then rename) and returns its path.
Positions are WGS84 degrees and drawn as longitude (x) / latitude (y) with the aspect that makes
a metre east as long as a metre north at the plot's mean latitude.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
from taco_cvgl.errors import InputError
from taco_cvgl.files.atomic import atomic_path

HIT_COLOUR = '#1a9641'
MISS_COLOUR = '#d7191c'
UNKNOWN_COLOUR = '#7f7f7f'
DPI = 110


@dataclasses.dataclass
class MapBackground:
    """An image drawn under the track: RGB uint8 array, (west, east, south, north) in degrees."""

    image: np.ndarray
    extent: Tuple[float, float, float, float]


@dataclasses.dataclass
class Candidate:
    """One retrieved database entry of the retrieval grid."""

    image: Union[np.ndarray, str, Path, None]  # RGB array, an image file, or None (not found)
    label: str
    hit: Optional[bool]                        # within the threshold of the truth; None: unknown


@dataclasses.dataclass
class GridRow:
    """One query of the retrieval grid and its best retrieved entries."""

    query: np.ndarray
    label: str
    candidates: List[Candidate]


def _figure(width_in: float, height_in: float):
    """Return a matplotlib Figure attached to an Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(width_in, height_in), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path) -> Path:
    """Write the figure as PNG to path atomically."""
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format='png', dpi=DPI)
    except OSError as err:
        raise InputError(f'cannot write plot {path}: {err}') from None
    return path


def _equal_metres(ax, lat_values) -> None:
    """Make one degree of longitude as long as it is on the ground at the mean latitude."""
    lat = np.asarray(lat_values, dtype=float)
    lat = lat[np.isfinite(lat)]
    mean = float(lat.mean()) if len(lat) else 0.0
    ax.set_aspect(1.0 / max(math.cos(math.radians(mean)), 1e-3), adjustable='datalim')


def track_plot(path, truth_lat, truth_lon, est_lat, est_lon, fix, error_m,
               threshold_m: float, db_lat=None, db_lon=None,
               background: Optional[MapBackground] = None, title: str = '') -> Path:
    """
    Draw the true track, the estimates coloured by error (fixes filled) and the map places.

    Estimates without a fix are hollow markers, each joined to its true point by a thin line;
    arrays may hold NaN (frames without truth or without an estimate are left out). Fixes are
    coloured green (no error) through yellow to red at 4 x threshold and beyond.
    """
    from matplotlib import colors
    truth_lat, truth_lon, est_lat, est_lon, error_m = (
        np.asarray(v, dtype=float).reshape(-1)
        for v in (truth_lat, truth_lon, est_lat, est_lon, error_m))
    fix = np.asarray(fix, dtype=bool).reshape(-1)
    fig = _figure(8.0, 7.0)
    ax = fig.add_subplot(1, 1, 1)
    if background is not None:
        west, east, south, north = background.extent
        ax.imshow(background.image, extent=(west, east, south, north), origin='upper',
                  alpha=0.8, zorder=0)
    if db_lat is not None and db_lon is not None and len(db_lat):
        size = float(np.clip(2000.0 / len(db_lat), 2.0, 25.0))  # fainter as the map grows
        ax.scatter(db_lon, db_lat, s=size, c='#9e9e9e', alpha=0.4, linewidths=0, zorder=1,
                   label=f'map places ({len(db_lat)})')
    known = np.isfinite(truth_lat) & np.isfinite(truth_lon)
    ax.plot(truth_lon[known], truth_lat[known], '.-', color='black', lw=1.0, ms=3, zorder=2,
            label='true track')
    shown = np.isfinite(est_lat) & np.isfinite(est_lon) & np.isfinite(error_m) & known
    if shown.any():
        ax.plot(np.stack([truth_lon[shown], est_lon[shown]]),
                np.stack([truth_lat[shown], est_lat[shown]]), '-', color='#636363', lw=0.5,
                alpha=0.6, zorder=2)
    norm = colors.Normalize(vmin=0.0, vmax=4.0 * threshold_m)
    scatter = None
    pick = shown & fix
    if pick.any():
        scatter = ax.scatter(est_lon[pick], est_lat[pick], c=error_m[pick], cmap='RdYlGn_r',
                             norm=norm, s=26, edgecolors='black', linewidths=0.4, zorder=4,
                             label='fixes')
    pick = shown & ~fix
    if pick.any():
        ax.scatter(est_lon[pick], est_lat[pick], s=22, facecolors='none', edgecolors='#1f78b4',
                   linewidths=0.8, zorder=3, label='no fix')
    if scatter is not None:
        fig.colorbar(scatter, ax=ax, shrink=0.8, extend='max',
                     label=f'position error of fixes (m; {threshold_m:g} m threshold)')
    _equal_metres(ax, np.concatenate([truth_lat[known], est_lat[shown]]))
    ax.set_xlabel('longitude (deg)')
    ax.set_ylabel('latitude (deg)')
    ax.set_title(title or 'estimated vs true track')
    ax.legend(loc='best', fontsize=8)
    ax.grid(True, alpha=0.3)
    ax.ticklabel_format(useOffset=False)
    fig.tight_layout()
    return _save(fig, path)


def error_along_track_plot(path, time_s, error_m, fix, threshold_m: float,
                           title: str = '') -> Path:
    """Draw the position error over time (s from the first frame), fixes and no-fix apart."""
    time_s, error_m = (np.asarray(v, dtype=float).reshape(-1) for v in (time_s, error_m))
    fix = np.asarray(fix, dtype=bool).reshape(-1)
    fig = _figure(9.0, 4.0)
    ax = fig.add_subplot(1, 1, 1)
    shown = np.isfinite(time_s) & np.isfinite(error_m)
    order = np.argsort(time_s[shown])
    ax.plot(time_s[shown][order], error_m[shown][order], '-', color='#bdbdbd', lw=0.8, zorder=1)
    for is_fix, style in ((True, {'marker': 'o', 'color': '#2c7bb6', 'label': 'fix'}),
                          (False, {'marker': 'x', 'color': '#d95f02', 'label': 'no fix'})):
        pick = shown & (fix == is_fix)
        if pick.any():
            ax.scatter(time_s[pick], error_m[pick], s=14, zorder=2, **style)
    ax.axhline(threshold_m, color=MISS_COLOUR, ls='--', lw=1, label=f'{threshold_m:g} m')
    unscored = np.isfinite(time_s) & ~np.isfinite(error_m)
    if unscored.any():
        ax.scatter(time_s[unscored], np.zeros(int(unscored.sum())), marker='|', s=60,
                   color=UNKNOWN_COLOUR, zorder=2, clip_on=False,
                   label='no ground truth / no estimate')
    if shown.any() and np.nanmax(error_m[shown]) > 20 * threshold_m:
        ax.set_yscale('symlog', linthresh=threshold_m)
    ax.set_ylim(bottom=0.0)
    ax.set_xlabel('time since the first frame (s)')
    ax.set_ylabel('position error (m)')
    ax.set_title(title or 'position error along the track')
    ax.grid(True, alpha=0.3)
    ax.legend(loc='best', fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def error_cdf_plot(path, errors: Sequence[Tuple[str, np.ndarray]], threshold_m: float,
                   title: str = '') -> Path:
    """Draw the cumulative distribution of position errors, one curve per (label, errors)."""
    fig = _figure(6.5, 4.5)
    ax = fig.add_subplot(1, 1, 1)
    largest = threshold_m
    for label, values in errors:
        values = np.sort(np.asarray(values, dtype=float)[np.isfinite(values)])
        if not len(values):
            continue
        share = np.arange(1, len(values) + 1) / len(values)
        ax.step(values, share, where='post', label=f'{label} (n={len(values)})')
        largest = max(largest, float(values[-1]))
    ax.axvline(threshold_m, color=MISS_COLOUR, ls='--', lw=1, label=f'{threshold_m:g} m')
    if largest > 50 * threshold_m:
        ax.set_xscale('symlog', linthresh=threshold_m)
    ax.set_xlim(left=0.0)
    ax.set_ylim(0.0, 1.02)
    ax.set_xlabel('position error (m)')
    ax.set_ylabel('share of frames with error <= x')
    ax.set_title(title or 'position error CDF')
    ax.grid(True, alpha=0.3)
    ax.legend(loc='lower right', fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def _load_candidate(image) -> Optional[np.ndarray]:
    """Return a candidate's RGB image, or None when its file is missing or unreadable."""
    if image is None or isinstance(image, np.ndarray):
        return image
    from taco_cvgl.files.image_codec import load_image_file
    try:
        return thumbnail(load_image_file(image))
    except InputError:
        return None


def _frame(ax, colour: str) -> None:
    """Give an image axis a thick coloured frame and no ticks."""
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_edgecolor(colour)
        spine.set_linewidth(4)


def retrieval_grid_plot(path, rows: Sequence[GridRow], title: str = '') -> Path:
    """
    Draw each query beside its retrieved entries, framed green (hit) or red (miss).

    Database images are loaded from their files when they exist; a missing one is drawn as an
    empty grey tile that says so.
    """
    if not rows:
        raise InputError('the retrieval grid needs at least one query')
    columns = 1 + max(len(r.candidates) for r in rows)
    fig = _figure(2.4 * columns, 2.2 * len(rows) + 0.4)
    for r, row in enumerate(rows):
        ax = fig.add_subplot(len(rows), columns, r * columns + 1)
        ax.imshow(row.query)
        _frame(ax, 'black')
        ax.set_title(row.label, fontsize=7)
        for c, cand in enumerate(row.candidates):
            ax = fig.add_subplot(len(rows), columns, r * columns + 2 + c)
            image = _load_candidate(cand.image)
            if image is None:
                ax.imshow(np.full((3, 4, 3), 200, np.uint8))
                ax.text(0.5, 0.5, 'image file\nnot found', ha='center', va='center',
                        transform=ax.transAxes, fontsize=7)
            else:
                ax.imshow(image)
            colour = UNKNOWN_COLOUR if cand.hit is None else (
                HIT_COLOUR if cand.hit else MISS_COLOUR)
            _frame(ax, colour)
            ax.set_title(cand.label, fontsize=7, color=colour)
    fig.suptitle(title or 'query | top retrieved database images (green: within threshold)',
                 fontsize=9)
    # Fixed margins: tight_layout over many image axes costs seconds and gains nothing here.
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=1.0 - 0.5 / fig.get_figheight(),
                        wspace=0.05, hspace=0.25)
    return _save(fig, path)


def thumbnail(rgb: np.ndarray, width: int = 256) -> np.ndarray:
    """Return a copy of an RGB image scaled down to at most `width` pixels wide."""
    import cv2
    h, w = rgb.shape[:2]
    if w <= width:
        return np.ascontiguousarray(rgb).copy()
    height = max(1, int(round(h * width / w)))
    return cv2.resize(rgb, (width, height), interpolation=cv2.INTER_AREA)
