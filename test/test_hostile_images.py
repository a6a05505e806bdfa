"""
Hostile images: headers that claim huge sizes, corrupt bytes, and the CLI and node around them.

A decoder allocates what the header claims, so these files are made small here and must be
refused from the header (image_codec.check_image_header) before anything is decoded.
"""

import functools
import json
import math
from pathlib import Path
import random
import struct
import time
import zlib

import cv2
import numpy as np
import pytest
from sensor_msgs.msg import CompressedImage, Image
from taco_cvgl.errors import InputError
from taco_cvgl.files import image_codec
from taco_cvgl.files.image_codec import OversizedImageError
from taco_cvgl.localization.localizer import Match, Measurement
from taco_cvgl.localization.settings import NodeParams

BOMB_SIDE = 20000   # 20000 x 20000 = 400 MP: 1.2 GB once decoded to RGB
BOMB_TEXT = 'image is 20000 x 20000 = 400 MP, over the limit of 50 MP (max_image_pixels)'


def png_chunk(kind: bytes, body: bytes) -> bytes:
    """Return one PNG chunk: length, type, body, CRC over type and body."""
    return struct.pack('>I', len(body)) + kind + body + struct.pack('>I', zlib.crc32(kind + body))


@functools.lru_cache(maxsize=1)
def real_bomb_png(side: int = BOMB_SIDE) -> bytes:
    """Return a fully valid side x side 1-bit grey PNG: 50 MB of zero rows deflate to 0.2 MB."""
    row = bytes(1 + (side + 7) // 8)  # filter byte 0, then side bits
    raw = zlib.compress(row * side, 1)
    ihdr = struct.pack('>IIBBBBB', side, side, 1, 0, 0, 0, 0)  # 1-bit greyscale
    return (b'\x89PNG\r\n\x1a\n' + png_chunk(b'IHDR', ihdr) + png_chunk(b'IDAT', raw)
            + png_chunk(b'IEND', b''))


def patched_png(data: bytes, width: int, height: int, fix_crc: bool = True) -> bytes:
    """Return a PNG whose IHDR claims width x height (the pixel data stays tiny)."""
    out = bytearray(data)
    out[16:24] = struct.pack('>II', width, height)
    if fix_crc:
        out[29:33] = struct.pack('>I', zlib.crc32(bytes(out[12:29])))
    return bytes(out)


def patched_jpeg(data: bytes, width: int, height: int) -> bytes:
    """Return a JPEG whose start-of-frame (SOF0, OpenCV's baseline) claims width x height."""
    out = bytearray(data)
    sof = out.index(b'\xff\xc0')
    out[sof + 5:sof + 9] = struct.pack('>HH', height, width)
    return bytes(out)


def encoded(rgb: np.ndarray, ext: str) -> bytes:
    ok, data = cv2.imencode(ext, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    assert ok
    return data.tobytes()


@pytest.fixture(scope='module')
def crop(small_map):
    """Return a real 64 x 48 photo crop: small, so that each decode in the fuzz loop is quick."""
    return np.ascontiguousarray(small_map.places[0][0][:48, :64])


def test_real_bomb_png_is_refused_from_its_header(tmp_path):
    bomb = real_bomb_png()
    assert len(bomb) < 300_000  # small on disk
    path = tmp_path / 'bomb.png'
    path.write_bytes(bomb)
    started = time.monotonic()
    with pytest.raises(OversizedImageError) as err:
        image_codec.load_image_file(path)
    assert str(err.value) == f'image file {path}: {BOMB_TEXT}'
    msg = CompressedImage(format='png', data=bomb)
    with pytest.raises(OversizedImageError, match='20000 x 20000 = 400 MP'):
        image_codec.decode_msg(msg)
    # build-db's GPU loader reads the bytes itself (for nvJPEG): it refuses them the same way.
    from taco_cvgl.inference.gpu_decode import _read
    assert str(_read(str(path))) == f'image file {path}: {BOMB_TEXT}'
    # Decoding 400 MP takes seconds; reading 24 header bytes does not.
    assert time.monotonic() - started < 1.0


def test_tiny_files_claiming_huge_sizes_raise_input_error(crop, tmp_path):
    """69-byte-style bombs in every format route: PNG, JPEG, and BMP through Pillow's header."""
    png = patched_png(encoded(crop, '.png'), BOMB_SIDE, BOMB_SIDE)
    jpeg = patched_jpeg(encoded(crop, '.jpg'), BOMB_SIDE, BOMB_SIDE)
    for name, data in (('a.png', png), ('a.jpg', jpeg)):
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(OversizedImageError) as err:
            image_codec.load_image_file(path)
        assert str(err.value) == f'image file {path}: {BOMB_TEXT}'
        with pytest.raises(OversizedImageError, match='20000 x 20000'):
            image_codec.decode_compressed('', data)
    bmp = bytearray(encoded(crop, '.bmp'))
    for side, text in ((10000, 'image is 10000 x 10000 = 100 MP, over the limit of 50 MP'),
                       (30000, 'exceeds limit')):  # 900 MP: Pillow's own 179 MP limit first
        bmp[18:26] = struct.pack('<ii', side, side)  # BITMAPINFOHEADER width, height
        path = tmp_path / f'{side}.bmp'
        path.write_bytes(bytes(bmp))
        with pytest.raises(OversizedImageError, match=f'{side}.bmp: .*{text}.*max_image_pixels'):
            image_codec.load_image_file(path)


def test_raw_image_claiming_huge_size_is_refused_before_its_data():
    # Ten bytes of data: the size check must come first, not the "data too short" check.
    msg = Image(height=BOMB_SIDE, width=BOMB_SIDE, encoding='rgb8', step=3 * BOMB_SIDE,
                data=bytes(10))
    with pytest.raises(OversizedImageError, match='20000 x 20000 = 400 MP'):
        image_codec.decode_msg(msg)


def test_the_limit_is_a_keyword_with_an_exact_boundary(crop):
    """64 x 48 = 3072 pixels: accepted at a limit of 3072, refused at 3071, in every decoder."""
    enc, height, width, step, data = image_codec.encode_raw(crop, 'rgb8')
    raw = Image(height=height, width=width, encoding=enc, step=step, data=data)
    compressed = CompressedImage(format='png', data=encoded(crop, '.png'))
    for msg in (raw, compressed):
        assert image_codec.decode_msg(msg, max_pixels=3072).shape == (48, 64, 3)
        with pytest.raises(OversizedImageError,
                           match=r'64 x 48 = 0.003072 MP, over the limit of 0.003071 MP'):
            image_codec.decode_msg(msg, max_pixels=3071)


def test_max_image_pixels_setting():
    assert NodeParams().max_image_pixels == 50_000_000 == image_codec.MAX_IMAGE_PIXELS
    assert NodeParams(max_image_pixels=1000).max_image_pixels == 1000
    with pytest.raises(InputError, match='parameter max_image_pixels: 0 is not allowed'):
        NodeParams(max_image_pixels=0)


def fuzz_variants(png: bytes, jpeg: bytes, seed: int = 0):
    """Yield (name, format, data, must_be_oversized): truncations, byte flips, huge headers."""
    rng = random.Random(seed)
    for fmt, data in (('png', png), ('jpeg', jpeg)):
        for i in range(10):
            cut = rng.randrange(1, len(data))
            yield f'{fmt} cut at {cut}', fmt, data[:cut], False
        for i in range(12):
            flipped = bytearray(data)
            span = 64 if i % 2 else len(data)  # half of them in the header
            for _ in range(rng.randint(1, 4)):
                flipped[rng.randrange(span)] ^= rng.randrange(1, 256)
            yield f'{fmt} flip {i}', fmt, bytes(flipped), False
    for i in range(8):
        # Both sides at least 7072: 7072^2 = 50.01 MP, just over the 50 MP default.
        width, height = rng.randint(7072, 65535), rng.randint(7072, 65535)
        yield f'png claims {width}x{height}', 'png', patched_png(png, width, height,
                                                                 fix_crc=i % 2 == 0), True
        yield f'jpeg claims {width}x{height}', 'jpeg', patched_jpeg(jpeg, width, height), True


def test_fuzzed_images_decode_or_raise_input_error(crop, tmp_path):
    """Every variant gives a valid small RGB array or InputError, never anything else."""
    variants = list(fuzz_variants(encoded(crop, '.png'), encoded(crop, '.jpg')))
    assert len(variants) == 60
    path = tmp_path / 'fuzz'
    started = time.monotonic()
    for name, fmt, data, oversized in variants:
        path.write_bytes(data)
        for decode in (lambda: image_codec.decode_compressed(fmt, data),
                       lambda: image_codec.load_image_file(path)):
            try:
                image = decode()
            except InputError as err:
                assert not oversized or isinstance(err, OversizedImageError), (name, err)
                continue
            assert not oversized, f'{name}: decoded instead of refused'
            assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3, name
            assert image.shape[0] * image.shape[1] <= image_codec.MAX_IMAGE_PIXELS, name
    assert time.monotonic() - started < 3.0


def test_json_of_a_measurement_without_values_is_strict_json():
    nan = float('nan')
    m = Measurement(timestamp=None, fix=False, latitude=nan, longitude=nan, altitude=nan,
                    heading=nan, heading_variance=math.inf,
                    position_covariance=np.full((3, 3), math.inf), confidence=nan,
                    matches=[Match(2, 'p.png', 1.5, nan, nan, 0.25)])
    text = json.dumps(m.to_dict(), allow_nan=False)  # raises on any NaN or inf left
    line = json.loads(text)
    assert line['latitude'] is None and line['altitude'] is None and line['confidence'] is None
    assert line['position_covariance'] == [None] * 9
    assert line['top_k'] == [{'index': 2, 'image_id': 'p.png', 'latitude': 1.5,
                              'longitude': None, 'heading': None, 'similarity': 0.25}]


def strict_json(line: str):
    """Parse one line as JSON proper: NaN and Infinity are not JSON."""
    def refuse(word):
        raise ValueError(f'not JSON: {word}')
    return json.loads(line, parse_constant=refuse)


def test_localize_answers_the_good_files_around_bad_ones(small_map, tmp_path, capsys):
    """[good, bomb, over the params file's limit, unreadable path, good]: 2 answers, 3 errors."""
    from taco_cvgl.cli.localize import main

    params = tmp_path / 'params.yaml'
    params.write_text('/**:\n  ros__parameters:\n    max_image_pixels: 400000\n')
    bomb = tmp_path / 'bomb.png'
    bomb.write_bytes(real_bomb_png())
    big = tmp_path / 'big.png'  # 720 x 600 = 432000 pixels: over 400000, far under 50 MP
    cv2.imwrite(str(big), cv2.resize(cv2.imread(str(small_map.images_dir / 'place_02.png')),
                                     (720, 600)))
    good = [small_map.images_dir / 'place_03.png', small_map.images_dir / 'place_05.png']
    null = Path(str(tmp_path / 'nul') + '\0.png')  # open() raises ValueError, not OSError
    images = [good[0], bomb, big, null, good[1]]
    rc = main(['--db', str(small_map.db), '--weights', str(small_map.weights), '--json',
               '--top-k', '1', '--device', 'cpu', '--params-file', str(params),
               *map(str, images)])
    out, err = capsys.readouterr()
    assert rc == 1
    lines = [strict_json(line) for line in out.splitlines()]
    assert [line['image'] for line in lines] == [str(p) for p in images]
    for line, place in ((lines[0], 3), (lines[4], 5)):
        assert 'error' not in line and line['top_k'][0]['index'] == place
    assert lines[1]['error'] == f'image file {bomb}: image is 20000 x 20000 = 400 MP, over ' \
        'the limit of 0.4 MP (max_image_pixels)'
    assert lines[2]['error'] == f'image file {big}: image is 720 x 600 = 0.432 MP, over the ' \
        'limit of 0.4 MP (max_image_pixels)'
    assert 'ValueError' in lines[3]['error'] and 'null byte' in lines[3]['error']
    assert err.splitlines() == [f'taco-cvgl: error: {lines[i]["error"]}' for i in (1, 2, 3)]


def test_node_counts_oversized_messages_apart():
    """The node's Counters: an oversized message is a bad one, also counted on its own."""
    from taco_cvgl.ros.node import Counters

    counters = Counters(received=3)
    for msg in (Image(height=BOMB_SIDE, width=BOMB_SIDE, encoding='rgb8', step=3 * BOMB_SIDE),
                CompressedImage(format='png', data=real_bomb_png()),
                Image(height=2, width=2, encoding='32FC7', step=8)):
        with pytest.raises(InputError) as err:
            image_codec.decode_msg(msg)
        counters.count_bad(err.value)
    assert (counters.bad, counters.oversized) == (3, 2)
    assert counters.problems(Counters()) == ['3 bad image message(s) (2 over max_image_pixels)']
    assert counters.problems(counters) == ['no images']
