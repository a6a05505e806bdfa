"""
Image -> network input tensor, exactly as described by a `ModelConfig`.

Images enter as uint8 arrays HxWx3 in RGB order (the core's convention). Resizing and
normalisation run in torch, so on a GPU the uint8 pixels are uploaded once (4x smaller than float)
and the rest happens on the device. The same function serves training, database building and the
node, which is what keeps their embeddings comparable.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

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


def mean_std(config: ModelConfig, device,
             dtype=torch.float32) -> Tuple[torch.Tensor, torch.Tensor]:
    """Return the config's per-channel mean and std as 1x3x1x1 tensors on `device`."""
    mean = torch.tensor(config.mean, device=device, dtype=dtype).view(1, 3, 1, 1)
    std = torch.tensor(config.std, device=device, dtype=dtype).view(1, 3, 1, 1)
    return mean, std


def normalize(batch: torch.Tensor, config: ModelConfig,
              stats: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
    """
    Normalise a float batch Bx3xHxW with values in [0, 1] as the config says.

    stats: `mean_std(config, device)` made once beforehand, for callers that cannot afford
    the host-to-device copy of the constants on each call (a CUDA graph cannot capture it).
    """
    if config.normalization == 'per_image':
        mean = batch.mean(dim=(2, 3), keepdim=True)
        std = batch.std(dim=(2, 3), keepdim=True).clamp_min(1e-3)
        return (batch - mean) / std
    mean, std = stats if stats is not None else mean_std(config, batch.device, batch.dtype)
    return (batch - mean) / std


def resize(image: torch.Tensor, size) -> torch.Tensor:
    """Resize a float 3xHxW or Bx3xHxW tensor to size (h, w) with antialiasing."""
    batched = image.ndim == 4
    x = image if batched else image.unsqueeze(0)
    if tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x, size=tuple(size), mode='bilinear', align_corners=False,
                          antialias=True)
    return x if batched else x[0]


def resize_uint8(image: torch.Tensor, size) -> torch.Tensor:
    """
    Resize a uint8 3xHxW CPU tensor to size (h, w), antialiased bilinear, on uint8 pixels.

    torch has a vectorised uint8 kernel for channels_last images (about 40x faster than the
    float path on a CPU); its output differs from `resize` only by the rounding to whole grey
    levels (at most one level).
    """
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    nhwc = image.unsqueeze(0).contiguous(memory_format=torch.channels_last)
    return F.interpolate(nhwc, size=tuple(size), mode='bilinear', align_corners=False,
                         antialias=True)[0]


def prepare_batch(images: Sequence, config: ModelConfig, device: torch.device,
                  color_order: str = 'rgb', uint8_resize: bool = False) -> torch.Tensor:
    """
    Turn images of any sizes into one normalised float32 batch Bx3xHxW on `device`.

    Images may be numpy arrays, PIL images or 3xHxW tensors (those already on the device are
    used in place: GPU-decoded JPEGs). uint8_resize (CPU only) resizes on uint8 pixels
    (`resize_uint8`), within one grey level of the float resize.
    """
    if len(images) == 0:
        raise InputError('no images to prepare')
    device = torch.device(device)
    uint8_resize = uint8_resize and device.type == 'cpu'
    out = torch.empty((len(images), 3) + tuple(config.input_size), device=device)
    for i, image in enumerate(images):
        tensor = image_to_tensor(image, color_order)
        if uint8_resize:
            tensor = resize_uint8(tensor.cpu(), config.input_size)
        if device.type == 'cuda' and not tensor.is_cuda and not tensor.is_pinned():
            tensor = tensor.pin_memory()
        tensor = tensor.to(device, non_blocking=True).float().div_(255.0)
        out[i] = resize(tensor, config.input_size)
    return normalize(out, config)


def frames_to_input(frames: torch.Tensor, config: ModelConfig, color_order: str = 'rgb',
                    stats: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
    """
    Turn a uint8 BxHxWx3 batch of same-size frames into the network input, on its device.

    The operations are `prepare_batch`'s (divide by 255, antialiased bilinear resize,
    normalise), in a form a CUDA graph can capture when `stats` is given.
    """
    if color_order not in ('rgb', 'bgr'):
        raise InputError(f"color_order must be 'rgb' or 'bgr', got {color_order!r}")
    x = frames.permute(0, 3, 1, 2)
    if color_order == 'bgr':
        x = x.flip(1)
    x = resize(x.float().div(255.0), config.input_size)
    return normalize(x, config, stats)
