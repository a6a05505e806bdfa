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
import os
from pathlib import Path
from typing import Any, Dict, Tuple

from taco_cvgl.errors import InputError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

BACKBONES = ('convnext_tiny',)
POOLINGS = ('avg', 'gem')
NORMALIZATIONS = ('imagenet', 'per_image')


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
    balance changes (useful when training from scratch on aerial imagery).
    """

    backbone: str = 'convnext_tiny'
    pooling: str = 'avg'
    gem_p: float = 3.0
    embedding_dim: int = 512
    head_hidden_dim: int = 768
    dropout: float = 0.1
    input_size: Tuple[int, int] = (224, 224)
    normalization: str = 'imagenet'
    mean: Tuple[float, float, float] = IMAGENET_MEAN
    std: Tuple[float, float, float] = IMAGENET_STD

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
        if self.embedding_dim < 1 or self.head_hidden_dim < 1:
            raise InputError('model config: embedding_dim and head_hidden_dim must be positive')
        if not 0.0 <= self.dropout < 1.0:
            raise InputError(f'model config: dropout {self.dropout} must be in [0, 1)')
        size = tuple(int(v) for v in self.input_size)
        if len(size) != 2 or min(size) < 32:
            raise InputError(f'model config: input_size {self.input_size} must be (h, w) >= 32')
        # Lists arrive from JSON; keep the dataclass hashable and comparable.
        object.__setattr__(self, 'input_size', size)
        object.__setattr__(self, 'mean', tuple(float(v) for v in self.mean))
        object.__setattr__(self, 'std', tuple(float(v) for v in self.std))

    def to_dict(self) -> Dict[str, Any]:
        """Return a JSON-serialisable dict."""
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        """Return a canonical JSON string (sorted keys), stable for hashing."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> 'ModelConfig':
        """Build from a dict, refusing unknown keys with a clear message."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InputError(f'model config: unknown fields {unknown}; known are {sorted(known)}')
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> 'ModelConfig':
        """Parse the JSON written by `to_json`."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(f'model config is not valid JSON: {exc}') from None
        return cls.from_dict(data)

    def digest(self) -> str:
        """Return a short hash of the config alone."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]
