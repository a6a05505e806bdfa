"""Database building over several processes (Lightning DDP, gloo on CPU) against one process."""

import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
from taco_cvgl.cli.build_db import build_db, main
from taco_cvgl.errors import InputError
from taco_cvgl.mapdb.database import EmbeddingDatabase
import torch


def taco(*args):
    return subprocess.run([sys.executable, '-m', 'taco_cvgl.cli.main', *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def single_process(small_map, out, csv=None, skip_bad=False):
    return build_db(out, small_map.weights, small_map.images_dir, csv or small_map.csv,
                    device='cpu', precision='fp32', dtype='fp32', skip_bad=skip_bad,
                    progress=False)


def assert_same_database(got, want):
    assert list(got.image_ids) == list(want.image_ids)   # same entries, same order
    for column in ('latitude', 'longitude', 'altitude', 'heading'):
        np.testing.assert_array_equal(getattr(got, column), getattr(want, column))
    np.testing.assert_allclose(got.embeddings.astype(np.float32), want.embeddings,
                               rtol=0, atol=1e-5)
    assert got.model_fingerprint == want.model_fingerprint
    assert got.model_config == want.model_config
    assert {k: v for k, v in got.meta.items() if k != 'created'} == \
        {k: v for k, v in want.meta.items() if k != 'created'}


@pytest.mark.integration
def test_two_process_ddp_build_equals_the_single_process_build(small_map, tmp_path):
    want = single_process(small_map, tmp_path / 'single.npz')
    out = tmp_path / 'maps' / 'map.npz'
    start = time.perf_counter()
    run = taco('build-db', '--images', small_map.images_dir, '--csv', small_map.csv,
               '--out', out, '--weights', small_map.weights, '--devices', 2,
               '--accelerator', 'cpu', '--strategy', 'ddp', '--dtype', 'fp32')
    seconds = time.perf_counter() - start
    assert run.returncode == 0, run.stderr
    assert 'Starting with 2 processes' in run.stdout + run.stderr   # really two ranks
    assert run.stdout.count('wrote ') == 1 and f'wrote {out}: 8 images' in run.stdout
    assert_same_database(EmbeddingDatabase.load(out), want)
    # The shards are removed; the map's verification features are written beside it.
    assert sorted(p.name for p in out.parent.iterdir()) == ['map.features.npz', 'map.npz']
    print(f'2-process CPU DDP build of 8 images: {seconds:.1f} s')


@pytest.mark.integration
def test_spawned_build_refuses_or_skips_unreadable_images_as_one_process_does(
        small_map, tmp_path, capsys):
    broken = tmp_path / 'broken.jpg'
    broken.write_bytes(b'\xff\xd8\xff\xe0 not a jpeg')
    rows = small_map.csv.read_text().splitlines()
    rows.insert(4, f'{broken},45.0,7.0,0')
    csv = tmp_path / 'with_broken.csv'
    csv.write_text('\n'.join(rows) + '\n')
    out = tmp_path / 'map.npz'
    shutil.copy(small_map.db, out)
    before = out.read_bytes()
    spawned = {'devices': 2, 'accelerator': 'cpu', 'strategy': 'ddp_spawn', 'workers': 0,
               'progress': False, 'dtype': 'fp32'}
    with pytest.raises(InputError, match='broken.jpg'):
        build_db(out, small_map.weights, small_map.images_dir, csv, **spawned)
    assert out.read_bytes() == before                               # previous database kept
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ['broken.jpg', 'with_broken.csv', 'map.npz'])               # no shard left behind
    capsys.readouterr()
    db = build_db(out, small_map.weights, small_map.images_dir, csv, skip_bad=True, **spawned)
    assert capsys.readouterr().err.count(f'skipping {broken}:') == 1
    want = single_process(small_map, tmp_path / 'single.npz', csv, skip_bad=True)
    assert db.meta['skipped'] == 1 and len(db) == 8
    assert_same_database(db, want)
    assert_same_database(EmbeddingDatabase.load(out), want)


@pytest.mark.parametrize('options, message', [
    (['--devices', '0'], '--devices must be a whole number of 1 or more, got 0'),
    (['--devices', '2', '--num-nodes', '0'], '--num-nodes must be a whole number'),
    (['--devices', '2', '--device', 'cuda', '--accelerator', 'cpu'],
     '--device cuda contradicts --accelerator cpu'),
    (['--devices', '2', '--accelerator', 'cpu', '--precision', 'fp16'],
     'fp16 autocast is for CUDA'),
    (['--devices', '9', '--accelerator', 'cpu'], '9 processes for 8 images'),
    pytest.param(['--devices', '2', '--accelerator', 'gpu'], 'CUDA is not available',
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason='CUDA is here')),
])
def test_bad_process_options_are_one_line_errors(small_map, tmp_path, capsys, options,
                                                 message):
    out = tmp_path / 'map.npz'
    code = main(['--images', str(small_map.images_dir), '--csv', str(small_map.csv), '--out',
                 str(out), '--weights', str(small_map.weights), '--no-progress', *options])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith('taco-cvgl: error: ') and message in err
    assert len(err.strip().splitlines()) == 1
    assert not out.exists()
