"""Part onnx: export the embedder to ONNX, and its embeddings against the model's. By bench.py."""

from __future__ import annotations

from pathlib import Path
import tempfile
import time

from bench_common import bench_model, BenchOptions


def measure(options: BenchOptions) -> dict:
    """Export the embedder to ONNX and compare its embeddings with the model's."""
    from taco_cvgl.inference.onnx_export import export_onnx
    size = options.sizes[0]
    model = bench_model(size, options.weights)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / 'model.onnx'
        start = time.perf_counter()
        check = export_onnx(model, path)
        seconds = time.perf_counter() - start
        out = dict(check.to_dict(), input_size=size, export_and_check_s=round(seconds, 2),
                   file_mib=round(path.stat().st_size / 2 ** 20, 1))
    out.pop('path', None)
    return out


def print_result(result: dict) -> None:
    """Print the export's figures."""
    print(f'   {result}')
