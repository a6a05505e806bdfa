"""
Part multi_camera: 4 cameras at 30 Hz into the node's newest-frame-per-camera batching.

Publishes one frame per camera every 1/30 s into the node's FrameSlots while a worker localizes
every waiting frame at once as a batch; counts dropped frames (a frame replaced before it was
taken), batch latency and the age of a frame at its fix. On the GPU by default; on the CPU with
--multi-camera-on-cpu (where it drops frames). Run by bench.py.
"""

from __future__ import annotations

from pathlib import Path
import tempfile
import threading
import time
from typing import List

from bench_common import (bench_model, BenchOptions, FRAME_SHAPE, gpu_reason, load_average,
                          runtime_copy, summarize, synthetic_database, TestImages)
from bench_pipeline import image_message, make_localizer, navsat_builder


def measure(options: BenchOptions) -> dict:
    """4 cameras at 30 Hz feeding the node's newest-frame slots; count dropped frames."""
    from taco_cvgl.files.image_codec import decode_msg
    from taco_cvgl.inference.registry import make_embedder
    reason = gpu_reason()
    if reason and not options.multi_camera_on_cpu:
        return {'skipped': reason}
    device = 'cpu' if reason else 'cuda'
    cameras, rate_hz = 4, 30.0
    duration = 2.0 if options.quick else 6.0
    model = bench_model(options.sizes[0], options.weights)
    images = TestImages(places=cameras, queries=0)
    messages = [image_message(im)[0] for im in images.database]
    to_fix, _ = navsat_builder()
    precision = 'fp16' if device == 'cuda' else 'fp32'
    encoder = make_embedder(runtime_copy(model, device, precision), 'auto',
                            batch_sizes=tuple(range(1, cameras + 1)),
                            cache_dir=options.cache_dir)
    with tempfile.TemporaryDirectory() as tmp:
        db_path = Path(tmp) / 'db.npz'
        synthetic_database(model, 100_000 if device == 'cuda' else 10_000).save(db_path)
        localizer = make_localizer(model, encoder, db_path)
        encoder.warm_up(batch_sizes=range(1, cameras + 1), frame_shapes=(FRAME_SHAPE,))
        localizer.warm_up()
        for b in range(1, cameras + 1):  # the index and estimate at every batch size
            localizer.localize_batch([decode_msg(m) for m in messages[:b]])
        stats = run_cameras(localizer, messages, decode_msg, to_fix, rate_hz, duration)
    stats.update({'device': device, 'backend': encoder.backend, 'cameras': cameras,
                  'rate_hz': rate_hz, 'duration_s': duration,
                  'load_average_end': load_average()})
    return stats


def run_cameras(localizer, messages, decode_msg, to_fix, rate_hz: float,
                duration: float) -> dict:
    """
    Publish one frame per camera every 1/rate_hz s into the node's FrameSlots; localize batches.

    The slots are the node's own class (taco_cvgl/ros/slots.py): a frame that arrives while its
    camera's previous frame is still waiting is a dropped frame; the worker takes every waiting
    frame at once and localizes them as a batch, as the node's worker does.
    """
    from taco_cvgl.ros.slots import FrameSlots
    cameras = len(messages)
    slots = FrameSlots(cameras)
    counts = {'published': 0, 'dropped': 0, 'localized': 0}
    batch_ms: List[float] = []
    age_ms: List[float] = []
    stop = threading.Event()

    def publisher():
        start = time.perf_counter()
        period = 1.0 / rate_hz
        k = 0
        while not stop.is_set():
            due = start + k * period
            delay = due - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            if time.perf_counter() - start >= duration:
                break
            for c in range(cameras):
                counts['dropped'] += int(slots.put(c, messages[c]))
                counts['published'] += 1
            k += 1

    def worker():
        while True:
            with slots.cond:
                slots.cond.wait_for(lambda: slots.waiting() or stop.is_set(), 0.05)
            taken = slots.take()
            if not taken:
                if stop.is_set():
                    return
                continue
            t0 = time.perf_counter()
            frames = [decode_msg(msg) for _, (msg, _) in taken]
            for m in localizer.localize_batch(frames, [0.0] * len(frames)):
                to_fix(m)
            done = time.perf_counter()
            batch_ms.append(1000.0 * (done - t0))
            # FrameSlots stamps arrivals with time.monotonic(), on the same clock here.
            now = time.monotonic()
            age_ms.extend(1000.0 * (now - arrived) for _, (_, arrived) in taken)
            counts['localized'] += len(taken)

    threads = [threading.Thread(target=publisher), threading.Thread(target=worker)]
    for t in threads:
        t.start()
    threads[0].join()
    time.sleep(0.2)
    stop.set()
    with slots.cond:
        slots.cond.notify_all()
    threads[1].join()
    return {'published': counts['published'], 'dropped': counts['dropped'],
            'localized': counts['localized'], 'batch_latency': summarize(batch_ms),
            'frame_age_at_fix': summarize(age_ms)}


def print_result(result: dict) -> None:
    """Print what was published, dropped and how long a batch took."""
    print(f"   {result['cameras']} cameras x {result['rate_hz']} Hz for "
          f"{result['duration_s']} s on {result['device']} ({result['backend']}): published "
          f"{result['published']}, dropped {result['dropped']}, batch p99 "
          f"{result['batch_latency'].get('p99_ms')} ms")
