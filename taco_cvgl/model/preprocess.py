"""
Image -> network input tensor, exactly as described by a `ModelConfig`.

Images enter as uint8 arrays HxWx3 in RGB order (the core's convention). Resizing and
normalisation run in torch, so on a GPU the uint8 pixels are uploaded once (4x smaller than float)
and the rest happens on the device. The same function serves training, database building and the
node, which is what keeps their embeddings comparable.
"""

from __future__ import annotations

from typing import Sequence, Union

import numpy as np
from taco_cvgl.errors import InputError
from taco_cvgl.model.config import ModelConfig
import torch
import torch.nn.functional as F

ImageLike = Union[np.ndarray, 'PIL.Image.Image', torch.Tensor]  # noqa: F821


def to_rgb_array(image, color_order: str = 'rgb') -> np.ndarray:
    """Return an HxWx3 uint8 RGB array from a numpy array (RGB or BGR) or a PIL image."""
    if hasattr(image, 'convert') and hasattr(image, 'size'):  # PIL.Image without importing PIL
        return np.asarray(image.convert('RGB'))
    array = np.asarray(image)
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] not in (3, 4):
        raise InputError(f'image must be HxW, HxWx3 or HxWx4, got shape {array.shape}')
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise InputError(f'image is empty (shape {array.shape})')
    if array.dtype != np.uint8:
        raise InputError(f'image must be uint8, got {array.dtype}')
    array = array[:, :, :3]
    if color_order == 'bgr':
        array = array[:, :, ::-1]
    elif color_order != 'rgb':
        raise InputError(f"color_order must be 'rgb' or 'bgr', got {color_order!r}")
    return array


def image_to_tensor(image, color_order: str = 'rgb') -> torch.Tensor:
    """
    Return a uint8 tensor 3xHxW (RGB) from an array, a PIL image or a tensor.

    A tensor is taken as already RGB: uint8 3xHxW, or float 3xHxW in [0, 1].
    """
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] != 3:
            raise InputError(f'image tensor must be 3xHxW, got shape {tuple(image.shape)}')
        if image.dtype.is_floating_point:
            return (image.clamp(0, 1) * 255).round().to(torch.uint8)
        return image
    array = np.ascontiguousarray(to_rgb_array(image, color_order))
    if not array.flags.writeable:  # e.g. a view of a PIL image; torch wants writable memory
        array = array.copy()
    return torch.from_numpy(array).permute(2, 0, 1)


def normalize(batch: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    """Normalise a float batch Bx3xHxW with values in [0, 1] as the config says."""
    if config.normalization == 'per_image':
        mean = batch.mean(dim=(2, 3), keepdim=True)
        std = batch.std(dim=(2, 3), keepdim=True).clamp_min(1e-3)
        return (batch - mean) / std
    mean = torch.tensor(config.mean, device=batch.device, dtype=batch.dtype).view(1, 3, 1, 1)
    std = torch.tensor(config.std, device=batch.device, dtype=batch.dtype).view(1, 3, 1, 1)
    return (batch - mean) / std


def resize(image: torch.Tensor, size) -> torch.Tensor:
    """Resize a float 3xHxW or Bx3xHxW tensor to size (h, w) with antialiasing."""
    batched = image.ndim == 4
    x = image if batched else image.unsqueeze(0)
    if tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x, size=tuple(size), mode='bilinear', align_corners=False,
                          antialias=True)
    return x if batched else x[0]


def prepare_batch(images: Sequence, config: ModelConfig, device: torch.device,
                  color_order: str = 'rgb') -> torch.Tensor:
    """Turn images of any sizes into one normalised float32 batch Bx3xHxW on `device`."""
    if len(images) == 0:
        raise InputError('no images to prepare')
    out = torch.empty((len(images), 3) + tuple(config.input_size), device=device)
    for i, image in enumerate(images):
        tensor = image_to_tensor(image, color_order)
        if device.type == 'cuda' and not tensor.is_cuda and not tensor.is_pinned():
            tensor = tensor.pin_memory()
        tensor = tensor.to(device, non_blocking=True).float().div_(255.0)
        out[i] = resize(tensor, config.input_size)
    return normalize(out, config)
