"""
The one typed description of a model, saved inside every weights file and every database.

Because the preprocessing (input size, normalisation, colour order) is part of this config, the
database builder, the node and the training all prepare images the same way: a database refuses a
model whose config or weights differ from the one that built it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import numbers
import os
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from taco_cvgl.errors import InputError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# EfficientNet-Lite was trained on (x - 127) / 128 of 0..255 pixels: the same on [0, 1].
LITE_MEAN = (127 / 255,) * 3
LITE_STD = (128 / 255,) * 3

BACKBONES = ('convnext_tiny', 'efficientnet_lite2')
# The mean and std ('imagenet' normalization) each backbone's ImageNet weights were trained on.
BACKBONE_MEAN_STD = {'convnext_tiny': (IMAGENET_MEAN, IMAGENET_STD),
                     'efficientnet_lite2': (LITE_MEAN, LITE_STD)}
POOLINGS = ('avg', 'gem')
# Autocast precisions of the model, by the names every entry point takes.
PRECISIONS = ('auto', 'fp32', 'fp16', 'bf16')
NORMALIZATIONS = ('imagenet', 'per_image')
# Bounds that keep a config (a file's, perhaps a hostile one) from asking for terabytes: a
# 16384 x 16384 head layer is 1 GiB in fp32, a 4096 x 4096 input 200 MB per image.
MAX_WIDTH = 16384
MAX_INPUT_PX = 4096
MAX_GEM_P = 100.0


def cache_dir_default() -> Path:
    """Return the package's cache folder: $TACO_CVGL_CACHE, else ~/.cache/taco_cvgl."""
    env = os.environ.get('TACO_CVGL_CACHE')
    return Path(env) if env else Path.home() / '.cache' / 'taco_cvgl'


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """
    Architecture and preprocessing of an `ImageRetrievalModel`.

    input_size is (height, width) in pixels after resizing. normalization 'imagenet' subtracts
    mean and divides by std (per channel, RGB order, values in [0, 1]); 'per_image' standardises
    each image's channels by their own mean and std, which cancels global exposure and white
    balance changes (useful when training from scratch on aerial imagery). mean and std left
    at None are those the backbone's ImageNet weights were trained with (BACKBONE_MEAN_STD).
    """

    backbone: str = 'convnext_tiny'
    pooling: str = 'avg'
    gem_p: float = 3.0
    embedding_dim: int = 512
    head_hidden_dim: int = 768
    dropout: float = 0.1
    input_size: Tuple[int, int] = (224, 224)
    normalization: str = 'imagenet'
    mean: Optional[Tuple[float, float, float]] = None
    std: Optional[Tuple[float, float, float]] = None

    def __post_init__(self):
        """Validate fields, so a bad config fails where it is made, naming the field."""
        if self.backbone not in BACKBONES:
            raise InputError(f'model config: backbone {self.backbone!r} is not one of {BACKBONES}')
        if self.pooling not in POOLINGS:
            raise InputError(f'model config: pooling {self.pooling!r} is not one of {POOLINGS}')
        if self.normalization not in NORMALIZATIONS:
            raise InputError(
                f'model config: normalization {self.normalization!r} is not one of '
                f'{NORMALIZATIONS}')
        for name in ('embedding_dim', 'head_hidden_dim'):
            object.__setattr__(self, name, _whole(getattr(self, name), name, 1, MAX_WIDTH))
        object.__setattr__(self, 'gem_p', _number(self.gem_p, 'gem_p', 1.0, MAX_GEM_P))
        dropout = _number(self.dropout, 'dropout', 0.0, 1.0)
        if dropout == 1.0:
            raise InputError('model config: dropout 1.0 must be in [0, 1)')
        object.__setattr__(self, 'dropout', dropout)
        # Lists arrive from JSON; keep the dataclass hashable and comparable.
        object.__setattr__(self, 'input_size', _input_size(self.input_size))
        mean, std = BACKBONE_MEAN_STD[self.backbone]
        object.__setattr__(self, 'mean', _floats(mean if self.mean is None else self.mean,
                                                 'mean', 3, positive=False))
        object.__setattr__(self, 'std', _floats(std if self.std is None else self.std,
                                                'std', 3, positive=True))

    def to_dict(self) -> Dict[str, Any]:
        """Return a JSON-serialisable dict."""
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        """Return a canonical JSON string (sorted keys), stable for hashing."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> 'ModelConfig':
        """Build from a dict, refusing unknown keys with a clear message."""
        if not isinstance(data, dict):
            raise InputError(f'model config must be a mapping of field: value, not '
                             f'{type(data).__name__}')
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(str(k) for k in set(data) - known)
        if unknown:
            raise InputError(f'model config: unknown fields {unknown}; known are {sorted(known)}')
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> 'ModelConfig':
        """Parse the JSON written by `to_json`."""
        if not isinstance(text, (str, bytes)):
            raise InputError(f'model config must be JSON text, not {type(text).__name__}')
        try:
            data = json.loads(text)
        except (ValueError, RecursionError) as exc:   # RecursionError: deeply nested input
            raise InputError(f'model config is not valid JSON: {exc}') from None
        return cls.from_dict(data)

    def digest(self) -> str:
        """Return a short hash of the config alone."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]


def _whole(value, name: str, low: int, high: int) -> int:
    """Return value as an int in [low, high], or refuse it naming the field."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) \
            or not low <= value <= high:
        raise InputError(f'model config: {name} {value!r} must be a whole number in '
                         f'[{low}, {high}]')
    return int(value)


def _number(value, name: str, low: float, high: float) -> float:
    """Return value as a float in [low, high] (NaN is not), or refuse it naming the field."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) \
            or not low <= value <= high:
        raise InputError(f'model config: {name} {value!r} must be a number in [{low}, {high}]')
    return float(value)


def _input_size(value) -> Tuple[int, int]:
    """Return (height, width) as ints in [32, MAX_INPUT_PX], from a tuple or a JSON list."""
    items = tuple(value) if isinstance(value, (tuple, list)) else ()
    if len(items) != 2:
        raise InputError(f'model config: input_size {value!r} must be (height, width)')
    return tuple(_whole(v, 'input_size', 32, MAX_INPUT_PX) for v in items)


def _floats(value, name: str, count: int, positive: bool) -> Tuple[float, ...]:
    """Return `count` finite floats (positive ones where asked), or refuse naming the field."""
    items = tuple(value) if isinstance(value, (tuple, list)) else ()
    good = len(items) == count and all(
        isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)
        and (v > 0 or not positive) for v in items)
    if not good:
        kind = 'positive' if positive else 'finite'
        raise InputError(f'model config: {name} {value!r} must be {count} {kind} numbers')
    return tuple(float(v) for v in items)
