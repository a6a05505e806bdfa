"""
ImageRetrievalModel: backbone -> pooling -> projection head -> L2-normalised embedding.

The backbone (ConvNeXt-Tiny or EfficientNet-Lite2, chosen by `ModelConfig.backbone`) and its
initial weights come from backbones.py.

Weights are saved without pickle (safetensors, with the `ModelConfig` and a fingerprint in the
header), so a weights file can be loaded safely from anywhere. The fingerprint is a hash of the
config and every parameter: a database stores it and refuses a model that would embed differently.

The model is itself the eager embedder (fast path 'off'); the faster backends wrap it
(`taco_cvgl.inference.registry.make_embedder`) and offer the same inference calls.
"""

from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple, Union
import zipfile

from taco_cvgl.errors import first_line, InputError, MismatchError, TacoError
from taco_cvgl.files.atomic import atomic_path
from taco_cvgl.model.backbones import (  # noqa: F401 - re-exported
    BACKBONE_CHANNELS, build_backbone, imagenet_weights_path, key_difference, tensor_state)
from taco_cvgl.model.config import ModelConfig, PRECISIONS
from taco_cvgl.model.preprocess import prepare_batch
import torch
import torch.nn as nn
import torch.nn.functional as F

ZIP_MAGIC = b'PK\x03\x04'      # torch.save and Lightning checkpoints are zip archives
CHECKPOINT_PREFIX = 'model.'    # RetrievalModule keeps the embedder at self.model


class GeM(nn.Module):
    """Generalised-mean pooling (Radenovic et al.) with a learnable exponent p."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6):
        super().__init__()
        self.p = nn.Parameter(torch.tensor(float(p)))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pool Bx C x H x W to B x C."""
        p = self.p.clamp(min=1.0)
        return x.clamp(min=self.eps).pow(p).mean(dim=(2, 3)).pow(1.0 / p)


def _weights_kind(path: Path) -> str:
    """Tell a checkpoint (zip) from safetensors by their first bytes, whatever the file's name."""
    try:
        with open(path, 'rb') as handle:
            head = handle.read(9)
    except OSError as exc:
        raise InputError(f'cannot read weights {path}: {exc.strerror or exc}') from None
    if head.startswith(ZIP_MAGIC):
        return 'checkpoint'
    if len(head) == 9 and head[8:9] == b'{':     # 8-byte header length, then the JSON header
        return 'safetensors'
    raise InputError(f'weights {path} are neither taco_cvgl .safetensors weights nor a '
                     f'checkpoint of taco-cvgl train ({len(head)} bytes at its start do not '
                     f'match either; truncated or another format?)')


def _check_archive(path: Path) -> None:
    """
    Refuse a checkpoint whose zip directory is missing (truncated) or declares more than it holds.

    torch writes checkpoints uncompressed, so their contents cannot exceed the file: a larger
    declared size is a damaged or hostile archive (a zip bomb) that must not be inflated.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            declared = sum(member.file_size for member in archive.infolist())
    except Exception as exc:   # zipfile raises several types on a damaged directory
        raise InputError(f'checkpoint {path} is not a complete zip archive '
                         f'({first_line(exc)}): truncated or damaged?') from None
    size = path.stat().st_size
    if declared > size:
        raise InputError(f'checkpoint {path} declares {declared} bytes of contents in a '
                         f'{size}-byte file: damaged, refused')


def read_checkpoint(path: Union[str, Path]) -> Tuple[ModelConfig, Dict[str, torch.Tensor], dict]:
    """
    Read a checkpoint of `taco-cvgl train`: return (model config, embedder state, checkpoint).

    Without pickle (weights_only) and memory-mapped, so tensors are read only when used (an
    optimiser state twice the model's size costs nothing here). Every way a file can fail is
    an InputError naming it.
    """
    path = Path(path)
    _check_archive(path)
    try:
        ckpt = _torch_load(path)
    except Exception as exc:
        raise InputError(f'cannot read checkpoint {path}: {first_line(exc)}') from None
    hparams = ckpt.get('hyper_parameters') if isinstance(ckpt, dict) else None
    if not isinstance(hparams, dict) or 'model_config' not in hparams \
            or not isinstance(ckpt.get('state_dict'), dict):
        raise InputError(f'checkpoint {path} is not one of taco-cvgl train: it needs a '
                         f'state_dict and a model_config hyper-parameter')
    config = _stored_config(hparams['model_config'], f'checkpoint {path}')
    state = tensor_state(ckpt['state_dict'], f'checkpoint {path}')
    state = {k[len(CHECKPOINT_PREFIX):]: v for k, v in state.items()
             if k.startswith(CHECKPOINT_PREFIX)}
    return config, state, ckpt


def _torch_load(path: Path):
    """torch.load without pickle, memory-mapped, also for a checkpoint named .safetensors."""
    if path.suffix != '.safetensors':
        return torch.load(str(path), map_location='cpu', weights_only=True, mmap=True)
    with open(path, 'rb') as handle:   # given that name, torch.load would read safetensors
        return torch.load(handle, map_location='cpu', weights_only=True)


def _stored_config(value, what: str) -> ModelConfig:
    """Return the ModelConfig a file stores (JSON text, or a mapping), its errors naming it."""
    try:
        return ModelConfig.from_dict(value) if isinstance(value, dict) \
            else ModelConfig.from_json(value)
    except InputError as exc:
        raise InputError(f'{what}: {exc}') from None


def _shapes(state: dict) -> Dict[str, Tuple[int, ...]]:
    return {name: tuple(tensor.shape) for name, tensor in state.items()}


def _shape_difference(expected: dict, stored: dict) -> str:
    """Say how stored tensor shapes differ from those a config makes ('' when they agree)."""
    names = key_difference(expected, stored)
    if names:
        return names
    for name in sorted(expected):
        if expected[name] != stored[name]:
            return (f'{name} has shape {list(stored[name])}, the config makes '
                    f'{list(expected[name])}')
    return ''


class ImageRetrievalModel(nn.Module):
    """
    A backbone embedder producing L2-normalised vectors of `config.embedding_dim`.

    It offers the inference calls of `taco_cvgl.inference.base.Embedder` itself, as the
    eager backend: `backend` is 'off' (the fast_path name that means this very model) and
    nothing ever falls back.
    """

    backend = 'off'
    fallback_reason: Optional[str] = None

    def __init__(self, config: Optional[ModelConfig] = None,
                 backbone_weights: Optional[str] = None):
        """Build the network; backbone_weights is None, 'imagenet' or a path to a state dict."""
        super().__init__()
        self.config = config or ModelConfig()
        backbone = build_backbone(self.config.backbone, backbone_weights)
        channels = backbone.channels
        self.backbone, self.norm = backbone.features, backbone.norm
        self.pool = GeM(self.config.gem_p) if self.config.pooling == 'gem' else None
        hidden = self.config.head_hidden_dim
        self.head = nn.Sequential(
            nn.Linear(channels, hidden),
            nn.BatchNorm1d(hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(self.config.dropout),
            nn.Linear(hidden, self.config.embedding_dim),
        )
        self.device = torch.device('cpu')
        self.precision = 'fp32'

    # ----------------------------------------------------------------------------- network
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map a normalised batch Bx3xHxW to L2-normalised embeddings BxD."""
        features = self.backbone(x)
        pooled = features.mean(dim=(2, 3)) if self.pool is None else self.pool(features)
        embedding = self.head(self.norm(pooled))
        return F.normalize(embedding.float(), dim=1)

    # ----------------------------------------------------------------------------- runtime
    def to_runtime(self, device: str = 'auto', precision: str = 'auto') -> 'ImageRetrievalModel':
        """
        Move to a device for inference: eval mode, channels_last and an autocast precision.

        device 'auto' picks CUDA when present. precision 'auto' is fp16 autocast on CUDA and fp32
        on CPU (bf16 on CPU is faster where the CPU supports it; choose it explicitly). A faster
        backend wraps the model afterwards: `taco_cvgl.inference.registry.make_embedder`.
        """
        if device == 'auto':
            device = 'cuda' if torch.cuda.is_available() else 'cpu'
        if device.startswith('cuda') and not torch.cuda.is_available():
            raise TacoError(f'device {device!r} requested but CUDA is not available here')
        if precision not in PRECISIONS:
            raise InputError(f'precision must be one of {PRECISIONS}, got {precision!r}')
        self.device = torch.device(device)
        if precision == 'auto':
            precision = 'fp16' if self.device.type == 'cuda' else 'fp32'
        if precision == 'fp16' and self.device.type == 'cpu':
            raise InputError('fp16 autocast is for CUDA; on CPU use bf16 or fp32')
        self.precision = precision
        known = self._known_fingerprint()
        self.to(self.device, memory_format=torch.channels_last)
        self.eval()
        if known:  # moving copies the same values: the fingerprint still holds
            self._fingerprint_cache = (self._weights_key(), known)
        return self

    def _autocast(self):
        if self.precision == 'fp32':
            return contextlib.nullcontext()
        dtype = torch.float16 if self.precision == 'fp16' else torch.bfloat16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    @torch.inference_mode()
    def embed_tensor(self, batch: torch.Tensor) -> torch.Tensor:
        """Embed an already-normalised batch on the model's device; returns float32 BxD."""
        batch = batch.to(self.device, non_blocking=True).contiguous(
            memory_format=torch.channels_last)
        with self._autocast():
            return self(batch)

    def encode_batch(self, images: Sequence, batch_size: int = 32, color_order: str = 'rgb',
                     keep_on_device: bool = False) -> torch.Tensor:
        """Embed images (numpy HxWx3 uint8, PIL images or 3xHxW tensors) -> float32 NxD."""
        if self.training:
            raise TacoError('encode_batch needs eval mode: call model.to_runtime() or .eval()')
        chunks = []
        for start in range(0, len(images), batch_size):
            batch = prepare_batch(images[start:start + batch_size], self.config, self.device,
                                  color_order)
            out = self.embed_tensor(batch)
            chunks.append(out if keep_on_device else out.cpu())
        if not chunks:
            return torch.empty((0, self.config.embedding_dim))
        return torch.cat(chunks)

    def encode_image(self, image, color_order: str = 'rgb') -> torch.Tensor:
        """Embed one image -> float32 vector of length D (on the CPU)."""
        return self.encode_batch([image], color_order=color_order)[0]

    def embed(self, images, color_order: str = 'rgb') -> torch.Tensor:
        """Embed images (as `encode_batch`) or a normalised Bx3xHxW float batch -> NxD."""
        if isinstance(images, torch.Tensor) and images.ndim == 4:
            return self.embed_tensor(images)
        return self.encode_batch(images, color_order=color_order)

    @staticmethod
    def compute_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Cosine similarity between rows of a (NxD or D) and rows of b (MxD) -> NxM (or M)."""
        a = torch.as_tensor(a, dtype=torch.float32)
        b = torch.as_tensor(b, dtype=torch.float32).to(a.device)
        single = a.ndim == 1
        sim = F.normalize(a.reshape(-1, a.shape[-1]), dim=1) @ F.normalize(b, dim=1).T
        return sim[0] if single else sim

    @classmethod
    def retrieve_similar(cls, query, database, top_k: int = 5
                         ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Return (indices, similarities) of the top_k database rows most similar to query."""
        sim = cls.compute_similarity(query, database)
        k = min(int(top_k), sim.shape[-1])
        values, indices = torch.topk(sim, k, dim=-1)
        return indices, values

    # ----------------------------------------------------------------------------- identity
    def fingerprint(self) -> str:
        """
        Return a hash of the config and every parameter and buffer (as float32 bytes).

        The one identity of a set of weights: databases, ONNX files and the fast paths' caches
        are keyed by it. Hashing ConvNeXt-Tiny's weights takes a few hundred milliseconds, so
        the value is kept until a tensor changes (autograd's version counters see in-place
        updates such as optimiser steps and load_state_dict; writes through `.data` bypass
        them).
        """
        known = self._known_fingerprint()
        if known:
            return known
        digest = hashlib.blake2b(self.config.to_json().encode(), digest_size=16)
        for name, tensor in sorted(self.state_dict().items()):
            digest.update(name.encode())
            if tensor.dtype.is_floating_point:
                tensor = tensor.float()
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        self._fingerprint_cache = (self._weights_key(), digest.hexdigest())
        return self._fingerprint_cache[1]

    def _weights_key(self) -> Optional[tuple]:
        """Return what changes whenever a weight does (None where it cannot be told)."""
        try:
            return (self.config,) + tuple((t.data_ptr(), t._version, t.dtype, str(t.device))
                                          for t in self.state_dict().values())
        except RuntimeError:  # inference tensors have no version counter
            return None

    def _known_fingerprint(self) -> Optional[str]:
        """Return the kept fingerprint while the weights are those it was computed on."""
        cache = self.__dict__.get('_fingerprint_cache')
        if cache is None or cache[0] is None or cache[0] != self._weights_key():
            return None
        return cache[1]

    # ----------------------------------------------------------------------------- files
    def save(self, path: Union[str, Path], dtype: str = 'fp16') -> str:
        """
        Write safetensors weights (fp16 or fp32) atomically; return the loaded fingerprint.

        The returned fingerprint is that of the model as `load` will rebuild it (fp16 rounding
        included), which is what a database built from this file will record.
        """
        from safetensors.torch import save_file
        if dtype not in ('fp16', 'fp32'):
            raise InputError(f"weights dtype must be 'fp16' or 'fp32', got {dtype!r}")
        store = torch.float16 if dtype == 'fp16' else torch.float32
        state = {}
        for name, tensor in self.state_dict().items():
            tensor = tensor.detach().cpu()
            if tensor.dtype.is_floating_point:
                tensor = tensor.to(store)
            state[name] = tensor.contiguous()
        rebuilt = ImageRetrievalModel(self.config)
        rebuilt.load_state_dict({k: v.float() if v.dtype.is_floating_point else v
                                 for k, v in state.items()})
        fingerprint = rebuilt.fingerprint()
        metadata = {'format': 'taco_cvgl.weights/1', 'config': self.config.to_json(),
                    'fingerprint': fingerprint, 'dtype': dtype}
        with atomic_path(path) as tmp:
            save_file(state, str(tmp), metadata=metadata)
        return fingerprint

    @classmethod
    def load(cls, path: Union[str, Path], device: str = 'auto',
             precision: str = 'auto') -> 'ImageRetrievalModel':
        """
        Load weights written by `save` (or a checkpoint of `taco-cvgl train`) for inference.

        The format is read from the file's first bytes, not its name. A malformed, truncated or
        hostile file is an InputError (or a MismatchError) naming it, raised before any memory
        is allocated for a model larger than the file's tensors.
        """
        path = Path(path)
        if not path.is_file():
            raise InputError(f'weights file not found: {path}')
        if _weights_kind(path) == 'checkpoint':
            return cls.load_from_checkpoint(path, device, precision)
        from safetensors import safe_open
        try:   # safetensors checks every tensor's declared size and offsets against the file
            with safe_open(str(path), framework='pt') as handle:
                metadata = handle.metadata() or {}
                state = {k: handle.get_tensor(k) for k in handle.keys()}
        except Exception as exc:
            raise InputError(f'cannot read weights {path}: {first_line(exc)} (is it a taco_cvgl '
                             f'.safetensors file, complete and not truncated?)') from None
        if 'config' not in metadata:
            raise InputError(f'weights {path} carry no taco_cvgl model config in their header')
        model = cls._fitted(_stored_config(metadata['config'], f'weights {path}'), state, path)
        fingerprint = model.fingerprint()
        if metadata.get('fingerprint') and metadata['fingerprint'] != fingerprint:
            raise MismatchError(f'weights {path} are corrupt: their fingerprint does not match')
        return model.to_runtime(device, precision)

    @classmethod
    def load_from_checkpoint(cls, path: Union[str, Path], device: str = 'auto',
                             precision: str = 'auto') -> 'ImageRetrievalModel':
        """Load the embedder from a Lightning checkpoint written by `taco-cvgl train`."""
        config, state, _ = read_checkpoint(path)
        return cls._fitted(config, state, Path(path)).to_runtime(device, precision)

    @classmethod
    def _fitted(cls, config: ModelConfig, state: dict, path: Path) -> 'ImageRetrievalModel':
        """
        Build the model of `config` holding `state`, its shapes checked before any allocation.

        The model is made on the meta device (no memory, no random init), so a config asking for
        a model other than the file's tensors is refused before it costs anything; only then is
        memory allocated, for exactly the tensors that the file holds, and filled from them.
        """
        with torch.device('meta'):
            model = cls(config)
        difference = _shape_difference(_shapes(model.state_dict()), _shapes(state))
        if difference:
            raise MismatchError(f'weights {path} do not fit the model in their config: '
                                f'{difference}')
        model = model.to_empty(device='cpu')
        model._load_state(state, path)   # strict: every parameter and buffer is overwritten
        return model

    def _load_state(self, state: dict, path: Path) -> None:
        state = {k: v.float() if v.dtype.is_floating_point else v for k, v in state.items()}
        try:
            self.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            first = str(exc).splitlines()[0]
            raise MismatchError(f'weights {path} do not fit the model in their config: '
                                f'{first}') from None
