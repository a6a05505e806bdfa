"""
Export the embedder to ONNX and check that the export embeds like the model.

The exported graph is the network alone, in fp32: a normalised batch ``images`` (B x 3 x H x W,
float32, B dynamic, H x W the config's input size) -> ``embeddings`` (B x D, float32,
L2-normalised). Preprocessing is not in the graph: it is described by the model config, which
the file carries (ONNX metadata ``taco_cvgl.model_config``) along with the model's fingerprint
(``taco_cvgl.fingerprint``), so a database can be matched to an ONNX file as to the weights.

Run: python -m taco_cvgl.inference.onnx_export --weights W.safetensors --out W.onnx
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import os
from pathlib import Path
import sys
from typing import Optional, Sequence
import warnings

from taco_cvgl.errors import InputError, MismatchError, TacoError
from taco_cvgl.inference.cpu import weights_copy
from taco_cvgl.model.config import cache_dir_default
import torch
import torch.nn.functional as F

INPUT_NAME = 'images'
OUTPUT_NAME = 'embeddings'
OPSET = 18
# An export must reproduce the eager fp32 embeddings this closely (cosine, and max |difference|).
MIN_COSINE = 0.9999
MAX_ABS_DIFF = 1e-3


@dataclasses.dataclass
class ExportCheck:
    """How an exported file compares with the eager fp32 model."""

    path: str
    checked_with: str          # 'onnxruntime' (numbers compared) or 'onnx.checker' (structure)
    min_cosine: float          # NaN when only the structure was checked
    max_abs_diff: float        # NaN when only the structure was checked
    batch_sizes: Sequence[int]

    def to_dict(self) -> dict:
        """Return a JSON-ready dict (NaN as None)."""
        def num(v):
            return None if v != v else float(v)
        return {'path': self.path, 'checked_with': self.checked_with,
                'min_cosine': num(self.min_cosine), 'max_abs_diff': num(self.max_abs_diff),
                'batch_sizes': list(self.batch_sizes)}


def onnxruntime_available() -> bool:
    """Return True when onnxruntime can be imported."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def _cpu_fp32_copy(model) -> torch.nn.Module:
    """Return an eval-mode fp32 copy of the network on the CPU (the runtime model untouched)."""
    return weights_copy(model, torch.float32, torch.contiguous_format)


def _example(config, batch: int = 2) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randn((batch, 3) + tuple(config.input_size), generator=generator)


@contextlib.contextmanager
def _quiet():
    """Hide the exporters' deprecation and tracer warnings (shapes are fixed but the batch)."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter('ignore')
        yield


def _export_torchscript(net, example, path: Path) -> None:
    torch.onnx.export(net, (example,), str(path), dynamo=False, input_names=[INPUT_NAME],
                      output_names=[OUTPUT_NAME], opset_version=OPSET,
                      dynamic_axes={INPUT_NAME: {0: 'batch'}, OUTPUT_NAME: {0: 'batch'}})


def _export_dynamo(net, example, path: Path) -> None:
    batch = torch.export.Dim('batch', min=1, max=4096)
    program = torch.onnx.export(net, (example,), dynamo=True, input_names=[INPUT_NAME],
                                output_names=[OUTPUT_NAME], opset_version=OPSET,
                                dynamic_shapes=({0: batch},))
    # One self-contained file (the weights inside, not in a side .data file).
    program.save(str(path), external_data=False)


def export_onnx(model, out, exporter: str = 'auto', check: bool = True) -> ExportCheck:
    """
    Write the model's network as ONNX at `out` (atomically); check it unless told not to.

    exporter: 'torchscript' (fast, deprecated in torch but still shipped), 'dynamo' (torch.export
    based, needs onnxscript, much slower on a small CPU) or 'auto' (torchscript when this torch
    still has it, else dynamo). Raises MismatchError when the check finds different embeddings.
    """
    if exporter not in ('auto', 'torchscript', 'dynamo'):
        raise InputError(f"exporter must be 'auto', 'torchscript' or 'dynamo', got {exporter!r}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    net = _cpu_fp32_copy(model)
    example = _example(model.config)
    tmp = out.with_name(f'.{out.name}.tmp{os.getpid()}')
    try:
        with torch.no_grad(), _quiet():
            if exporter in ('auto', 'torchscript'):
                try:
                    _export_torchscript(net, example, tmp)
                except Exception as exc:  # noqa: B902 - removed or broken: try the other one
                    if exporter == 'torchscript':
                        raise TacoError(f'ONNX export (torchscript) failed: {exc}') from None
                    _export_dynamo(net, example, tmp)
            else:
                _export_dynamo(net, example, tmp)
        _add_metadata(tmp, model)
        os.replace(tmp, out)
    except TacoError:
        raise
    except Exception as exc:  # noqa: B902 - the exporters raise many kinds; report one
        raise TacoError(f'ONNX export to {out} failed: {exc.__class__.__name__}: '
                        f'{str(exc).splitlines()[0] if str(exc) else ""}') from None
    finally:
        for leftover in (tmp, Path(str(tmp) + '.data')):
            if leftover.exists():
                leftover.unlink()
    if not check:
        return ExportCheck(str(out), 'none', float('nan'), float('nan'), ())
    return check_export(model, out, reference=net)


def _add_metadata(path: Path, model) -> None:
    """Write the model config and fingerprint into the ONNX file's metadata (needs onnx)."""
    try:
        import onnx
    except ImportError:
        return
    proto = onnx.load(str(path))
    entries = {'taco_cvgl.model_config': model.config.to_json(),
               'taco_cvgl.fingerprint': model.fingerprint()}
    kept = [p for p in proto.metadata_props if p.key not in entries]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    for key, value in entries.items():
        proto.metadata_props.add(key=key, value=value)
    onnx.save(proto, str(path))


def read_metadata(path) -> dict:
    """Return the taco_cvgl metadata of an exported file (needs onnx or onnxruntime)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f'ONNX file not found: {path}')
    try:
        import onnx
    except ImportError:
        return dict(make_session(path).get_modelmeta().custom_metadata_map)
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: B902 - protobuf raises its own DecodeError
        raise InputError(f'cannot read ONNX file {path}: {exc}') from None
    return {p.key: p.value for p in proto.metadata_props}


def make_session(path, threads: Optional[int] = None):
    """Return an onnxruntime CPU InferenceSession with full graph optimisation."""
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = int(threads or torch.get_num_threads())
    options.inter_op_num_threads = 1
    options.log_severity_level = 3   # errors only: no provider chatter in the node's log
    # No busy-waiting of idle pool threads after a run: on a robot's few cores it would take
    # CPU from the other nodes (and, in the bench, from the next variant timed).
    options.add_session_config_entry('session.intra_op.allow_spinning', '0')
    try:
        return ort.InferenceSession(str(path), options, providers=['CPUExecutionProvider'])
    except Exception as exc:  # noqa: B902 - onnxruntime raises its own exception types
        raise InputError(f'cannot load ONNX file {path}: {exc}') from None


def check_export(model, path, reference=None, batch_sizes: Sequence[int] = (1, 3),
                 images: Optional[torch.Tensor] = None) -> ExportCheck:
    """
    Compare the ONNX file's embeddings with the eager fp32 model's.

    With onnxruntime: random normalised batches of each size (and `images`, a normalised batch,
    when given) must give a cosine >= MIN_COSINE and max |difference| <= MAX_ABS_DIFF, or
    MismatchError. Without it, onnx.checker validates the file's structure only.
    """
    path = Path(path)
    net = reference if reference is not None else _cpu_fp32_copy(model)
    if not onnxruntime_available():
        import onnx
        onnx.checker.check_model(str(path), full_check=True)
        return ExportCheck(str(path), 'onnx.checker', float('nan'), float('nan'), ())
    session = make_session(path)
    batches = [_example(model.config, b) for b in batch_sizes]
    if images is not None:
        batches.append(images.detach().float().cpu())
    worst_cos, worst_diff = 1.0, 0.0
    for x in batches:
        with torch.no_grad():
            expected = net(x)
        got = torch.from_numpy(session.run(None, {INPUT_NAME: x.numpy()})[0])
        if got.shape != expected.shape:
            raise MismatchError(f'ONNX file {path} gives shape {tuple(got.shape)} for a batch '
                                f'of {len(x)}, the model {tuple(expected.shape)}')
        worst_cos = min(worst_cos, float(F.cosine_similarity(got, expected, dim=1).min()))
        worst_diff = max(worst_diff, float((got - expected).abs().max()))
    if worst_cos < MIN_COSINE or worst_diff > MAX_ABS_DIFF:
        raise MismatchError(f'ONNX file {path} embeds differently from the model: cosine '
                            f'{worst_cos:.6f} (need >= {MIN_COSINE}), max difference '
                            f'{worst_diff:.2e} (need <= {MAX_ABS_DIFF})')
    return ExportCheck(str(path), 'onnxruntime', worst_cos, worst_diff, tuple(batch_sizes))


def cache_path(model, cache_dir=None) -> Path:
    """
    Return where `cached_export` keeps the export of this model (per weights and torch).

    Named by the fingerprint's first 16 digits, as exports cached before were.
    """
    if cache_dir is None:
        cache_dir = cache_dir_default()
    h, w = model.config.input_size
    name = f'{model.fingerprint()[:16]}-{h}x{w}-torch{torch.__version__.split("+")[0]}.onnx'
    return Path(cache_dir) / 'onnx' / name


def cached_export(model, cache_dir=None) -> Path:
    """Return an ONNX export of the model, exported (and checked) once per weights."""
    path = cache_path(model, cache_dir)
    if path.is_file():
        try:
            meta = read_metadata(path)
            if meta.get('taco_cvgl.model_config') == model.config.to_json():
                return path
        except TacoError:
            pass  # unreadable: export again over it
    export_onnx(model, path)
    return path


def main(argv: Optional[list] = None) -> int:
    """Export weights to ONNX and print the check."""
    from taco_cvgl.model.embedder import ImageRetrievalModel
    parser = argparse.ArgumentParser(prog='python -m taco_cvgl.inference.onnx_export',
                                     description='Export the embedder network to ONNX (fp32, '
                                                 'dynamic batch) and check its embeddings.')
    parser.add_argument('--weights', type=Path, required=True,
                        help='model weights (.safetensors from taco-cvgl train, or a .ckpt)')
    parser.add_argument('--out', type=Path, required=True, help='ONNX file to write')
    parser.add_argument('--exporter', default='auto', choices=('auto', 'torchscript', 'dynamo'),
                        help='torch exporter (auto: torchscript where this torch has it)')
    args = parser.parse_args(argv)
    try:
        model = ImageRetrievalModel.load(args.weights, device='cpu', precision='fp32')
        result = export_onnx(model, args.out, args.exporter)
    except TacoError as exc:
        print(f'taco-cvgl: error: {exc}', file=sys.stderr)
        return 2
    if result.checked_with == 'onnxruntime':
        print(f'wrote {args.out}: embeddings match the model (cosine >= '
              f'{result.min_cosine:.6f}, max difference {result.max_abs_diff:.1e})')
    else:
        print(f'wrote {args.out}: structure checked ({result.checked_with}); install '
              f'onnxruntime to compare the embeddings')
    return 0


if __name__ == '__main__':
    sys.exit(main())
