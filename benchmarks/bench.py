#!/usr/bin/env python3
"""
Measure taco_cvgl's fast paths side by side with the plain eager fp32 baseline.

From a source checkout, with taco_cvgl importable (`make setup`):
    python benchmarks/bench.py                      # every part; GPU parts skip without CUDA
    python benchmarks/bench.py --quick              # fewer repetitions
    python benchmarks/bench.py --parts cpu --threads 1 --out cpu.json
    python benchmarks/bench.py --report cpu.json    # markdown tables of a saved result

Every figure is measured in the same run as its baseline, printed with the ratio, and written to a
JSON file (schema taco_cvgl.bench/1) that names the machine (CPU, cores, GPU, library versions,
load average). Parts that need a GPU are skipped, with the reason, on a machine without one;
`benchmarks/gpu_all.sh` runs every GPU part on a GPU machine.

Parts (--parts takes names or the groups cpu, gpu, all):
  cpu_latency        per-frame latency (one 640x480 frame -> embedding) per CPU backend and input
                     size, with each backend's accuracy against eager fp32 (min cosine over the
                     test images, identical top-1 retrieval)
  cpu_pipeline       a bgr8 640x480 image message -> Measurement (-> NavSatFix where the ROS
                     message packages are installed), eager vs the fast path
  cpu_database_build JPEG files -> embeddings, images/s
  storage            bytes per database entry (fp16, the .npz file, PQ codes) and the PQ options'
                     Recall@1 relative to exact search on a synthetic retrieval set or, with
                     --weights, on the demo scene embedded by those weights
  cpu_search         top-10 over N entries: exact (torch) vs approximate (faiss IVF-PQ)
  cpu_training       training step images/s: fp32 vs bf16 autocast + channels_last
  onnx               ONNX export time and its embeddings against the model
  gpu_latency        per-frame latency on the GPU: eager fp32, eager fp16, CUDA graphs, compile
  gpu_pipeline       image message -> Measurement on the GPU: p50/p99 latency, frames/s
  multi_camera       4 cameras at 30 Hz into the node's newest-frame-per-camera batching
  gpu_database_build JPEG files -> embeddings: CPU decode + eager fp32 vs nvJPEG + fp16 batches
  gpu_search         exact fp16 top-10 over 1M (and 10M) entries on the GPU
  gpu_training       training images/s at 224 px: fp32 vs bf16 autocast + channels_last
The cpu_ and gpu_ part of a name share a file: bench_latency.py, bench_pipeline.py,
bench_database_build.py, bench_search.py, bench_training.py; storage, onnx and multi_camera have
bench_storage.py, bench_onnx.py and bench_multi_camera.py. bench_common.py holds what the parts
share, bench_report.py the targets and the markdown tables.

The model is ConvNeXt-Tiny + head with random weights (seed 0, every block's layer scale set to
0.3 so that all blocks count) unless --weights names trained ones: speed does not depend on the
weights; the accuracy checks are, if anything, stricter with random weights, whose embeddings
lie closer together than a trained model's.
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path
import sys
import time
import traceback
from typing import List, Optional, Sequence

import bench_common
from bench_common import BENCH_LAYER_SCALE, BenchOptions, load_average, SCHEMA
import bench_database_build
import bench_latency
import bench_multi_camera
import bench_onnx
import bench_pipeline
from bench_report import markdown_report, print_targets, targets
import bench_search
import bench_storage
import bench_training
from taco_cvgl.cli.common import reports_errors
from taco_cvgl.errors import InputError
import torch

# part -> (the file that measures and prints it, the keywords of its measure(options, ...)).
# A part measured with gpu=True is skipped without CUDA; multi_camera decides for itself.
PARTS = {
    'cpu_latency': (bench_latency, {'gpu': False}),
    'cpu_pipeline': (bench_pipeline, {'gpu': False}),
    'cpu_database_build': (bench_database_build, {'gpu': False}),
    'storage': (bench_storage, {}),
    'cpu_search': (bench_search, {'gpu': False}),
    'cpu_training': (bench_training, {'gpu': False}),
    'onnx': (bench_onnx, {}),
    'gpu_latency': (bench_latency, {'gpu': True}),
    'gpu_pipeline': (bench_pipeline, {'gpu': True}),
    'multi_camera': (bench_multi_camera, {}),
    'gpu_database_build': (bench_database_build, {'gpu': True}),
    'gpu_search': (bench_search, {'gpu': True}),
    'gpu_training': (bench_training, {'gpu': True}),
}
GPU_PARTS = ('gpu_latency', 'gpu_pipeline', 'multi_camera', 'gpu_database_build',
             'gpu_search', 'gpu_training')
CPU_PARTS = tuple(name for name in PARTS if name not in GPU_PARTS)


def run_part(name: str, options: BenchOptions) -> dict:
    """Run one part, catching its failure (so one part never costs the others)."""
    module, keywords = PARTS[name]
    if keywords.get('gpu'):
        reason = bench_common.gpu_reason()
        if reason:
            return {'skipped': reason}
    start = time.perf_counter()
    load = load_average()
    try:
        result = module.measure(options, **keywords)
    except Exception as exc:  # noqa: B902 - report and go on with the next part
        traceback.print_exc(file=sys.stderr)
        result = {'error': f'{exc.__class__.__name__}: {exc}'}
    result['seconds'] = round(time.perf_counter() - start, 1)
    result.setdefault('load_average_start', load)
    return result


def print_part(name: str, result: dict) -> None:
    """Print one part's figures as a short table."""
    print(f'\n== {name} ({result.get("seconds")} s)', flush=True)
    if 'skipped' in result:
        print(f"   skipped: {result['skipped']}")
    elif 'error' in result:
        print(f"   error: {result['error']}")
    else:
        PARTS[name][0].print_result(result)


def parse_parts(text: str) -> List[str]:
    """Expand 'all', 'cpu', 'gpu' and comma lists into part names (checked)."""
    names: List[str] = []
    for item in (t.strip() for t in text.split(',') if t.strip()):
        group = {'all': tuple(PARTS), 'cpu': CPU_PARTS, 'gpu': GPU_PARTS}.get(item)
        for name in group or (item,):
            if name not in PARTS:
                raise InputError(f'unknown bench part {name!r}; parts are {", ".join(PARTS)} '
                                 f'or the groups all, cpu, gpu')
            if name not in names:
                names.append(name)
    return names


def bench(parts: Sequence[str], options: BenchOptions, out: Optional[Path] = None) -> dict:
    """Run the parts, print each and return the whole result (rewriting `out` after each)."""
    result = {'schema': SCHEMA, 'created': datetime.datetime.now(
        datetime.timezone.utc).isoformat(timespec='seconds'),
        'machine': bench_common.machine_info(), 'quick': bool(options.quick),
        'sizes': list(options.sizes),
        'weights': str(options.weights) if options.weights else
        f'random (seed 0, layer scale {BENCH_LAYER_SCALE})',
        'parts': list(parts), 'figures': {}}
    m = result['machine']
    print(f"bench on {m['hostname']}: {m['cpu']} ({m['cpu_cores']} cores, "
          f"{m['torch_threads']} torch threads), GPU {m['gpu'] or 'none'}, torch {m['torch']}; "
          f"load {m['load_average']}", flush=True)
    for name in parts:
        result['figures'][name] = run_part(name, options)
        print_part(name, result['figures'][name])
        if out:
            result['targets'] = targets(result['figures'])
            bench_common.write_json(out, result)  # partial results survive a later crash
    result['targets'] = targets(result['figures'])
    result['machine']['load_average_end'] = load_average()
    print_targets(result['targets'])
    return result


def parse_sizes(text: Optional[str], quick: bool) -> tuple:
    """Return the --sizes as a tuple of px (default 224,320; quick: 224), checked."""
    try:
        sizes = tuple(int(s) for s in (text or ('224' if quick else '224,320')).split(',')
                      if s.strip())
    except ValueError:
        raise InputError(f'--sizes must be comma-separated integers, got {text!r}') from None
    if not sizes or min(sizes) < 32:
        raise InputError('--sizes must name at least one input size >= 32 px')
    return sizes


def print_report(path: Path) -> None:
    """Print the markdown tables of a saved result file."""
    try:
        print(markdown_report(json.loads(path.read_text())), end='')
    except (OSError, ValueError, KeyError) as exc:
        raise InputError(f'{path} is not a readable bench result: {exc}') from None


@reports_errors
def main(argv: Optional[list] = None) -> int:
    """Parse arguments, run the bench, write the JSON."""
    parser = argparse.ArgumentParser(prog='benchmarks/bench.py', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--quick', action='store_true',
                        help='fewer repetitions and smaller sizes (about a minute on 2 cores)')
    parser.add_argument('--out', type=Path, default=Path('taco_cvgl_bench.json'),
                        help='JSON result file (default: taco_cvgl_bench.json)')
    parser.add_argument('--parts', default='all',
                        help=f'comma list of parts or groups all, cpu, gpu (parts: '
                             f'{", ".join(PARTS)})')
    parser.add_argument('--sizes', default=None,
                        help='input sizes in px for the latency parts (default 224,320; '
                             'quick: 224); the first also serves the other parts')
    parser.add_argument('--weights', type=Path, default=None,
                        help='trained weights for the accuracy checks (default: random)')
    parser.add_argument('--compile', action='store_true',
                        help='also time torch.compile on the CPU (minutes of compiling there)')
    parser.add_argument('--no-compile', action='store_true',
                        help='skip torch.compile variants on the GPU')
    parser.add_argument('--threads', type=int, default=None,
                        help="torch and ONNX Runtime CPU threads (default: torch's choice); 1 "
                             'gives steadier figures on a machine busy with other work')
    parser.add_argument('--multi-camera-on-cpu', action='store_true',
                        help='run the 4-camera simulation on the CPU too (it drops frames)')
    parser.add_argument('--cache-dir', type=Path, default=None,
                        help='where ONNX exports are cached (default: $TACO_CVGL_CACHE or '
                             '~/.cache/taco_cvgl)')
    parser.add_argument('--report', type=Path, default=None,
                        help='print markdown tables of a saved result file and exit (no '
                             'measuring)')
    args = parser.parse_args(argv)
    if args.report is not None:
        print_report(args.report)
        return 0
    options = BenchOptions(quick=args.quick, sizes=parse_sizes(args.sizes, args.quick),
                           weights=args.weights, compile_on_cpu=args.compile,
                           compile_on_gpu=not args.no_compile,
                           multi_camera_on_cpu=args.multi_camera_on_cpu,
                           cache_dir=args.cache_dir)
    if args.weights is not None and not args.weights.is_file():
        raise InputError(f'weights file not found: {args.weights}')
    if args.threads:
        torch.set_num_threads(int(args.threads))
    parts = parse_parts(args.parts)
    result = bench(parts, options, args.out)
    bench_common.write_json(args.out, result)
    print(f'\nwrote {args.out}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
