"""
Decode and encode ROS image message fields without ROS.

The core's image convention: a numpy ``uint8`` array of shape (H, W, 3) in RGB order, C-contiguous.
This module turns the fields of ``sensor_msgs/msg/Image`` (encoding, height, width, step, data,
is_bigendian) and ``sensor_msgs/msg/CompressedImage`` (format, data) into that convention and back.
It imports neither rclpy nor any message package, so it works on messages from rclpy, from the
``rosbags`` deserializer, or on plain fields.

Conventions (the same as cv_bridge where cv_bridge defines them):
- ``8UC1`` is mono8, ``8UC3`` is bgr8, ``8UC4`` is bgra8, ``16UC1`` is mono16, ``16UC3`` is bgr16,
  ``16UC4`` is bgra16.
- 16-bit samples are reduced to 8 bits by keeping the high byte (v >> 8, as OpenCV does), so an
  8-bit value v stored as v * 257 decodes back to v exactly. ``is_bigendian`` selects the byte
  order.
- Alpha channels are dropped; mono images are replicated to three channels.
- ``yuv422`` is UYVY and ``yuv422_yuy2`` is YUYV (sensor_msgs' deprecated names for ``uyvy`` and
  ``yuyv``); YUV data is BT.601 limited range, as OpenCV converts it.
- ``nv12`` / ``nv21``: a Y plane of ``height`` rows followed by an interleaved chroma plane of
  ``height / 2`` rows (UV for nv12, VU for nv21), every row ``step`` bytes long.
- Bayer patterns name the colours of the top-left 2x2 cell row by row: ``bayer_rggb8`` has red at
  (row 0, col 0) and blue at (row 1, col 1).
"""

from __future__ import annotations

import io
from pathlib import Path
import re
from typing import Any, NamedTuple
import warnings

import cv2
import numpy as np
from taco_cvgl.errors import InputError


class _Layout(NamedTuple):
    """How one raw encoding lays out its pixels."""

    channels: int      # samples per pixel in the data (2 for packed YUV 4:2:2)
    sample_bytes: int  # 1 or 2
    to_rgb: int | None  # cv2 colour conversion code to RGB, None when already RGB


# OpenCV's Bayer names describe the second row's pattern, so ROS bayer_rggb (R at the top left)
# is OpenCV's BayerBG; this is the mapping cv_bridge uses, and OpenCV 5 keeps these values
# (its new COLOR_BayerRGGB2RGB equals COLOR_BayerBG2RGB). The unit tests check it on a mosaic.
_BAYER_CODES = {
    'rggb': cv2.COLOR_BayerBG2RGB,
    'bggr': cv2.COLOR_BayerRG2RGB,
    'gbrg': cv2.COLOR_BayerGR2RGB,
    'grbg': cv2.COLOR_BayerGB2RGB,
}

_LAYOUTS: dict[str, _Layout] = {
    'rgb8': _Layout(3, 1, None),
    'bgr8': _Layout(3, 1, cv2.COLOR_BGR2RGB),
    'rgba8': _Layout(4, 1, cv2.COLOR_RGBA2RGB),
    'bgra8': _Layout(4, 1, cv2.COLOR_BGRA2RGB),
    'mono8': _Layout(1, 1, cv2.COLOR_GRAY2RGB),
    'rgb16': _Layout(3, 2, None),
    'bgr16': _Layout(3, 2, cv2.COLOR_BGR2RGB),
    'rgba16': _Layout(4, 2, cv2.COLOR_RGBA2RGB),
    'bgra16': _Layout(4, 2, cv2.COLOR_BGRA2RGB),
    'mono16': _Layout(1, 2, cv2.COLOR_GRAY2RGB),
    'uyvy': _Layout(2, 1, cv2.COLOR_YUV2RGB_UYVY),
    'yuyv': _Layout(2, 1, cv2.COLOR_YUV2RGB_YUY2),
}
for _pattern, _code in _BAYER_CODES.items():
    _LAYOUTS[f'bayer_{_pattern}8'] = _Layout(1, 1, _code)
    _LAYOUTS[f'bayer_{_pattern}16'] = _Layout(1, 2, _code)

# Semi-planar YUV 4:2:0: handled apart because the data holds height * 3 / 2 rows.
_NV_CODES = {'nv12': cv2.COLOR_YUV2RGB_NV12, 'nv21': cv2.COLOR_YUV2RGB_NV21}

# Other names for the layouts above: OpenCV type names as cv_bridge reads them, deprecated YUV
# names.
_ALIASES = {
    '8UC1': 'mono8',
    '8UC3': 'bgr8',
    '8UC4': 'bgra8',
    '16UC1': 'mono16',
    '16UC3': 'bgr16',
    '16UC4': 'bgra16',
    'yuv422': 'uyvy',
    'yuv422_yuy2': 'yuyv',
}

#: Every ``sensor_msgs/msg/Image`` encoding that :func:`decode_raw` and :func:`encode_raw` handle.
SUPPORTED_ENCODINGS: tuple[str, ...] = tuple(
    sorted(list(_LAYOUTS) + list(_NV_CODES) + list(_ALIASES)))

# CompressedImage codecs that OpenCV decodes; the key is the word used in the format string.
_COMPRESSED_CODECS = {
    'jpeg': 'jpeg', 'jpg': 'jpeg', 'png': 'png', 'tiff': 'tiff', 'tif': 'tiff',
    'webp': 'webp', 'bmp': 'bmp', 'jp2': 'jpeg2000',
}

# Decode to 3-channel BGR (grey replicated, alpha dropped, EXIF orientation applied) and keep
# 16-bit samples 16-bit so that the reduction to 8 bits is ours and documented.
_IMREAD_FLAGS = cv2.IMREAD_COLOR | cv2.IMREAD_ANYDEPTH

#: Default limit on the size of an image to decode, in pixels (width * height), checked from the
#: header before anything is decoded: a 4K camera gives 8.3 MP and a large aerial tile 25 MP, so
#: 50 MP leaves room for any real camera, while a 69-byte file claiming 20000 x 20000 (400 MP,
#: 1.2 GB decoded) is refused. The setting max_image_pixels (settings.py) overrides it.
MAX_IMAGE_PIXELS = 50_000_000

_PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'
# JPEG start-of-frame markers (baseline, progressive, lossless, arithmetic): they hold the size.
# C4 (DHT), C8 (JPG) and CC (DAC) share the range but are not frames.
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# JPEG markers without a length field: TEM and the restart markers RST0-7.
_JPEG_STANDALONE = frozenset([0x01, *range(0xD0, 0xD8)])

# compressed_depth_image_transport prefixes its PNG with a 12-byte header
# (int32 format + float32[2] depth quantisation parameters).
_COMPRESSED_DEPTH_HEADER_BYTES = 12


def _canonical(encoding: str) -> str:
    """Return the layout name for an encoding, or raise InputError naming it."""
    name = _ALIASES.get(encoding, encoding)
    if name in _LAYOUTS or name in _NV_CODES:
        return name
    raise InputError(
        f'unsupported image encoding {encoding!r}; supported encodings: '
        f'{", ".join(SUPPORTED_ENCODINGS)}')


def _as_uint8_buffer(data: Any, what: str) -> np.ndarray:
    """View message data (bytes, memoryview, array.array, ndarray, list) as a flat uint8 array."""
    if isinstance(data, np.ndarray):
        if data.dtype != np.uint8:
            if not data.flags['C_CONTIGUOUS']:
                data = np.ascontiguousarray(data)
            data = data.view(np.uint8)
        return data.reshape(-1)
    try:
        return np.frombuffer(data, dtype=np.uint8)
    except TypeError:
        pass
    try:
        return np.asarray(data, dtype=np.uint8).reshape(-1)
    except (TypeError, ValueError) as err:
        raise InputError(f'{what}: data of type {type(data).__name__} is not bytes') from err


class OversizedImageError(InputError):
    """An image whose header claims more pixels than the limit (max_image_pixels)."""


def _check_pixels(width: int, height: int, max_pixels: int, what: str) -> None:
    """Raise OversizedImageError when width * height exceeds max_pixels."""
    pixels = width * height
    if pixels > max_pixels:
        raise OversizedImageError(
            f'{what}: image is {width} x {height} = {pixels / 1e6:.6g} MP, over the limit of '
            f'{max_pixels / 1e6:.6g} MP (max_image_pixels)')


def _png_size(data: memoryview) -> tuple[int, int] | None:
    """Return (width, height) from a PNG's IHDR chunk (right after the signature)."""
    if len(data) < 24 or data[12:16] != b'IHDR':
        return None
    return int.from_bytes(data[16:20], 'big'), int.from_bytes(data[20:24], 'big')


def _jpeg_size(data: memoryview) -> tuple[int, int] | None:
    """Return (width, height) from a JPEG's start-of-frame segment, walking the markers to it."""
    pos = 2  # after SOI
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
        elif marker in _JPEG_STANDALONE:
            pos += 2
        elif marker in _JPEG_SOF:
            if pos + 9 > len(data):
                return None
            return (int.from_bytes(data[pos + 7:pos + 9], 'big'),
                    int.from_bytes(data[pos + 5:pos + 7], 'big'))
        else:
            length = int.from_bytes(data[pos + 2:pos + 4], 'big')
            if length < 2 or marker in (0x00, 0xD8, 0xD9, 0xDA):  # no frame before the scan
                return None
            pos += 2 + length
    return None


def _pillow_size(data: memoryview, max_pixels: int, what: str) -> tuple[int, int] | None:
    """Return (width, height) as Pillow reads them from the header (it decodes nothing yet)."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore', Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                return img.size
    except Image.DecompressionBombError as err:  # beyond Pillow's own limit, 179 MP
        raise OversizedImageError(
            f'{what}: {err}; over the limit of {max_pixels / 1e6:.6g} MP (max_image_pixels)'
        ) from None
    except Exception:  # noqa: B902 - hostile headers raise anything; all mean "no size"
        return None


def check_image_header(data: Any, what: str, kind: str = 'known',
                       max_pixels: int = MAX_IMAGE_PIXELS) -> None:
    """
    Refuse encoded image data whose header claims more than max_pixels, before decoding.

    Decoders allocate what the header claims, so a tiny file claiming 20000 x 20000 costs gigabytes
    (and Pillow ends in a DecompressionBombError). PNG and JPEG headers are read here; other
    formats through Pillow, which reads only the header. Data without a readable size is refused
    too (InputError naming `kind`, the expected codec).
    """
    view = memoryview(_as_uint8_buffer(data, what))
    if view[:8] == _PNG_SIGNATURE:
        size = _png_size(view)
    elif view[:2] == b'\xff\xd8':
        size = _jpeg_size(view)
    else:
        size = _pillow_size(view, max_pixels, what)
    if size is None:
        raise InputError(f'{what}: data is corrupt or not a {kind} image (no size in its header)')
    _check_pixels(*size, max_pixels, what)


def _to_8bit(samples: np.ndarray) -> np.ndarray:
    """Reduce native uint16 samples to uint8 by keeping the high byte."""
    return (samples >> 8).astype(np.uint8)


def decode_raw(encoding: str, height: int, width: int, step: int, data: Any,
               is_bigendian: bool = False, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """
    Decode ``sensor_msgs/msg/Image`` fields to an (H, W, 3) uint8 RGB array.

    ``step`` is the length of one row in bytes (it may include padding at the end of each row);
    ``data`` must hold at least ``step * height`` bytes (``step * height * 3 / 2`` for nv12/nv21).
    Raises InputError naming the encoding and sizes when the fields are inconsistent, and
    OversizedImageError when height * width exceeds max_pixels (before the data is touched).
    """
    height, width, step = int(height), int(width), int(step)
    what = f'image {width}x{height} encoding {encoding!r} step {step}'
    name = _canonical(encoding)
    if height <= 0 or width <= 0:
        raise InputError(f'{what}: image has zero size')
    _check_pixels(width, height, max_pixels, what)
    buf = _as_uint8_buffer(data, what)

    if name in _NV_CODES:
        if height % 2 or width % 2:
            raise InputError(f'{what}: {name} needs an even width and height')
        rows, row_bytes = height * 3 // 2, width
    else:
        layout = _LAYOUTS[name]
        if layout.channels == 2 and width % 2:
            raise InputError(f'{what}: {name} packs two pixels in 4 bytes, needs an even width')
        rows, row_bytes = height, width * layout.channels * layout.sample_bytes
    if step < row_bytes:
        raise InputError(
            f'{what}: step is smaller than the {row_bytes} bytes that {width} pixels need')
    if buf.size < step * rows:
        raise InputError(
            f'{what}: data has {buf.size} bytes, expected at least {step * rows} '
            f'({rows} rows of {step} bytes)')

    # A (rows, row_bytes) view that skips the row padding; nothing is copied yet.
    view = buf[:step * rows].reshape(rows, step)[:, :row_bytes]
    try:
        if name in _NV_CODES:
            return cv2.cvtColor(view, _NV_CODES[name])
        if layout.sample_bytes == 2:
            order = '>' if is_bigendian else '<'
            samples = view.view(np.dtype(f'{order}u2')).astype(np.uint16)
            if layout.to_rgb in _BAYER_CODES.values():
                # Demosaic at full depth, then reduce: cheaper and more exact than the reverse.
                return _to_8bit(cv2.cvtColor(samples, layout.to_rgb))
            pixels = _to_8bit(samples)
        else:
            pixels = view
        if layout.channels > 1:
            pixels = pixels.reshape(height, width, layout.channels)
        if layout.to_rgb is None:
            return np.array(pixels, dtype=np.uint8, order='C', copy=True)
        return cv2.cvtColor(pixels, layout.to_rgb)
    except cv2.error as err:
        raise InputError(f'{what}: OpenCV could not convert it: {err}') from err


def _compressed_codec(fmt: str) -> str:
    """Return the codec a CompressedImage format string names ('' when the string is empty)."""
    words = [w for w in re.split(r'[;\s]+', fmt.strip().lower()) if w]
    if not words:
        return ''
    for word in words:
        if word in _COMPRESSED_CODECS:
            return _COMPRESSED_CODECS[word]
    raise InputError(
        f'unsupported CompressedImage format {fmt!r}; supported codecs: '
        f'{", ".join(sorted(set(_COMPRESSED_CODECS.values())))}')


def decode_compressed(fmt: str, data: Any, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """
    Decode ``sensor_msgs/msg/CompressedImage`` fields to an (H, W, 3) uint8 RGB array.

    ``fmt`` is the message's format field, such as 'jpeg', 'png', 'bgr8; jpeg compressed bgr8' or
    '16UC1; compressedDepth png'; an empty format lets the decoder recognise the data.
    16-bit PNGs are reduced to 8 bits by keeping the high byte. Corrupt or truncated data raises
    InputError; a header claiming more than max_pixels raises OversizedImageError.
    """
    codec = _compressed_codec(fmt)
    buf = _as_uint8_buffer(data, f'CompressedImage format {fmt!r}')
    what = f'CompressedImage format {fmt!r} ({buf.size} bytes)'
    if 'compresseddepth' in fmt.lower():
        buf = buf[_COMPRESSED_DEPTH_HEADER_BYTES:]
    if buf.size == 0:
        raise InputError(f'{what}: no image data')
    check_image_header(buf, what, codec or 'known', max_pixels)
    if codec == 'jpeg' and buf[:2].tobytes() == b'\xff\xd8':
        # libjpeg decodes a truncated JPEG with a grey bottom and only a warning; a complete one
        # contains the end-of-image marker FF D9 (possibly followed by padding).
        if buf.tobytes().rfind(b'\xff\xd9') < 2:
            raise InputError(f'{what}: JPEG data is truncated (no end-of-image marker)')
    try:
        image = cv2.imdecode(buf, _IMREAD_FLAGS)
    except cv2.error as err:
        raise InputError(f'{what}: cannot decode: {err}') from err
    if image is None or image.size == 0:
        raise InputError(f'{what}: data is corrupt or not a {codec or "known"} image')
    return _decoded_to_rgb(image, what)


def _decoded_to_rgb(image: np.ndarray, what: str) -> np.ndarray:
    """Convert an OpenCV-decoded image (gray, BGR or BGRA; 8 or 16 bit) to (H, W, 3) uint8 RGB."""
    if image.dtype == np.uint16:
        image = _to_8bit(image)
    elif image.dtype != np.uint8:
        raise InputError(f'{what}: unsupported sample type {image.dtype}')
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    channels = image.shape[2]
    if channels == 1:
        return cv2.cvtColor(image[:, :, 0], cv2.COLOR_GRAY2RGB)
    if channels == 3:
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    if channels == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2RGB)
    raise InputError(f'{what}: unsupported number of channels {channels}')


def _check_rgb(rgb: Any) -> np.ndarray:
    """Return rgb as a C-contiguous (H, W, 3) uint8 array or raise InputError."""
    arr = np.asarray(rgb)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise InputError(
            f'expected an (H, W, 3) uint8 RGB image, got shape {arr.shape} dtype {arr.dtype}')
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise InputError(f'image of shape {arr.shape} has zero size')
    return np.ascontiguousarray(arr)


def _to_16bit(samples: np.ndarray) -> np.ndarray:
    """Widen uint8 samples to little-endian uint16 so that v maps to v * 257 (full range)."""
    return (samples.astype('<u2') * 257).astype('<u2')


def encode_raw(rgb: np.ndarray, encoding: str = 'bgr8') -> tuple[str, int, int, int, bytes]:
    """
    Encode an (H, W, 3) uint8 RGB image as ``sensor_msgs/msg/Image`` fields.

    Returns (encoding, height, width, step, data) with rows packed without padding and 16-bit
    samples little-endian (so ``is_bigendian`` is 0). Every encoding in SUPPORTED_ENCODINGS is
    accepted; YUV encodings need an even width (and nv12/nv21 an even height).
    """
    rgb = _check_rgb(rgb)
    name = _canonical(encoding)
    height, width = rgb.shape[:2]
    if name in _NV_CODES:
        if height % 2 or width % 2:
            raise InputError(f'{encoding}: needs an even width and height, got {width}x{height}')
        # I420 is the Y plane, then the U plane, then the V plane (each chroma plane h/2 x w/2).
        i420 = cv2.cvtColor(rgb, cv2.COLOR_RGB2YUV_I420).reshape(-1)
        luma, chroma = i420[:height * width], i420[height * width:].reshape(2, -1)
        if name == 'nv21':
            chroma = chroma[::-1]
        packed = np.concatenate([luma, chroma.T.reshape(-1)])
        return encoding, height, width, width, packed.tobytes()
    if name in ('uyvy', 'yuyv'):
        if width % 2:
            raise InputError(f'{encoding}: needs an even width, got {width}')
        code = cv2.COLOR_RGB2YUV_UYVY if name == 'uyvy' else cv2.COLOR_RGB2YUV_YUY2
        pixels = cv2.cvtColor(rgb, code)
    elif name.startswith('bayer_'):
        pixels = _mosaic(rgb, name[len('bayer_'):len('bayer_') + 4])
    else:
        base = name.rstrip('0123456789')
        pixels = {
            'rgb': lambda: rgb,
            'bgr': lambda: cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR),
            'rgba': lambda: cv2.cvtColor(rgb, cv2.COLOR_RGB2RGBA),
            'bgra': lambda: cv2.cvtColor(rgb, cv2.COLOR_RGB2BGRA),
            'mono': lambda: cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY),
        }[base]()
    if _LAYOUTS[name].sample_bytes == 2:
        pixels = _to_16bit(pixels)
    data = np.ascontiguousarray(pixels).tobytes()
    return encoding, height, width, len(data) // height, data


def _mosaic(rgb: np.ndarray, pattern: str) -> np.ndarray:
    """Sample an RGB image into a single-channel Bayer mosaic with the given 2x2 pattern."""
    mosaic = np.empty(rgb.shape[:2], dtype=np.uint8)
    channel = {'r': 0, 'g': 1, 'b': 2}
    for index, colour in enumerate(pattern):
        dy, dx = divmod(index, 2)
        mosaic[dy::2, dx::2] = rgb[dy::2, dx::2, channel[colour]]
    return mosaic


def encode_compressed(rgb: np.ndarray, fmt: str = 'jpeg', quality: int = 90) -> tuple[str, bytes]:
    """
    Encode an (H, W, 3) uint8 RGB image as ``sensor_msgs/msg/CompressedImage`` fields.

    ``fmt`` is 'jpeg' or 'png'; ``quality`` (0-100) applies to JPEG. Returns (format, data) with
    the format string image_transport writes ('rgb8; jpeg compressed bgr8': the source was rgb8,
    the file holds ordinary BGR-ordered colour as every JPEG/PNG decoder expects).
    """
    rgb = _check_rgb(rgb)
    codec = fmt.strip().lower()
    if codec in ('jpeg', 'jpg'):
        codec, ext, params = 'jpeg', '.jpg', [cv2.IMWRITE_JPEG_QUALITY, int(quality)]
    elif codec == 'png':
        ext, params = '.png', [cv2.IMWRITE_PNG_COMPRESSION, 3]
    else:
        raise InputError(f'unsupported compressed format {fmt!r}; use jpeg or png')
    ok, encoded = cv2.imencode(ext, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), params)
    if not ok:
        raise InputError(f'OpenCV could not encode a {rgb.shape} image as {codec}')
    return f'rgb8; {codec} compressed bgr8', encoded.tobytes()


def load_image_file(path: str | Path, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """
    Read an image file (JPEG, PNG, TIFF, ...) as an (H, W, 3) uint8 RGB array.

    16-bit files are reduced to 8 bits by keeping the high byte, alpha is dropped, grey is
    replicated. OpenCV decodes first; Pillow is the fallback for files OpenCV cannot read.
    A header claiming more than max_pixels raises OversizedImageError before any decoding.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise InputError(f'image file not found: {path}') from None
    except OSError as err:
        raise InputError(f'cannot read image file {path}: {err.strerror or err}') from None
    what = f'image file {path}'
    if not raw:
        raise InputError(f'{what} is empty')
    check_image_header(raw, what, max_pixels=max_pixels)
    image = None
    try:
        image = cv2.imdecode(np.frombuffer(raw, dtype=np.uint8), _IMREAD_FLAGS)
    except cv2.error:
        image = None
    if image is not None and image.size and image.dtype in (np.uint8, np.uint16):
        return _decoded_to_rgb(image, what)
    return _load_with_pillow(raw, what)


def _load_with_pillow(raw: bytes, what: str) -> np.ndarray:
    """Decode image bytes with Pillow (formats OpenCV lacks) or raise InputError."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore', Image.DecompressionBombWarning)  # size checked
            with Image.open(io.BytesIO(raw)) as img:
                return np.array(img.convert('RGB'), dtype=np.uint8, order='C')
    except Exception as err:  # noqa: B902 - corrupt data raises anything from Pillow's plugins
        raise InputError(f'{what} is not a readable image: {err}') from None


def decode_msg(msg: Any, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """
    Decode an Image or CompressedImage message object to an (H, W, 3) uint8 RGB array.

    Duck-typed: any object with the fields (encoding, height, width, step, data[, is_bigendian])
    or (format, data) works, whether it came from rclpy or from the rosbags deserializer.
    An image of more than max_pixels raises OversizedImageError, decoding nothing.
    """
    if hasattr(msg, 'encoding') and hasattr(msg, 'step'):
        return decode_raw(msg.encoding, msg.height, msg.width, msg.step, msg.data,
                          bool(getattr(msg, 'is_bigendian', False)), max_pixels)
    if hasattr(msg, 'format') and hasattr(msg, 'data'):
        return decode_compressed(msg.format, msg.data, max_pixels)
    raise InputError(
        f'{type(msg).__name__} is neither an Image (encoding, height, width, step, data) '
        'nor a CompressedImage (format, data) message')
