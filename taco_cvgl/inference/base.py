"""
The Embedder interface, and the wrapper that runs a model through one fast backend.

An `Embedder` turns images (or a normalised network-input batch) into L2-normalised float32
embeddings and says what it is: `config` (the ModelConfig), `device`, `precision`,
`fingerprint()` (that of the weights), `backend` (the fast_path name of what runs) and
`fallback_reason` (why a requested backend does not run, or None). `ImageRetrievalModel` is
one (the eager model, backend 'off'); `BackendEmbedder` is the others: the model plus one
backend's callable (a module of this package each, chosen by name in `registry`).

Every image becomes a network input through `taco_cvgl.model.preprocess`, whichever backend
runs, so every backend sees what the eager model sees.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence, Tuple

import numpy as np
from taco_cvgl.errors import TacoError
from taco_cvgl.model.config import ModelConfig
from taco_cvgl.model.embedder import ImageRetrievalModel
from taco_cvgl.model.preprocess import prepare_batch, to_rgb_array
import torch
import torch.nn as nn

# A backend must reproduce the eager fp32 embeddings to this cosine similarity or better.
MIN_COSINE = 0.999
DEFAULT_BATCH_SIZES = (1, 2, 4)


class FastPathError(TacoError):
    """A fast backend cannot be built or does not reproduce the eager embeddings."""


class Embedder(abc.ABC):
    """
    What turns images into embeddings: the eager model or a fast backend around it.

    Attributes every implementation has: config (ModelConfig), device (torch.device),
    precision ('fp32', 'fp16' or 'bf16'), backend (a fast_path name: 'off' for the model
    itself) and fallback_reason (None, or why the requested backend fell back).
    """

    config: ModelConfig
    device: torch.device
    precision: str
    backend: str
    fallback_reason: Optional[str]

    @abc.abstractmethod
    def embed_tensor(self, batch: torch.Tensor) -> torch.Tensor:
        """Embed a normalised batch Bx3xHxW -> float32 BxD on the embedder's device."""

    @abc.abstractmethod
    def encode_batch(self, images: Sequence, batch_size: int = 32, color_order: str = 'rgb',
                     keep_on_device: bool = False) -> torch.Tensor:
        """Embed images (numpy HxWx3 uint8, PIL images or 3xHxW tensors) -> float32 NxD."""

    @abc.abstractmethod
    def fingerprint(self) -> str:
        """Return the fingerprint of the weights (what databases store)."""

    def embed(self, images, color_order: str = 'rgb') -> torch.Tensor:
        """Embed images (as `encode_batch`) or a normalised Bx3xHxW float batch -> NxD."""
        if isinstance(images, torch.Tensor) and images.ndim == 4:
            return self.embed_tensor(images)
        return self.encode_batch(images, color_order=color_order)

    def encode_image(self, image, color_order: str = 'rgb') -> torch.Tensor:
        """Embed one image -> float32 vector of length D (on the CPU)."""
        return self.encode_batch([image], color_order=color_order)[0]


Embedder.register(ImageRetrievalModel)   # the eager model is the 'off' embedder


def autocast(device: torch.device, precision: str):
    """Return the autocast context of a precision (cache disabled: CUDA graphs need that)."""
    if precision == 'fp32':
        return contextlib.nullcontext()
    dtype = torch.float16 if precision == 'fp16' else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype, cache_enabled=False)


class NetworkUnderAutocast(nn.Module):
    """The embedder's network on a normalised float batch, in its runtime precision."""

    def __init__(self, model: nn.Module, device: torch.device, precision: str):
        """Wrap `model` (not copied: it shares the weights)."""
        super().__init__()
        self.model = model
        self.device_ = device
        self.precision = precision

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map a normalised Bx3xHxW batch to float32 BxD embeddings."""
        x = x.contiguous(memory_format=torch.channels_last)
        with autocast(self.device_, self.precision):
            return self.model(x).float()


@dataclasses.dataclass
class BuildRequest:
    """What a backend module's `build(request)` gets: the model and the options it may need."""

    model: ImageRetrievalModel      # placed by to_runtime, in eval mode
    network: NetworkUnderAutocast   # the model in its runtime precision (the eager runner's)
    batch_sizes: Tuple[int, ...] = DEFAULT_BATCH_SIZES   # CUDA graphs captured up front
    cache_dir: Optional[Path] = None       # where exports and compiled packages are kept
    calibration: Optional[torch.Tensor] = None   # int8: network-input batch of map images

    @property
    def device(self) -> torch.device:
        """Return the model's device."""
        return torch.device(self.model.device)

    @property
    def precision(self) -> str:
        """Return the model's runtime precision."""
        return self.model.precision

    @property
    def config(self) -> ModelConfig:
        """Return the model's config."""
        return self.model.config


class BackendEmbedder(Embedder):
    """
    The model's inference calls through one backend (built and checked by `registry`).

    `runner` maps a normalised batch to embeddings; a runner with a `frames(arrays,
    color_order)` method (CUDA graphs) also takes runs of same-shape uint8 frames whole.
    It shares the model's weights (nothing is copied except where a backend packs them); a
    model trained further afterwards needs a new embedder.
    """

    def __init__(self, model: ImageRetrievalModel, runner: Callable, requested: str,
                 fallback_reason: Optional[str] = None,
                 batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES, uint8_resize: bool = True):
        """Wrap a model placed by `to_runtime` and the backend that runs it."""
        self.model = model
        self.config = model.config
        self.device = torch.device(model.device)
        self.precision = model.precision
        self.runner = runner
        self.backend = runner.name
        self.requested = requested
        self.fallback_reason = fallback_reason
        self.batch_sizes = tuple(batch_sizes)
        self.uint8_resize = bool(uint8_resize)

    def fingerprint(self) -> str:
        """Return the fingerprint of the model's weights, which a backend embeds unchanged."""
        return self.model.fingerprint()

    def embed_tensor(self, batch: torch.Tensor) -> torch.Tensor:
        """Embed a normalised batch Bx3xHxW -> float32 BxD on the model's device."""
        batch = batch.to(self.device, non_blocking=True)
        with torch.inference_mode():
            return self.runner(batch).to(self.device)

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        """Embed a normalised batch (as `embed_tensor`)."""
        return self.embed_tensor(batch)

    def encode_batch(self, images: Sequence, batch_size: int = 32, color_order: str = 'rgb',
                     keep_on_device: bool = False) -> torch.Tensor:
        """
        Embed images like `ImageRetrievalModel.encode_batch` -> float32 NxD.

        On the CPU the frames are resized on uint8 pixels unless uint8_resize is off (within
        one grey level of the float resize); a runner with frame graphs takes runs of
        same-shape numpy frames whole (preprocessing included).
        """
        chunks = []
        for start in range(0, len(images), max(1, int(batch_size))):
            out = self._encode_chunk(images[start:start + batch_size], color_order)
            chunks.append(out if keep_on_device else out.cpu())
        if not chunks:
            return torch.empty((0, self.config.embedding_dim))
        return torch.cat(chunks)

    def _encode_chunk(self, images: Sequence, color_order: str) -> torch.Tensor:
        frames = getattr(self.runner, 'frames', None)
        if frames is not None and _same_shape_arrays(images):
            return frames([np.asarray(to_rgb_array(im, 'rgb')) for im in images], color_order)
        batch = prepare_batch(list(images), self.config, self.device, color_order,
                              uint8_resize=self.uint8_resize)
        return self.embed_tensor(batch)

    def warm_up(self, batch_sizes: Optional[Iterable[int]] = None,
                frame_shapes: Iterable[Tuple[int, int]] = ((480, 640),),
                color_orders: Iterable[str] = ('rgb',)) -> None:
        """Build every graph the given batch sizes and frame shapes (h, w) will need."""
        for b in sorted(set(batch_sizes or self.batch_sizes)):
            self.embed_tensor(torch.zeros((b, 3) + tuple(self.config.input_size),
                                          device=self.device))
            for order in color_orders:
                for h, w in frame_shapes:
                    self.encode_batch([np.zeros((h, w, 3), np.uint8)] * b, batch_size=b,
                                      color_order=order)

    def describe(self) -> dict:
        """Return what runs, for logs and diagnostics."""
        return {'backend': self.backend, 'requested': self.requested,
                'device': str(self.device), 'precision': self.precision,
                'batch_sizes': list(self.batch_sizes), 'uint8_resize': self.uint8_resize,
                'fallback_reason': self.fallback_reason}


def _same_shape_arrays(images: Sequence) -> bool:
    """Return True for a non-empty list of numpy uint8 HxWx3 arrays of one shape."""
    if not images:
        return False
    first = images[0]
    if not isinstance(first, np.ndarray) or first.ndim != 3 or first.shape[2] != 3:
        return False
    return all(isinstance(im, np.ndarray) and im.shape == first.shape and im.dtype == np.uint8
               for im in images)


# Compiled code is cached per Python function, not per module: every embedder (and every
# batch size and input size) adds its own entry to one forward's cache. torch's default limit
# of 8 entries would silently leave the later ones in eager mode.
MIN_RECOMPILE_LIMIT = 64


def compile_module(module: nn.Module):
    """Return torch.compile(module) for fixed-shape inference (inductor, one graph per shape)."""
    import torch._dynamo
    config = torch._dynamo.config
    for name in ('recompile_limit', 'cache_size_limit'):
        if hasattr(config, name) and getattr(config, name) < MIN_RECOMPILE_LIMIT:
            setattr(config, name, MIN_RECOMPILE_LIMIT)
    return torch.compile(module, dynamic=False, fullgraph=False)
