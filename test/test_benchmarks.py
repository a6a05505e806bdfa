"""
The benchmark scripts in benchmarks/, run as a source checkout runs them, and their move out.

benchmarks/bench.py is imported by path (its folder on sys.path, as `python benchmarks/bench.py`
puts it there) where a test needs its result in this process, and run as a subprocess where the
test is about the script itself. The robot package installs none of it.
"""

import importlib
import importlib.util
import json
from pathlib import Path
import socket
import subprocess
import sys

import pytest
from taco_cvgl.cli import main as cli
from taco_cvgl.model.config import ModelConfig
from taco_cvgl.model.embedder import ImageRetrievalModel
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / 'benchmarks'
CUDA = torch.cuda.is_available()
# A 512-dimensional embedding (ModelConfig's default) stored as fp16: 2 bytes per dimension.
FP16_BYTES = 2 * 512


@pytest.fixture(scope='module')
def bench():
    """Import benchmarks/bench.py with its folder on sys.path, as the script runs."""
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(BENCHMARKS))
        yield importlib.import_module('bench')


def test_bench_quick_writes_json_naming_the_machine(bench, tmp_path, capsys):
    out = tmp_path / 'bench.json'
    assert bench.main(['--quick', '--sizes', '64', '--parts', 'storage,gpu_latency,multi_camera',
                       '--out', str(out)]) == 0
    data = json.loads(out.read_text())
    assert data['schema'] == 'taco_cvgl.bench/1' and data['quick'] is True
    assert data['parts'] == ['storage', 'gpu_latency', 'multi_camera'] and data['sizes'] == [64]
    machine = data['machine']
    for key in ('hostname', 'cpu', 'cpu_cores', 'torch', 'gpu', 'load_average'):
        assert key in machine
    storage = data['figures']['storage']
    assert ModelConfig().embedding_dim * 2 == FP16_BYTES
    assert storage['fp16_embedding_bytes_per_entry'] == FP16_BYTES
    assert 0 < storage['exact_recall_at_1'] <= 1
    option = storage['options']['pq128x4fs']
    # 128 sub-vectors of 4 bits each: 64 bytes per entry.
    assert option['code_bytes'] == 128 * 4 // 8 and 0 < option['recall_at_1_vs_exact'] <= 1.05
    if not CUDA:
        assert 'no CUDA device' in data['figures']['gpu_latency']['skipped']
        assert 'no CUDA device' in data['figures']['multi_camera']['skipped']
    names = {row['name'] for row in data['targets']}
    assert 'storage per image, fp16' in names and 'compressed storage' in names
    printed = capsys.readouterr().out
    assert '== storage' in printed and '== targets' in printed

    assert bench.main(['--report', str(out)]) == 0
    report = capsys.readouterr().out
    assert report.startswith(f'Machine: {socket.gethostname()}, ')
    assert f'| storage per image, fp16 | <= 1024 B | {FP16_BYTES} (whole .npz file' in report


def test_bench_storage_with_weights_measures_the_demo_scene(bench, tmp_path):
    torch.manual_seed(0)
    weights = tmp_path / 'w.safetensors'
    ImageRetrievalModel(ModelConfig(input_size=(32, 32))).save(weights)
    out = tmp_path / 'bench.json'
    assert bench.main(['--quick', '--parts', 'storage', '--weights', str(weights),
                       '--out', str(out)]) == 0
    storage = json.loads(out.read_text())['figures']['storage']
    assert 'demo scene embedded by w.safetensors (32 px)' in storage['data']
    assert storage['entries'] > 3000 and storage['queries'] == 300
    # Even random weights find re-viewed places far above chance (1 place in thousands).
    assert 0.05 < storage['exact_recall_at_1'] <= storage['exact_recall_at_10'] <= 1
    option = storage['options']['pq128x4fs']
    assert option['recall_at_1'] <= option['recall_at_10'] <= option['recall_at_50']


def test_bench_script_refuses_an_unknown_part_in_one_line(tmp_path):
    out = tmp_path / 'x.json'
    run = subprocess.run([sys.executable, 'benchmarks/bench.py', '--parts', 'cpu,warp_drive',
                          '--out', str(out)], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 2, run.stderr
    assert 'Traceback' not in run.stderr
    assert run.stderr.splitlines()[-1].startswith(
        "taco-cvgl: error: unknown bench part 'warp_drive'")
    assert not out.exists()


def test_taco_cvgl_bench_says_where_it_went(capsys):
    assert cli.main(['bench', '--quick']) == 2
    captured = capsys.readouterr()
    assert captured.err == ('taco-cvgl: bench moved: run python benchmarks/bench.py from a '
                            'source checkout\n')
    assert captured.out == ''
    assert 'bench' not in cli.COMMANDS and ' bench ' not in cli.usage()


def test_the_package_installs_no_benchmark(monkeypatch):
    assert importlib.util.find_spec('taco_cvgl.cli.bench') is None
    import setuptools  # noqa: F401 - provides distutils where Python no longer has it
    from distutils.core import run_setup
    monkeypatch.chdir(ROOT)  # setup.py globs its data files relative to the checkout
    dist = run_setup(str(ROOT / 'setup.py'), stop_after='init')
    installed = list(dist.packages or []) + list(dist.py_modules or [])
    installed += [f for _, files in dist.data_files or [] for f in files]
    installed += [f for files in (dist.package_data or {}).values() for f in files]
    assert 'taco_cvgl' in dist.packages and 'examples/build_and_query.py' in installed
    assert not [name for name in installed if 'bench' in name], installed


@pytest.mark.integration
def test_map_scaling_quick_on_a_small_map(small_map, tmp_path):
    out = tmp_path / 'map_scaling.json'
    run = subprocess.run([sys.executable, 'benchmarks/map_scaling.py', '--quick',
                          '--weights', str(small_map.weights), '--database', str(small_map.db),
                          '--images', str(small_map.images_dir), '--json', str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data['schema'] == 'taco_cvgl.map_scaling/1' and data['real_entries'] == 8
    # 4 of the 8 place images evenly spread (0, 7/3, 14/3, 7 rounded): one warm-up, 3 timed.
    assert Path(data['warm_up_frame']).name == 'place_00.png'
    assert [Path(f).name for f in data['frames']] == ['place_02.png', 'place_05.png',
                                                      'place_07.png']
    # Quick: the real map and twice its size; the first verified whole with one frame.
    assert [(r['entries'], r['mode'], r['frames']) for r in data['runs']] == [
        (8, 'retrieval', 3), (8, 'whole map', 1), (16, 'retrieval', 3)]
    for run_ in data['runs']:
        # Each frame is a map image itself: found and verified on its own place.
        assert run_['fixes'] == run_['frames'] and run_['fixes_on_distractors'] == 0
        assert run_['memory']['embedding_bytes'] == FP16_BYTES
        assert 0 < run_['embed']['p50'] <= run_['total']['p50']
    assert data['runs'][0]['distractors_checked_per_frame'] == 0
    assert data['target']['smallest'] == 8 and data['target']['largest'] == 16
