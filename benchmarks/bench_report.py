"""
The issue's speed targets against a bench result, and a result's markdown tables.

Pure functions over the JSON that bench.py writes (no measuring): targets() says which target
each figure meets, markdown_report() gives the tables docs/PERFORMANCE.md shows.
"""

from __future__ import annotations

from typing import List

from bench_common import fmt


def _get(d, *keys):
    for key in keys:
        if not isinstance(d, dict) or key not in d:
            return None
        d = d[key]
    return d


# An approximate search meets a speed target only if its top-1 is the exact top-1 this often.
APPROXIMATE_AGREEMENT = 0.95


def targets(figures: dict) -> List[dict]:
    """Compare the measured figures with the issue's targets."""
    rows = []

    def add(name, target, measured, ok, note=''):
        rows.append({'name': name, 'target': target, 'measured': measured,
                     'met': None if measured is None else bool(ok), 'note': note})

    pipe = figures.get('gpu_pipeline', {})
    best = None
    for name in ('fast_compile_fp16', 'fast_cuda_graph_fp16'):
        row = _get(pipe, 'variants', name)
        if row and 'p50_ms' in row and (best is None or row['p50_ms'] < best[1]['p50_ms']):
            best = (name, row)
    if best:
        add('live frame p50 (GPU)', '<= 3 ms', best[1]['p50_ms'], best[1]['p50_ms'] <= 3,
            best[0])
        add('live frame p99 (GPU)', '<= 6 ms', best[1]['p99_ms'], best[1]['p99_ms'] <= 6,
            best[0])
        add('frames/s one camera (GPU)', '>= 300', best[1]['frames_per_s'],
            best[1]['frames_per_s'] >= 300, best[0])
    else:
        add('live frame p50/p99, frames/s (GPU)', '<= 3 / 6 ms, >= 300/s', None, False,
            _get(pipe, 'skipped') or 'not measured')
    cams = figures.get('multi_camera', {})
    if 'dropped' in cams:
        add('4 cameras x 30 Hz, none dropped', '0 dropped', cams['dropped'],
            cams['dropped'] == 0, f"{cams['device']}, {cams['localized']} localized")
    build = _get(figures, 'gpu_database_build', 'variants') or {}
    rates = [(r['images_per_s'], n) for n, r in build.items() if 'images_per_s' in r]
    if rates:
        top = max(rates)
        add('database build from JPEG (GPU)', '>= 3000 images/s', top[0], top[0] >= 3000,
            top[1])
    storage = figures.get('storage', {})
    if 'fp16_embedding_bytes_per_entry' in storage:
        add('storage per image, fp16', '<= 1024 B', storage['fp16_embedding_bytes_per_entry'],
            storage['fp16_embedding_bytes_per_entry'] <= 1024,
            f"whole .npz file: {storage.get('npz_file_bytes_per_entry')} B per entry")
        good = [(o['index_bytes_per_entry'], n, o['recall_at_1_vs_exact'])
                for n, o in storage.get('options', {}).items()
                if o.get('recall_at_1_vs_exact') is not None]
        fitting = [g for g in good if g[0] <= 64 and g[2] >= 0.98]
        pick = min(fitting) if fitting else (min(good) if good else None)
        if pick:
            add('compressed storage', '<= 64 B and >= 98% of exact R@1',
                f'{pick[0]} B, {pick[2] * 100:.1f}%', bool(fitting), pick[1])
    gsearch = _get(figures, 'gpu_search', 'sizes', '1000000', 'exact_fp16', 'one_query',
                   'p50_ms')
    add('search top-10 over 1M (GPU)', '<= 0.5 ms', gsearch,
        gsearch is not None and gsearch <= 0.5)
    csearch = _get(figures, 'cpu_search', 'sizes') or {}
    if '1000000' in csearch:
        # An approximate index counts only where its top-1 agrees with exact search.
        approx = [(r['one_query']['p50_ms'], n, r['top1_equal_to_exact'])
                  for n, r in csearch['1000000'].items()
                  if n != 'exact_fp32' and 'one_query' in r]
        good = [a for a in approx if a[2] >= APPROXIMATE_AGREEMENT]
        if good or approx:
            top = min(good or approx)
            add('search top-10 over 1M (CPU, approximate)', '<= 20 ms', top[0],
                bool(good) and top[0] <= 20,
                f'{top[1]}, top-1 = exact for {top[2] * 100:.0f}% of queries (needs '
                f'{APPROXIMATE_AGREEMENT * 100:.0f}%)')
    else:
        add('search top-10 over 1M (CPU, approximate)', '<= 20 ms', None, False,
            'measured at 1M by the full bench only')
    train = _get(figures, 'gpu_training', 'variants', 'bf16_channels_last', 'images_per_s')
    add('training 224 px bf16 channels_last (GPU)', '>= 1500 images/s', train,
        train is not None and train >= 1500)
    lat = _get(figures, 'cpu_latency', 'sizes') or {}
    for size, per_backend in lat.items():
        candidates = [(r['speedup_vs_eager_fp32'], n) for n, r in per_backend.items()
                      if n != 'eager_fp32' and r.get('equal_accuracy')
                      and r.get('speedup_vs_eager_fp32')]
        if candidates:
            top = max(candidates)
            add(f'CPU per-frame latency {size} px vs eager fp32', '>= 4x at equal accuracy',
                top[0], top[0] >= 4, top[1])
    return rows


def markdown_report(result: dict) -> str:
    """Return markdown tables of a bench result (for docs/PERFORMANCE.md)."""
    m = result['machine']
    lines = [f"Machine: {m['hostname']}, {m['cpu']} ({m['cpu_cores']} cores), GPU "
             f"{m.get('gpu') or 'none'}; torch {m['torch']}, onnxruntime {m.get('onnxruntime')}; "
             f"{result['created']}; load average at start {m['load_average']}; "
             f"{'quick' if result.get('quick') else 'full'} run; weights {result['weights']}.",
             '']
    figures = result['figures']
    for part in ('cpu_latency', 'gpu_latency'):
        data = figures.get(part, {})
        for size, rows in (data.get('sizes') or {}).items():
            lines += [f'{part} at {size} px ({data["what"]}; {data.get("threads")} threads)', '',
                      '| variant | p50 ms | p99 ms | network alone ms | speed-up | min cosine '
                      '| top-1 same |', '| --- | --- | --- | --- | --- | --- | --- |']
            for name, row in rows.items():
                if 'p50_ms' not in row:
                    lines.append(f"| {name} | error: {row.get('error', '')[:80]} | | | | | |")
                    continue
                lines.append(f"| {name} | {row['p50_ms']:.2f} | {row['p99_ms']:.2f} | "
                             f"{fmt(row.get('network_only_p50_ms'))} | "
                             f"{fmt(row.get('speedup_vs_eager_fp32'))} | "
                             f"{row['min_cosine']:.6f} | {row['top1_same']} |")
            lines.append('')
    for part in ('cpu_pipeline', 'gpu_pipeline'):
        data = figures.get(part, {})
        if 'variants' not in data:
            continue
        lines += [f"{part}: {data['message']} -> {data['output']}, {data['database_entries']} "
                  f'entries', '', '| variant | p50 ms | p99 ms | frames/s | speed-up | stages '
                  '(p50 ms) |', '| --- | --- | --- | --- | --- | --- |']
        for name, row in data['variants'].items():
            if 'p50_ms' in row:
                lines.append(f"| {name} | {row['p50_ms']:.2f} | {row['p99_ms']:.2f} | "
                             f"{row['frames_per_s']} | {fmt(row.get('speedup_vs_eager_fp32'))}"
                             f" | {row['stages_p50_ms']} |")
        lines.append('')
    lines += ['Targets', '', '| target | goal | measured | met |', '| --- | --- | --- | --- |']
    for row in result.get('targets', []):
        met = {True: 'yes', False: 'no', None: 'not measured'}[row['met']]
        note = f" ({row['note']})" if row['note'] else ''
        lines.append(f"| {row['name']} | {row['target']} | {row['measured']}{note} | {met} |")
    return '\n'.join(lines) + '\n'


def print_targets(rows: List[dict]) -> None:
    """Print the targets table."""
    print('\n== targets')
    for row in rows:
        mark = {True: 'met', False: 'NOT met', None: 'not measured'}[row['met']]
        print(f"   {row['name']:<46} {row['target']:<34} {str(row['measured']):<16} {mark}"
              f"{'  (' + row['note'] + ')' if row['note'] else ''}")
