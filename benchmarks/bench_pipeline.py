"""
Parts cpu_pipeline and gpu_pipeline: an image message -> Measurement (-> NavSatFix), per frame.

A bgr8 640x480 sensor_msgs/Image (a duck-typed stand-in where the ROS message packages are not
installed) goes through decoding, the embedding, an exact search over a synthetic map and the
pose estimate, as in the node; the NavSatFix is built where the ROS messages are importable.
Eager fp32 against the fast path: p50/p99 latency, frames/s and each stage's p50. Run by
bench.py; the multi_camera part reuses the message and localizer helpers.
"""

from __future__ import annotations

import gc
from pathlib import Path
import tempfile
import types

from bench_common import (bench_model, BenchOptions, fast_cpu_precision, fmt, FRAME_SHAPE,
                          interleaved, load_average, PlainEager, ratio, reset_compiled,
                          runtime_copy, summarize, synthetic_database, TestImages, time_calls)
import numpy as np
import torch


def image_message(rgb: np.ndarray):
    """Return a sensor_msgs/Image-like object (bgr8) of an RGB frame: ROS message if available."""
    from taco_cvgl.files.image_codec import encode_raw
    encoding, height, width, step, data = encode_raw(rgb, 'bgr8')
    try:
        from sensor_msgs.msg import Image
        msg = Image()
        msg.encoding, msg.height, msg.width, msg.step = encoding, height, width, step
        msg.data = data
        return msg, 'sensor_msgs/msg/Image'
    except ImportError:
        fields = {'encoding': encoding, 'height': height, 'width': width, 'step': step,
                  'data': data, 'is_bigendian': 0}
        return types.SimpleNamespace(**fields), 'duck-typed Image (no ROS message packages)'


def navsat_builder():
    """Return (function Measurement -> NavSatFix, description); a no-op without ROS."""
    try:
        from builtin_interfaces.msg import Time
        from taco_cvgl.ros.messages import navsat_fix
    except ImportError as exc:
        return (lambda m: None), f'skipped: ROS message packages not importable ({exc.name})'
    stamp = Time()
    return (lambda m: navsat_fix(m, stamp, 'camera')), 'sensor_msgs/msg/NavSatFix built'


def make_localizer(model, encoder, db_path: Path, index: str = 'exact'):
    """
    Return a CVGLLocalizer over db_path whose inference goes through `encoder`.

    The localizer calls model.encode_batch; a fast Embedder offers the same call, so it stands
    in for the model (the product wires it through ImageRetrievalModel.to_runtime).
    """
    from taco_cvgl.localization.localizer import CVGLLocalizer, LocalizerConfig
    localizer = CVGLLocalizer(model, LocalizerConfig(top_k=10, index=index))
    localizer.model = encoder
    localizer.load_map(db_path)
    return localizer


def measure(options: BenchOptions, gpu: bool) -> dict:
    """Time image message -> Measurement (-> NavSatFix): p50/p99 latency, eager vs fast."""
    from taco_cvgl.files.image_codec import decode_msg
    from taco_cvgl.inference.registry import make_embedder
    device = 'cuda' if gpu else 'cpu'
    size = options.sizes[0]
    n_frames = (50 if options.quick else 300) if gpu else (5 if options.quick else 20)
    entries = (100_000 if options.quick else 1_000_000) if gpu else 10_000
    model = bench_model(size, options.weights)
    images = TestImages(places=4, queries=0)
    messages = [image_message(im)[0] for im in images.database]
    msg_kind = image_message(images.database[0])[1]
    to_fix, fix_kind = navsat_builder()
    out = {'device': device, 'input_size': size, 'database_entries': entries,
           'message': f'{msg_kind} bgr8 {FRAME_SHAPE[1]}x{FRAME_SHAPE[0]}', 'output': fix_kind,
           'index': 'exact (torch)', 'variants': {}}
    with tempfile.TemporaryDirectory() as tmp:
        db_path = Path(tmp) / 'db.npz'
        synthetic_database(model, entries).save(db_path)
        variants = [('eager_fp32', lambda: PlainEager(model, device))]
        if gpu:
            variants.append(('eager_fp16', lambda: runtime_copy(model, device, 'fp16')))
            variants.append(('fast_cuda_graph_fp16', lambda: make_embedder(
                runtime_copy(model, device, 'fp16'), 'cuda_graph', batch_sizes=(1, 2, 3, 4))))
            if options.compile_on_gpu:
                variants.append(('fast_compile_fp16', lambda: make_embedder(
                    runtime_copy(model, device, 'fp16'), 'compile', batch_sizes=(1, 2, 3, 4))))
        else:
            for precision in ('fp32', 'bf16'):
                if options.quick and precision != fast_cpu_precision():
                    continue
                variants.append((f'fast_auto_{precision}', lambda p=precision: make_embedder(
                    runtime_copy(model, device, p), 'auto', cache_dir=options.cache_dir)))
        built = {}
        for name, build in variants:
            try:
                encoder = build()
                localizer = make_localizer(model, encoder, db_path)
                if hasattr(encoder, 'warm_up'):
                    encoder.warm_up(batch_sizes=(1,), frame_shapes=(FRAME_SHAPE,))
                localizer.warm_up()
                built[name] = (encoder, localizer)
            except Exception as exc:  # noqa: B902 - report and go on with the next variant
                out['variants'][name] = {'error': f'{exc.__class__.__name__}: {exc}'}

        def frame_of(localizer):
            counter = {'i': 0}

            def frame():
                msg = messages[counter['i'] % len(messages)]
                counter['i'] += 1
                to_fix(localizer.localize_batch([decode_msg(msg)], [0.0])[0])
            return frame

        calls = {name: frame_of(loc) for name, (_, loc) in built.items()}
        for name, ms in interleaved(calls, n_frames, 3, torch.device(device)).items():
            encoder, localizer = built[name]
            row = summarize(ms)
            row['frames_per_s'] = round(1000.0 / row['mean_ms'], 1)
            row['backend'] = getattr(encoder, 'backend', 'eager')
            row['stages_p50_ms'] = _stages(localizer, encoder, messages, decode_msg, to_fix,
                                           device, max(3, n_frames // 3))
            out['variants'][name] = row
        built = calls = None
        gc.collect()
        reset_compiled()
    base = out['variants'].get('eager_fp32', {}).get('p50_ms')
    for row in out['variants'].values():
        if 'p50_ms' in row:
            row['speedup_vs_eager_fp32'] = ratio(base, row['p50_ms'])
    out['load_average_end'] = load_average()
    return out


def _stages(localizer, encoder, messages, decode_msg, to_fix, device, n: int) -> dict:
    """Return the p50 (ms) of the frame path's stages: decode, embed, search, the rest."""
    rgb = decode_msg(messages[0])
    dev = torch.device(device)
    keep = dev.type == 'cuda'
    decode = summarize(time_calls(lambda: decode_msg(messages[0]), n, 1))['p50_ms']
    embed = summarize(time_calls(lambda: encoder.encode_batch([rgb], 1, keep_on_device=keep),
                                 n, 1, dev))['p50_ms']
    q = encoder.encode_batch([rgb], 1, keep_on_device=keep)
    search = summarize(time_calls(lambda: localizer.index.search(q, 10), n, 1, dev))['p50_ms']
    whole = summarize(time_calls(
        lambda: to_fix(localizer.localize_batch([decode_msg(messages[0])], [0.0])[0]), n, 1,
        dev))['p50_ms']
    return {'decode': decode, 'embed': embed, 'search': search,
            'estimate_and_message': round(max(0.0, whole - decode - embed - search), 4)}


def print_result(result: dict) -> None:
    print(f"   {result['message']} -> {result['output']}; "
          f"{result['database_entries']} entries")
    for variant, row in result['variants'].items():
        if 'error' in row:
            print(f"     {variant:<24} error: {row['error'][:150]}")
            continue
        print(f"     {variant:<24} p50 {row['p50_ms']:9.2f} ms  p99 {row['p99_ms']:9.2f}  "
              f"{row['frames_per_s']:8.1f} frames/s  "
              f"x{fmt(row.get('speedup_vs_eager_fp32'))}  stages p50 {row['stages_p50_ms']}")
