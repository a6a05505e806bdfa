"""
The built-in demo, step by step: data, training, map, flight, live node, evaluation.

`run_demo` chains the package's own functions (training.run.train, mapdb.build.build_db,
evaluation.runs) on the Landsat-8 scene (demo.scene) and writes OUT/summary.json;
`print_summary` prints its headline figures. The bag and the live node are in demo.flight.
"""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path
import time
from typing import Dict, List, Optional, Tuple

import numpy as np
from taco_cvgl.demo.flight import (compass, COMPASS_TOPIC, FIX_TOPIC, GEOPOSE_TOPIC,
                                   GT_HEADING_TOPIC, GT_TOPIC, IMAGE_TOPIC, log, run_live,
                                   write_flight_bag)
from taco_cvgl.files.atomic import atomic_path

FOOTPRINT_PX = 96        # map tile ground footprint: 96 px x 30 m = 2.88 km
STRIDE_PX = 48           # database grid stride: 1.44 km
TILE_PX = 256            # map tile image size (local features need the detail)
VIEW_PX = 256            # camera image size
PIXEL_M = 30.0
GSD_M = FOOTPRINT_PX * PIXEL_M / TILE_PX   # ground size of a map-tile pixel
# Training views are turned north-up by their heading, then by at most this much either way:
# the error left by a compass, or by rotation_tta 8 (45 degree steps) without one.
TRAIN_ROTATION_DEG = 22.5
DEMO_TTA = 8                        # rotation_tta of the demo's settings


@dataclasses.dataclass
class DemoOptions:
    """Sizes of the demo; the defaults finish in about ten minutes on a 2-core CPU."""

    out: Path = Path('demo_out')
    weights: Optional[Path] = None       # skip training and use these weights
    backbone: str = 'auto'               # taco-cvgl train --backbone
    backbone_weights: str = 'imagenet'   # taco-cvgl train --backbone-weights
    train_px: Optional[int] = None       # network input (default: 128 pretrained, 64 scratch)
    seed: int = 0
    train_views_per_place: int = 2
    train_epochs: int = 4
    train_minutes: float = 4.0
    flight_frames: int = 100
    calibration_frames: int = 60
    appearance: float = 1.0
    replay_rate: float = 10.0
    region_fraction: float = 1.0         # < 1 keeps the middle rows of each area (quick runs)
    progress: bool = True


def _write_csv(path: Path, rows: List[list]) -> None:
    with atomic_path(path) as tmp, open(tmp, 'w', newline='') as handle:
        writer = csv.writer(handle)
        writer.writerow(['image_path', 'latitude', 'longitude', 'heading'])
        writer.writerows(rows)


def make_training_set(scene, region, out: Path, views_per_place: int, seed: int) -> Path:
    """
    Write training tiles and simulated views of the training region; return the CSV.

    The views are turned north-up by their true heading (`heading.north_up`, as the localizer
    turns a query by its prior), so the CSV gives them heading 0; training adds the turns a
    prior leaves (TRAIN_ROTATION_DEG).
    """
    import cv2
    from taco_cvgl.demo.scene import make_tiles
    from taco_cvgl.demo.views import random_view
    from taco_cvgl.localization.heading import north_up
    csv_path = out / 'train.csv'
    if csv_path.is_file():
        return csv_path
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for i, tile in enumerate(make_tiles(scene, FOOTPRINT_PX, STRIDE_PX, region, out_px=128)):
        name = f'tile_{i:05d}.jpg'
        cv2.imwrite(str(out / name), cv2.cvtColor(tile.image, cv2.COLOR_RGB2BGR))
        rows.append([name, tile.latitude, tile.longitude, 0.0])
        for j in range(views_per_place):
            view = random_view(scene, (tile.col, tile.row), rng, strength=1.0,
                               jitter_px=STRIDE_PX / 4, out_px=128, footprint_px=FOOTPRINT_PX)
            name = f'view_{i:05d}_{j}.jpg'
            image = north_up(view.image, view.heading_deg)
            cv2.imwrite(str(out / name), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
            rows.append([name, view.latitude, view.longitude, 0.0])
    _write_csv(csv_path, rows)
    return csv_path


def training_recipe(options: DemoOptions) -> Dict:
    """
    Return the TrainOptions fields that differ between fine-tuning and training from scratch.

    Pretrained weights: 128 px, the backbone's own ImageNet normalisation, GeM, symmetric
    InfoNCE at tau 0.07, lr 1e-4 (the head 10x, the train command's default) after a short
    warm-up, and BatchNorm statistics frozen (its default too): a plain fine-tune lets small
    aerial batches drag the statistics off ImageNet's and loses the pretrained features (R@1
    44 -> 30 % measured). From scratch: 64 px, per-image standardisation, triplet + InfoNCE at
    lr 1e-3.
    """
    if options.backbone_weights != 'none':
        px = options.train_px or 128
        # A warm-up of half an epoch (35 of the ~90 steps four CPU minutes allow) halved the
        # embedding's Recall@1 on the flight: 0.05 epoch.
        return {'input_size': (px, px), 'normalization': 'imagenet', 'pooling': 'gem',
                'lr': 1e-4, 'warmup_epochs': 0.05, 'triplet_weight': 0.0,
                'infonce_weight': 1.0}
    px = options.train_px or 64
    return {'input_size': (px, px), 'normalization': 'per_image', 'lr': 1e-3,
            'warmup_epochs': 0.5}


def train_weights(train_csv: Path, out: Path, options: DemoOptions) -> Path:
    """Train the demo embedder with the package's own training command; return the weights."""
    from taco_cvgl.training.run import train, TrainOptions
    weights = out / 'weights.safetensors'
    if weights.is_file():
        return weights
    result = train(TrainOptions(
        out_dir=str(out), train_dir=str(train_csv.parent), train_csv=str(train_csv),
        pos_radius_m=STRIDE_PX * PIXEL_M / 2, neg_radius_m=FOOTPRINT_PX * PIXEL_M,
        backbone=options.backbone, backbone_weights=options.backbone_weights,
        rotate=True, rotate_max_deg=TRAIN_ROTATION_DEG, batch_size=32,
        max_epochs=options.train_epochs,
        seed=options.seed, threshold_m=STRIDE_PX * PIXEL_M,
        validate_first=False, progress=options.progress,
        max_minutes=options.train_minutes, **training_recipe(options)))
    return result.weights


def embedder_record(weights: Path) -> Dict:
    """Return which backbone and initial weights made `weights` (from their run.json)."""
    run_file = Path(weights).parent / 'run.json'
    try:
        run = json.loads(run_file.read_text(encoding='utf-8'))
        return {'run': str(run_file), **run['backbone']}
    except (OSError, ValueError, KeyError, TypeError):
        from taco_cvgl.model.embedder import ImageRetrievalModel
        config = ImageRetrievalModel.load(weights, device='cpu', precision='fp32').config
        return {'name': config.backbone, 'initial_weights': 'unknown (weights given)'}


def make_map(scene, region, out: Path, weights: Path, calibration=None,
             unverified: Optional[Dict] = None, info: Optional[Dict] = None) -> Path:
    """
    Cut the region's map tiles, build their database and record its calibration.

    calibration: the error models fitted on another map's flight (fit_map_calibration), with
    unverified its unverified-frame record; the ground scale is this map's tiles', the grid
    spacing measured on its places. info: further meta entries (the calibration's counts).
    """
    from taco_cvgl.mapdb.build import build_db
    from taco_cvgl.demo.scene import make_tiles, write_tiles
    from taco_cvgl.mapdb.database import EmbeddingDatabase
    from taco_cvgl.mapdb.map_calibration import MapCalibration
    db_path = out / 'map.npz'
    if db_path.is_file():
        return db_path
    tiles = make_tiles(scene, FOOTPRINT_PX, STRIDE_PX, region, out_px=TILE_PX)
    csv_path = write_tiles(tiles, out / 'tiles', image_format='jpg')
    build_db(db_path, weights, images=csv_path.parent, csv=csv_path, device='auto',
             progress=False)
    db = EmbeddingDatabase.load(db_path)
    record = dataclasses.replace(calibration or MapCalibration(), gsd_m=GSD_M,
                                 grid_spacing_m=db.calibration.grid_spacing_m)
    record.apply_to(db.meta, unverified=unverified)
    db.meta.update(info or {})
    db.save(db_path)
    return db_path


def demo_settings(weights='', database=''):
    """
    Return the demo's settings (retrieval, verification, motion prior, topics) as NodeParams.

    The node reads them from a params file, the offline evaluation through the same mapping.
    The motion model is the simulated aircraft's: about 50 m/s, gentle turns, and a camera at
    0.2 Hz that may see nothing verifiable (dense forest, haze) for a minute or more. Until the
    first lock (or after losing it) the 20 best retrieved tiles are checked, twice the tracked
    depth, with a stricter inlier bar so that the wider search does not lock onto a wrong
    place; the map is never verified whole, so a frame's cost does not grow with the map.
    """
    from taco_cvgl.localization.settings import NodeParams
    return NodeParams(weights=str(weights), database=str(database),
                      image_topics=(IMAGE_TOPIC,), fix_topic=FIX_TOPIC,
                      geopose_topic=GEOPOSE_TOPIC, qos_reliability='reliable', top_k=10,
                      rerank=True, rerank_candidates=10, rerank_acquisition_candidates=20,
                      rerank_acquisition_min_inliers=20,
                      prior_radius_m=2 * STRIDE_PX * PIXEL_M, prior_candidates=9,
                      prior_max_age_s=120.0, track_speed_sigma_mps=50.0,
                      track_accel_sigma_mps2=1.0, publish_no_fix=True,
                      orientation_topic=COMPASS_TOPIC, orientation_type='imu',
                      rotation_tta=DEMO_TTA)


def demo_localizer_config():
    """Return the LocalizerConfig of `demo_settings()`."""
    from taco_cvgl.localization.settings import localizer_config
    return localizer_config(demo_settings())


def calibrate(localizer, views, priors) -> Tuple:
    """
    Fit the map's error models on a calibration flight (localization.calibrate).

    The verified fixes' covariance (sigma from the verification's inliers, residual and in-tile
    offset, by maximum likelihood) and confidence (P(error within RIGHT_WITHIN_M), logistic),
    each falling back to the single scale / inlier share with too few fixes and saying so in
    its note; and the rate at which the frames no candidate verified were right anyway.
    Returns (MapCalibration, the unverified record or None, the counts for the map's meta).
    """
    from taco_cvgl.localization.calibrate import CalibrationFrame, fit_map_calibration
    from taco_cvgl.mapdb.calibration import MIN_FALLBACK_FIXES
    frames = (CalibrationFrame(view.image, view.stamp_s, prior, view.latitude, view.longitude)
              for view, prior in zip(views, priors))
    calibration, report = fit_map_calibration(localizer, frames)
    if report.fixes < MIN_FALLBACK_FIXES:
        log(f'warning: only {report.fixes} fixes on the calibration flight, too few to '
            f'calibrate: the covariance keeps its uncalibrated scale')
    return calibration, report.unverified, {'calibration_fixes': report.fixes,
                                            'calibration_frames': len(views)}


def middle_rows(region, fraction: float):
    """Return the region keeping only the middle `fraction` of its rows."""
    if fraction >= 1.0:
        return region
    height = region.row1 - region.row0
    cut = height * (1.0 - fraction) / 2.0
    return dataclasses.replace(region, row0=region.row0 + cut, row1=region.row1 - cut)


def map_background(scene, region):
    """Return the scene cut to a region, with its (west, east, south, north) extent in degrees."""
    from taco_cvgl.evaluation.plots import MapBackground
    c0, r0 = max(0, int(region.col0 + 0.5)), max(0, int(region.row0 + 0.5))
    c1, r1 = min(scene.width, int(region.col1 + 0.5)), min(scene.height, int(region.row1 + 0.5))
    # Pixel edges (not centres) bound the picture; the UTM grid is ~1 degree off north here.
    lat, lon = scene.pixel_to_latlon(np.array([c0 - 0.5, c1 - 0.5]),
                                     np.array([r1 - 0.5, r0 - 0.5]))
    return MapBackground(scene.rgb[r0:r1, c0:c1],
                         (float(lon[0]), float(lon[1]), float(lat[0]), float(lat[1])))


def run_demo(options: DemoOptions) -> Dict:
    """Run every step; return the metrics of the live run and of the offline evaluation."""
    from taco_cvgl.evaluation.runs import evaluate_bag, evaluate_recorded
    from taco_cvgl.demo.scene import load_scene, split_regions
    from taco_cvgl.demo.views import simulate_flight
    from taco_cvgl.localization.localizer import CVGLLocalizer
    out = options.out
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    log('1/6 data: loading the Landsat-8 scene (fetched and cached by make setup)')
    scene = load_scene()
    train_region, eval_region = (middle_rows(r, options.region_fraction)
                                 for r in split_regions(scene, 0.6, gap_px=FOOTPRINT_PX))
    if options.weights is None:
        log('2/6 train: tiles and simulated views of the training (west) area')
        train_csv = make_training_set(scene, train_region, out / 'train_data',
                                      options.train_views_per_place, options.seed)
        log(f'2/6 train: training the embedder for up to {options.train_minutes:g} min '
            f'(--backbone {options.backbone}, --backbone-weights {options.backbone_weights})')
        weights = train_weights(train_csv, out / 'train', options)
    else:
        weights = Path(options.weights)
    embedder = embedder_record(weights)
    log(f'2/6 train: embedder {embedder["name"]} from {initial_weights_text(embedder)}')
    log('3/6 map: calibrating the covariance on a flight over the training area')
    rng = np.random.default_rng(options.seed + 1)
    calib_db = make_map(scene, train_region, out / 'calibration_map', weights)
    calib_views = simulate_flight(scene, train_region, options.calibration_frames, rng,
                                  strength=options.appearance, out_px=VIEW_PX)
    localizer = CVGLLocalizer.from_files(weights, calib_db, config=demo_localizer_config())
    calibration, unverified, counts = calibrate(localizer, calib_views,
                                                compass(calib_views, options.seed + 3))
    model = calibration.covariance_model
    log(f'3/6 map: verified-fix covariance model '
        f'{"uncalibrated" if model is None else model.kind} ({counts["calibration_fixes"]} '
        f'fixes); building the evaluation (east) map')
    db = make_map(scene, eval_region, out / 'map', weights, calibration, unverified, counts)
    log('4/6 flight: simulating the camera over the evaluation area')
    views = simulate_flight(scene, eval_region, options.flight_frames,
                            np.random.default_rng(options.seed + 2),
                            strength=options.appearance, out_px=VIEW_PX)
    flight_bag = write_flight_bag(views, out / 'flight', seed=options.seed + 4)
    log('5/6 live: node process + bag replay + recording')
    # Absolute paths: the params file is also for taco-cvgl evaluate --params-file run from
    # elsewhere.
    live_bag = run_live(out, demo_settings(Path(weights).resolve(), Path(db).resolve()),
                        flight_bag, options.replay_rate)
    log('6/6 evaluate: the recorded bag, then the flight offline')
    threshold = STRIDE_PX * PIXEL_M
    background = map_background(scene, eval_region)
    live = evaluate_recorded(live_bag, FIX_TOPIC, GT_TOPIC, out / 'eval_live',
                             gt_bag=flight_bag, image_topic=IMAGE_TOPIC,
                             gt_heading_topic=GT_HEADING_TOPIC, threshold_m=threshold,
                             db=db, background=background, progress=options.progress)
    offline, no_compass = (evaluate_bag(
        flight_bag, IMAGE_TOPIC, GT_TOPIC, db, weights, out / folder,
        gt_heading_topic=GT_HEADING_TOPIC, threshold_m=threshold,
        config=demo_localizer_config(), background=background, progress=options.progress,
        orientation_topic=topic) for folder, topic in (('eval_offline', COMPASS_TOPIC),
                                                       ('eval_offline_no_compass', None)))
    summary = {'live': live.metrics, 'offline': offline.metrics,
               'offline_no_compass': no_compass.metrics, 'embedder': embedder,
               'weights': str(weights), 'database': str(db),
               'flight_bag': str(flight_bag), 'live_bag': str(live_bag),
               'minutes': (time.monotonic() - started) / 60}
    with open(out / 'summary.json', 'w') as handle:
        json.dump(summary, handle, indent=2, default=str)
    return summary


def print_summary(summary: Dict, out: Path) -> None:
    """Print the headline figures and where the pictures are."""
    def pct(value):
        return '  n/a' if value is None else f'{100 * value:5.1f} %'
    live, offline = summary['live'], summary['offline']
    print()
    print(f'taco_cvgl demo finished in {summary["minutes"]:.1f} min (outputs in {out})')
    print('  (Landsat-8, one date; simulated downward camera; see README for limits)')
    embedder = summary.get('embedder', {})
    print(f'  embedder: {embedder.get("name")} from {initial_weights_text(embedder)}')
    runs = [('live node (recorded bag), with the compass', live),
            ('offline (same localizer), with the compass', offline),
            (f'offline without the compass (rotation_tta {DEMO_TTA})',
             summary.get('offline_no_compass'))]
    for name, m in runs:
        if m is None:
            continue
        recall = m['recall'].get('at_1') if m['recall'].get('available') else None
        alone = m.get('recall_retrieval_only', {})
        alone = alone.get('at_1') if alone.get('available') else None
        fixes, cal = m['fixes'], m['calibration']
        error = m['position_error_m']['fixes'].get('median')
        print(f'  {name}:')
        print(f'    Recall@1 within one grid stride {pct(recall)}   fixes published '
              f'{pct(fixes.get("share"))}   precision of fixes {pct(fixes.get("precision"))}')
        if alone is not None:
            print(f'    Recall@1 of the image embedding alone (no verification, no motion '
                  f'prior) {pct(alone)}')
        auc = m.get('confidence', {}).get('auc_pr')
        print(f'    median error of fixes {"n/a" if error is None else f"{error:.0f} m"}   '
              f'1/2/3-sigma ellipses hold {pct(cal.get("within_1sigma"))} / '
              f'{pct(cal.get("within_2sigma"))} / {pct(cal.get("within_3sigma"))}   '
              f'confidence AUC-PR {"n/a" if auc is None else f"{auc:.3f}"}')
    print(f'  pictures: {out}/eval_offline/*.png, {out}/eval_offline_no_compass/*.png and '
          f'{out}/eval_live/*.png')


def initial_weights_text(embedder: Dict) -> str:
    """Say where an embedder's initial weights came from, for the log and the summary."""
    source = embedder.get('initial_weights')
    if source == 'none':
        return 'random initial weights (trained from scratch)'
    where = embedder.get('initial_weights_file')
    return f'{source} initial weights' + (f' ({where})' if where else '')
