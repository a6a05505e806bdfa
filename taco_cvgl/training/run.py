"""
A whole training run (`train`): data, Lightning module and trainer, checkpoints, export.

A run directory OUT holds: run.json (the options), train_triplets.csv (when generated from GPS),
mined_triplets.csv (after hard-negative re-mining), checkpoints/best.ckpt and last.ckpt,
tb/ (TensorBoard) and weights.safetensors (fp16, what `build-db` and the node load); with
simulate_views, map_views/ (simulated camera views of the map's tiles, see
taco_cvgl.training.map_views). The options and their config file are in training.options.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple
import warnings

from taco_cvgl.errors import InputError, MismatchError
from taco_cvgl.files.atomic import atomic_path
from taco_cvgl.training.options import (backbone_record, check_options, hardware,
                                        is_global_zero, load_config_file, MAP_VIEWS,
                                        model_config, RUN_FILE, TrainOptions, WEIGHTS_NAME)

__all__ = ['load_config_file', 'train', 'TrainOptions', 'TrainResult']

# What Lightning restores a run from, beyond the model: a weights-only file cannot resume.
RESUME_STATE = {'optimizer_states': list, 'lr_schedulers': list, 'loops': dict}


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
    if not is_global_zero():     # the first process makes them; the others wait and read
        _wait_for(folder / VIEWS_CSV)
    # Each view lies within pos_radius_m of its tile, so that the pair is a positive.
    recipe = ViewRecipe(per_tile=opts.simulate_views, seed=opts.seed,
                        max_jitter_m=opts.pos_radius_m / 2.0)
    if opts.map_geotiff:
        made = geotiff_map_views(opts.map_geotiff, folder, recipe, opts.map_tile_m,
                                 opts.map_stride_m, max(opts.input_size), opts.map_bands,
                                 opts.resume or not is_global_zero())
    else:
        made = tile_map_views(opts.train_csv, opts.train_dir, folder, recipe, opts.map_gsd_m,
                              opts.resume or not is_global_zero())
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
    accelerator, devices, precision = hardware(opts)
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
    opts = check_options(options)
    import lightning as L
    from taco_cvgl.training.data import (Augmentation, RetrievalDataModule, TripletDataset,
                                         write_triplets)
    from taco_cvgl.training.module import FitStart, HardNegativeMiner

    out, zero, backbone = Path(opts.out_dir), is_global_zero(), backbone_record(opts)
    config = model_config(opts, backbone['name'])
    hardware(opts)
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
