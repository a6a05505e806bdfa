"""
What `taco-cvgl evaluate` writes and prints: frames.csv, the pictures, metrics.json, a summary.

`write_outputs` writes frames.csv and the pictures first and metrics.json last (each atomically),
so a folder with a metrics.json holds a finished result; `format_summary` is the table the
command prints.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np
from taco_cvgl.errors import InputError
from taco_cvgl.evaluation.scoring import FrameResult, FrameTable
from taco_cvgl.files.atomic import atomic_path
from taco_cvgl.geo.geodesy import distance_m

GRID_CANDIDATES = 3          # retrieved entries shown per query in the retrieval grid


@dataclasses.dataclass
class EvaluationResult:
    """What an evaluation computed and wrote: the metrics.json content and each file's path."""

    metrics: Dict[str, Any]
    paths: Dict[str, Path]

    @property
    def complete(self) -> bool:
        """Return whether every frame of the bag was scored or knowingly left out."""
        return bool(self.metrics.get('complete'))

    def exit_status(self) -> int:
        """Return the command's exit status: 0 complete (or max_frames), 1 not, 130 Ctrl-C."""
        stopped = self.metrics.get('stopped') or ''
        if stopped.startswith('interrupted'):
            return 130
        if self.complete or stopped.startswith('stopped after max_frames'):
            return 0
        return 1


def grid_picks(count: int, rows: int) -> set:
    """Return frame indices spread over the bag whose thumbnails are kept for the grid."""
    if rows <= 0 or count <= 0:
        return set()
    return {int(i) for i in np.linspace(0, count - 1, min(count, 3 * rows)).round()}


def grid_rows_of(frames: Sequence[FrameResult], thumbs: Dict[int, np.ndarray],
                 table: FrameTable, threshold_m: float, rows: int) -> list:
    """Return the retrieval grid's rows: kept thumbnails of scored frames, spread over the bag."""
    from taco_cvgl.evaluation.plots import Candidate, GridRow
    chosen = [f for f in frames if f.index in thumbs and table.scored[f.index]
              and len(f.retrieved)]
    if len(chosen) > rows:
        chosen = [chosen[int(i)] for i in np.linspace(0, len(chosen) - 1, rows).round()]
    grid = []
    for f in chosen:
        shown = f.retrieved[:GRID_CANDIDATES]
        dist = distance_m(f.truth_lat, f.truth_lon, shown[:, 0], shown[:, 1])
        candidates = [Candidate(image=f.retrieved_ids[r] if os.path.isfile(f.retrieved_ids[r])
                                else None,
                                label=f'top-{r + 1}: {dist[r]:.0f} m from truth',
                                hit=bool(dist[r] <= threshold_m)) for r in range(len(shown))]
        state = 'fix' if f.fix else 'no fix'
        label = (f'{Path(f.image).name} (top-1 {table.error_m[f.index]:.0f} m away)' if f.image
                 else f'frame {f.index} ({state}, error {table.error_m[f.index]:.0f} m)')
        grid.append(GridRow(query=thumbs[f.index], label=label, candidates=candidates))
    return grid


def _atomic_text(path: Path, text: str) -> Path:
    """Write text to path through a temporary file and a rename."""
    try:
        with atomic_path(path) as tmp, open(tmp, 'w', encoding='utf-8', newline='') as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as err:
        raise InputError(f'cannot write {path}: {err}') from None
    return path


def _json_safe(value):
    """Return value with NaN/inf as None and numpy scalars as Python numbers (strict JSON)."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value


def _frames_csv(frames: Sequence[FrameResult], table: FrameTable) -> str:
    """Return one CSV row per frame (NaN fields left empty)."""
    def num(value, digits=3):
        return '' if value is None or not math.isfinite(value) else f'{value:.{digits}f}'

    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(['index', 'stamp_ns', 'status', 'truth_lat', 'truth_lon', 'est_lat',
                     'est_lon', 'fix', 'error_m', 'mahalanobis', 'heading_error_deg',
                     'first_hit_rank', 'retrieval_first_hit_rank', 'confidence',
                     'latency_s', 'top1_id', 'failure', 'image'])
    for i, f in enumerate(frames):
        status = ('failed' if f.failure else 'scored' if table.scored[i]
                  else 'no_ground_truth')
        rank = int(table.first_hit_rank[i])
        retrieval_rank = int(table.retrieval_first_hit_rank[i])
        writer.writerow([f.index, f.stamp_ns, status, num(f.truth_lat, 8), num(f.truth_lon, 8),
                         num(f.est_lat, 8), num(f.est_lon, 8), int(f.fix),
                         num(table.error_m[i], 2), num(table.mahalanobis[i]),
                         num(table.heading_error_deg[i], 2),
                         rank if rank >= 0 and len(f.retrieved) else '',
                         retrieval_rank if retrieval_rank >= 0 and len(f.retrieval_only)
                         else '',
                         num(f.confidence), num(f.latency_s, 4),
                         f.retrieved_ids[0] if f.retrieved_ids else '', f.failure or '',
                         f.image])
    return out.getvalue()


def write_outputs(out: Path, metrics: Dict[str, Any], frames: Sequence[FrameResult],
                  table: FrameTable, threshold_m: float, places, background,
                  grid: list, draw: bool = True,
                  written: Optional[Dict[str, Path]] = None) -> Dict[str, Path]:
    """
    Write frames.csv, the plots (when draw) and last metrics.json; return their paths.

    written: files the caller already wrote into `out`, listed in metrics.json's outputs too.
    """
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InputError(f'cannot create output folder {out}: {err}') from None
    paths: Dict[str, Path] = {
        **(written or {}),
        'frames_csv': _atomic_text(out / 'frames.csv', _frames_csv(frames, table))}
    if draw:
        paths.update(_draw(out, metrics['mode'], frames, table, threshold_m, places,
                           background, grid))
    metrics['outputs'] = {name: p.name for name, p in paths.items()}
    metrics['outputs']['metrics'] = 'metrics.json'
    text = json.dumps(_json_safe(metrics), indent=2, allow_nan=False) + '\n'
    paths['metrics'] = _atomic_text(out / 'metrics.json', text)
    return paths


def _draw(out: Path, mode: str, frames: Sequence[FrameResult], table: FrameTable,
          threshold_m: float, places, background, grid: list) -> Dict[str, Path]:
    """Draw the track, error-along-track, error CDF and retrieval grid pictures into `out`."""
    from taco_cvgl.evaluation import plots
    paths: Dict[str, Path] = {}

    def column(name):
        return np.array([getattr(f, name) for f in frames], dtype=float)

    truth_lat, truth_lon = column('truth_lat'), column('truth_lon')
    stamps = np.array([f.stamp_ns for f in frames], dtype=np.int64)
    time_s = (stamps - stamps.min()) * 1e-9 if len(stamps) else np.zeros(0)
    db_lat, db_lon = places if places is not None else (None, None)
    scored, fixes = table.scored, table.scored & table.fix
    est_lat = np.where(scored, column('est_lat'), np.nan)
    if mode != 'retrieval':     # a dataset's queries are no track in time
        paths['track_plot'] = plots.track_plot(
            out / 'track.png', truth_lat, truth_lon, est_lat, column('est_lon'), table.fix,
            table.error_m, threshold_m, db_lat, db_lon, background)
        paths['error_along_track_plot'] = plots.error_along_track_plot(
            out / 'error_along_track.png', time_s, table.error_m, table.fix, threshold_m)
    curves = [('all frames', table.error_m[scored]), ('fixes', table.error_m[fixes])]
    if mode == 'recorded':
        curves = curves[1:]  # every recorded estimate is a fix
    elif mode == 'retrieval':
        curves = [('top-1 database image', table.error_m[scored])]
    paths['error_cdf_plot'] = plots.error_cdf_plot(out / 'error_cdf.png', curves, threshold_m)
    if grid:
        paths['retrieval_grid_plot'] = plots.retrieval_grid_plot(
            out / 'retrieval_grid.png', grid,
            f'query | top-{GRID_CANDIDATES} retrieved (green: within {threshold_m:g} m of the '
            f'truth, red: beyond)')
    return paths


def _fmt(value, unit: str = '', digits: int = 1, percent: bool = False) -> str:
    """Return a number for the summary table ('n/a' for None)."""
    if value is None:
        return 'n/a'
    if percent:
        return f'{100.0 * value:.{digits}f} %'
    return f'{value:.{digits}f}{unit}'


def _recall_row(name: str, recall: Dict[str, Any]) -> Tuple[str, str]:
    """Return the summary row of a Recall@k block, for the k it holds."""
    if not recall['available']:
        return f'{name}@k', 'not available'
    ks = [key[3:] for key in recall if key.startswith('at_')]
    return (f'{name}@{"/".join(ks)} ({recall["threshold_m"]:g} m)',
            ' / '.join(_fmt(recall[f'at_{k}'], percent=True) for k in ks))


def format_summary(metrics: Dict[str, Any]) -> str:
    """Return a short human-readable table of the metrics."""
    frames, recall = metrics['frames'], metrics['recall']
    err_all, err_fix = metrics['position_error_m']['all'], metrics['position_error_m']['fixes']
    fixes, cal = metrics['fixes'], metrics['calibration']
    head, lat = metrics['heading_error_deg'], metrics['latency_s']
    state = 'complete' if metrics['complete'] else f'INCOMPLETE ({metrics.get("stopped") or ""}'\
        f'{", " if metrics.get("stopped") else ""}{frames.get("failed", 0)} failed frame(s))'
    rows = [('result', state),
            ('frames', f'{frames["scored"]} scored / {frames["total"]} '
                       f'({frames["no_ground_truth"]} without ground truth)')]
    if 'without_positive' in frames:
        rows.append(('queries apart', f'{frames["without_positive"]} without a database image '
                                      f'within {metrics["threshold_m"]:g} m'))
    rows.append(_recall_row('Recall', recall))
    if 'recall_all_queries' in metrics:
        rows.append(_recall_row('over all queries', metrics['recall_all_queries']))
    for name, stats in (('error, all (m)', err_all), ('error, fixes (m)', err_fix)):
        rows.append((name, f'median {_fmt(stats["median"])}  p90 {_fmt(stats["p90"])}  '
                           f'max {_fmt(stats["max"])}  (n={stats["count"]})'))
    rows.append(('fixes', 'not available' if fixes.get('unavailable') else
                 f'{fixes["count"]}, share {_fmt(fixes["share"], percent=True)}, '
                 f'precision {_fmt(fixes["precision"], percent=True)} '
                 f'(<= {fixes["threshold_m"]:g} m)'))
    if fixes.get('no_fix_reasons'):
        rows.append(('no fix', ', '.join(f'{n} {reason}'
                                         for reason, n in fixes['no_fix_reasons'].items())))
    checked = metrics.get('verification') or {}
    if checked.get('frames'):
        rows.append(('verified per frame', f'mean {_fmt(checked["candidates_per_frame_mean"])}  '
                                           f'max {checked["candidates_per_frame_max"]} places'))
    rows.append(('inside 1 / 2 sigma', f'{_fmt(cal["within_1sigma"], percent=True)} / '
                                       f'{_fmt(cal["within_2sigma"], percent=True)} (Gaussian '
                                       f'39.3 / 86.5 %), scale for 95 % in 2 sigma '
                                       f'{_fmt(cal["scale_for_95pct_within_2sigma"], digits=2)}'))
    rows.append(('heading error (deg)', f'median {_fmt(head.get("median"))}  p90 '
                                        f'{_fmt(head.get("p90"))}' if head['available']
                 else 'not available'))
    rows.append(('latency (ms)', f'median {_fmt(lat["median"] * 1e3)}  p90 '
                                 f'{_fmt(lat["p90"] * 1e3)}' if lat['available']
                 else 'not available'))
    width = max(len(name) for name, _ in rows)
    lines = [f'{name:<{width}}  {value}' for name, value in rows]
    lines += [f'warning: {w}' for w in metrics.get('warnings', [])]
    return '\n'.join(lines)


def load_background(image: Optional[Path], extent: Optional[Sequence[float]]):
    """Return the plots.MapBackground of --map-image/--map-extent, or None."""
    if image is None and extent is None:
        return None
    if image is None or extent is None:
        raise InputError('--map-image and --map-extent go together')
    from taco_cvgl.evaluation.plots import MapBackground
    from taco_cvgl.files.image_codec import load_image_file
    west, east, south, north = extent
    if not (west < east and south < north):
        raise InputError(f'--map-extent must be WEST EAST SOUTH NORTH with WEST < EAST and '
                         f'SOUTH < NORTH, got {extent}')
    return MapBackground(load_image_file(image), (west, east, south, north))
