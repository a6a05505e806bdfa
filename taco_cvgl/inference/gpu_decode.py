"""
Image files -> uint8 tensors on the device, JPEGs decoded there in batches (nvJPEG).

Database building reads many JPEG files; decoding them is what limits a CPU-bound pipeline.
`ImageFileLoader` reads the files' bytes with a thread pool and decodes every JPEG of a batch in
one call of ``torchvision.io.decode_jpeg(..., device='cuda')``; other formats, and JPEGs nvJPEG
refuses (CMYK, progressive oddities), are decoded on the CPU by `image_codec.load_image_file`.
On a CPU-only machine every file goes through `load_image_file`, exactly as before.

The result follows the core's conventions: RGB, uint8, 3 x H x W here (a tensor, ready for
`preprocess.image_to_tensor`), with the EXIF orientation applied as OpenCV applies it on the CPU,
so a database decoded on the GPU matches one decoded on the CPU up to the decoders' rounding
(a few grey levels; the embeddings' cosine stays above 0.999).

`embed_image_files` chains reading, decoding, preprocessing and the model, with the next batch's
files read while the current batch is on the GPU.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
import io
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple, Union
import warnings

import numpy as np
from taco_cvgl.errors import InputError
from taco_cvgl.files.image_codec import check_image_header, load_image_file
from taco_cvgl.model.preprocess import prepare_batch
import torch

JPEG_MAGIC = b'\xff\xd8\xff'
EXIF_ORIENTATION_TAG = 0x0112

Decoded = Union[torch.Tensor, InputError]


def is_jpeg(data: bytes) -> bool:
    """Return True when bytes start like a JPEG file (SOI marker then another marker)."""
    return bytes(data[:3]) == JPEG_MAGIC


def exif_orientation(data: bytes) -> int:
    """
    Return the EXIF orientation (1-8) of JPEG bytes; 1 when absent or unreadable.

    Pillow parses the header only (no pixel decoding).
    """
    from PIL import Image
    try:
        with Image.open(io.BytesIO(data)) as image:
            value = int(image.getexif().get(EXIF_ORIENTATION_TAG, 1))
    except Exception:  # noqa: B902 - any header problem: the decoder will say what is wrong
        return 1
    return value if 1 <= value <= 8 else 1


def apply_orientation(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """Turn a decoded CxHxW image upright as EXIF orientation 1-8 says (as OpenCV does)."""
    if orientation == 2:       # mirrored left-right
        return image.flip(-1)
    if orientation == 3:       # rotated 180 degrees
        return image.flip(-1).flip(-2)
    if orientation == 4:       # mirrored top-bottom
        return image.flip(-2)
    if orientation == 5:       # transposed (mirrored about the main diagonal)
        return image.transpose(-1, -2)
    if orientation == 6:       # shown after turning 90 degrees clockwise
        return torch.rot90(image, k=-1, dims=(-2, -1))
    if orientation == 7:       # transversed (mirrored about the anti-diagonal)
        return image.transpose(-1, -2).flip(-1).flip(-2)
    if orientation == 8:       # shown after turning 90 degrees counter-clockwise
        return torch.rot90(image, k=1, dims=(-2, -1))
    return image


def gpu_decode_status(device: Union[str, torch.device] = 'cuda') -> Tuple[bool, str]:
    """Return (usable, reason): whether nvJPEG decoding works on `device` here."""
    device = torch.device(device)
    if device.type != 'cuda':
        return False, f'device {device} is not a CUDA device'
    if not torch.cuda.is_available():
        return False, 'CUDA is not available on this machine'
    try:
        from torchvision.io import decode_jpeg  # noqa: F401
    except ImportError as exc:
        return False, f'torchvision.io.decode_jpeg is not available ({exc})'
    return True, 'nvJPEG through torchvision.io.decode_jpeg'


def _decode_call(datas: List[torch.Tensor], device: torch.device):
    from torchvision.io import decode_jpeg, ImageReadMode
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # torchvision >= 0.29 flags its decoders as deprecated
        return decode_jpeg(datas, mode=ImageReadMode.RGB, device=device)


def decode_jpegs(datas: Sequence[bytes], device: Union[str, torch.device] = 'cuda',
                 names: Optional[Sequence[str]] = None) -> List[Decoded]:
    """
    Decode JPEG bytes with torchvision in one batch on `device` (cuda: nvJPEG; or cpu).

    Returns one uint8 3xHxW RGB tensor on the device per input, upright (EXIF orientation
    applied), or an InputError naming the input when that one cannot be decoded: a batch that
    fails is decoded image by image to find the culprit, so one bad file never costs the rest.
    """
    device = torch.device(device)
    names = list(names) if names is not None else [f'image {i}' for i in range(len(datas))]
    if not datas:
        return []
    tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
    try:
        decoded = list(_decode_call(tensors, device))
    except RuntimeError:
        decoded = []
        for tensor, name in zip(tensors, names):
            try:
                decoded.append(_decode_call([tensor], device)[0])
            except RuntimeError as exc:
                decoded.append(InputError(f'{name} is not a decodable JPEG: '
                                          f'{str(exc).splitlines()[0][:200]}'))
    out: List[Decoded] = []
    for data, image in zip(datas, decoded):
        if isinstance(image, torch.Tensor):
            image = apply_orientation(image, exif_orientation(data))
        out.append(image)
    return out


def _read(path: str) -> Union[bytes, InputError]:
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return InputError(f'image file not found: {path}')
    except OSError as err:
        return InputError(f'cannot read image file {path}: {err.strerror or err}')
    if not data:
        return InputError(f'image file {path} is empty')
    try:  # nvJPEG allocates what the header claims, as the CPU decoders do
        check_image_header(data, f'image file {path}')
    except InputError as exc:
        return exc
    return data


def _cpu_load(path: str) -> Decoded:
    try:
        return torch.from_numpy(load_image_file(path)).permute(2, 0, 1)
    except InputError as exc:
        return exc


class ImageFileLoader:
    """Load image files as uint8 3xHxW RGB tensors, JPEGs decoded on the GPU in batches."""

    def __init__(self, device: Union[str, torch.device] = 'cuda', workers: int = 8,
                 gpu_decode: bool = True):
        """device: where tensors end up; gpu_decode False forces CPU decoding everywhere."""
        self.device = torch.device(device)
        usable, reason = gpu_decode_status(self.device)
        self.gpu = bool(gpu_decode and usable)
        self.reason = reason if gpu_decode else 'GPU decoding switched off'
        self.pool = ThreadPoolExecutor(max_workers=max(1, int(workers)))

    def close(self) -> None:
        """Stop the reader threads."""
        self.pool.shutdown(wait=True)

    def __enter__(self) -> 'ImageFileLoader':
        """Use as a context manager that closes the thread pool."""
        return self

    def __exit__(self, *exc) -> None:
        """Close the thread pool."""
        self.close()

    def read(self, paths: Sequence[str]):
        """Start reading the files' bytes (GPU) or decoding them (CPU); return a future list."""
        work = _read if self.gpu else _cpu_load
        return [self.pool.submit(work, str(p)) for p in paths]

    def finish(self, paths: Sequence[str], futures) -> List[Decoded]:
        """Decode what `read` started: one tensor on the device or one InputError per path."""
        results = [f.result() for f in futures]
        if not self.gpu:
            return [r if isinstance(r, InputError) else r.to(self.device) for r in results]
        out: List[Optional[Decoded]] = [None] * len(paths)
        jpeg_at = []
        for i, (path, data) in enumerate(zip(paths, results)):
            if isinstance(data, InputError):
                out[i] = data
            elif is_jpeg(data):
                jpeg_at.append(i)
            else:
                image = _cpu_load(str(path))
                out[i] = image if isinstance(image, InputError) else image.to(self.device)
        decoded = decode_jpegs([results[i] for i in jpeg_at], self.device,
                               [f'image file {paths[i]}' for i in jpeg_at])
        for i, image in zip(jpeg_at, decoded):
            if isinstance(image, InputError):  # nvJPEG refused it: the CPU decoders may not
                image = _cpu_load(str(paths[i]))
                image = image if isinstance(image, InputError) else image.to(self.device)
            out[i] = image
        return out

    def load(self, paths: Sequence[str]) -> List[Decoded]:
        """Read and decode files now."""
        return self.finish(paths, self.read(paths))


def embed_image_files(model, paths: Sequence[str], batch_size: int = 128, workers: int = 8,
                      skip_bad: bool = False,
                      on_skip: Optional[Callable[[str, str], None]] = None,
                      on_batch: Optional[Callable[[int], None]] = None,
                      gpu_decode: bool = True) -> Tuple[np.ndarray, List[int]]:
    """
    Embed image files with `model` (an Embedder: the model or a fast backend, on its device).

    Returns (float32 NxD embeddings, indices into `paths` of the embedded files). An unreadable
    file raises InputError naming it, or is skipped (reported to on_skip(path, why)) with
    skip_bad. on_batch(n) is called after each batch with the number of files it held.
    """
    device = torch.device(model.device)
    config = model.config
    chunks, kept = [], []
    starts = list(range(0, len(paths), max(1, int(batch_size))))
    with ImageFileLoader(device, workers, gpu_decode) as loader:
        pending = loader.read(paths[:batch_size]) if starts else None
        for n, start in enumerate(starts):
            batch_paths = [str(p) for p in paths[start:start + batch_size]]
            images = loader.finish(batch_paths, pending)
            if n + 1 < len(starts):  # read the next batch while this one is embedded
                following = starts[n + 1]
                pending = loader.read(paths[following:following + batch_size])
            good = []
            for offset, (path, image) in enumerate(zip(batch_paths, images)):
                if isinstance(image, InputError):
                    if not skip_bad:
                        raise image
                    if on_skip:
                        on_skip(path, str(image))
                    continue
                good.append((start + offset, image))
            if good:
                batch = prepare_batch([im for _, im in good], config, device)
                with torch.inference_mode():
                    chunks.append(model.embed_tensor(batch).float().cpu().numpy())
                kept.extend(i for i, _ in good)
            if on_batch:
                on_batch(len(batch_paths))
    if not chunks:
        return np.empty((0, config.embedding_dim), np.float32), []
    return np.concatenate(chunks).astype(np.float32, copy=False), kept
