"""Image message fields <-> the core's (H, W, 3) uint8 RGB convention."""

import array
import types

import cv2
import numpy as np
import pytest
from taco_cvgl.errors import InputError
from taco_cvgl.files import image_codec

# Encodings that keep every RGB value exactly.
LOSSLESS = {'rgb8', 'bgr8', 'rgba8', 'bgra8', 'rgb16', 'bgr16', 'rgba16', 'bgra16',
            '8UC3', '8UC4', '16UC3', '16UC4'}
MONO = {'mono8', 'mono16', '8UC1', '16UC1'}


def smooth_image(height=48, width=64):
    """Return a smooth colour image (gradients), on which chroma subsampling loses little."""
    rows, cols = np.mgrid[0:height, 0:width]
    rgb = np.stack([40 + 160 * cols / width, 30 + 180 * rows / height,
                    200 - 120 * (rows + cols) / (height + width)], axis=-1)
    return np.ascontiguousarray(rgb.astype(np.uint8))


@pytest.mark.parametrize('encoding', image_codec.SUPPORTED_ENCODINGS)
def test_round_trip_every_encoding(encoding):
    rgb = smooth_image()
    enc, height, width, step, data = image_codec.encode_raw(rgb, encoding)
    assert (enc, height, width) == (encoding, 48, 64)
    assert len(data) >= step * height
    out = image_codec.decode_raw(enc, height, width, step, data)
    assert out.shape == (48, 64, 3) and out.dtype == np.uint8
    assert out.flags['C_CONTIGUOUS'] and out.flags['WRITEABLE']
    if encoding in LOSSLESS:
        np.testing.assert_array_equal(out, rgb)
    elif encoding in MONO:
        grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
        np.testing.assert_array_equal(out, np.repeat(grey[:, :, None], 3, axis=2))
    else:
        # Chroma subsampling (YUV) and demosaicing (Bayer) blur colour a little; a swapped
        # channel or a wrong pattern would give errors of tens of levels.
        error = np.abs(out.astype(int) - rgb.astype(int))
        assert error[2:-2, 2:-2].mean() < 3.0, encoding


@pytest.mark.parametrize('encoding', ['rgb8', 'bgr8', 'bgra8', 'mono8', 'mono16', 'rgb16',
                                      'bayer_grbg8', 'bayer_bggr16', 'uyvy', 'yuyv', 'nv12',
                                      'nv21'])
def test_step_padding_is_skipped(encoding):
    rgb = smooth_image(16, 20)
    enc, height, width, step, data = image_codec.encode_raw(rgb, encoding)
    rows = len(data) // step
    pad = 6
    padded = np.full((rows, step + pad), 0xAB, dtype=np.uint8)
    padded[:, :step] = np.frombuffer(data, dtype=np.uint8).reshape(rows, step)
    expected = image_codec.decode_raw(enc, height, width, step, data)
    out = image_codec.decode_raw(enc, height, width, step + pad, padded.tobytes())
    np.testing.assert_array_equal(out, expected)


def test_extra_trailing_bytes_are_ignored():
    rgb = smooth_image(8, 8)
    enc, height, width, step, data = image_codec.encode_raw(rgb, 'rgb8')
    out = image_codec.decode_raw(enc, height, width, step, data + b'\x00' * 17)
    np.testing.assert_array_equal(out, rgb)


@pytest.mark.parametrize('encoding', ['mono16', '16UC1'])
def test_mono16_honours_endianness(encoding):
    # 0x1234 keeps its high byte 0x12 = 18; reading the bytes in the wrong order would give 0x34.
    little = np.full((2, 3), 0x1234, dtype='<u2').tobytes()
    big = np.full((2, 3), 0x1234, dtype='>u2').tobytes()
    assert little != big
    out_little = image_codec.decode_raw(encoding, 2, 3, 6, little, is_bigendian=False)
    out_big = image_codec.decode_raw(encoding, 2, 3, 6, big, is_bigendian=True)
    assert (out_little == 0x12).all() and (out_big == 0x12).all()
    assert (image_codec.decode_raw(encoding, 2, 3, 6, big, is_bigendian=False) == 0x34).all()


def test_16bit_colour_scales_full_range():
    samples = np.array([[[0, 65535, 257 * 100]]], dtype='<u2')  # one rgb16 pixel
    out = image_codec.decode_raw('rgb16', 1, 1, 6, samples.tobytes())
    np.testing.assert_array_equal(out[0, 0], [0, 255, 100])


BAYER_LAYOUT = {  # colour at (row, col) of the top-left 2x2 cell, as sensor_msgs defines it
    'rggb': 'RGGB', 'bggr': 'BGGR', 'gbrg': 'GBRG', 'grbg': 'GRBG'}


@pytest.mark.parametrize('pattern', sorted(BAYER_LAYOUT))
@pytest.mark.parametrize('bits', [8, 16])
def test_bayer_uniform_colour_is_recovered(pattern, bits):
    colour = {'R': 200, 'G': 100, 'B': 30}
    mosaic = np.zeros((16, 16), dtype=np.uint16 if bits == 16 else np.uint8)
    for index, name in enumerate(BAYER_LAYOUT[pattern]):
        dy, dx = divmod(index, 2)
        mosaic[dy::2, dx::2] = colour[name] * (257 if bits == 16 else 1)
    data = mosaic.astype('<u2').tobytes() if bits == 16 else mosaic.tobytes()
    out = image_codec.decode_raw(f'bayer_{pattern}{bits}', 16, 16, 16 * bits // 8, data)
    interior = out[2:-2, 2:-2].reshape(-1, 3).astype(int)
    assert np.abs(interior - [200, 100, 30]).max() <= 2


def bt601_limited(rgb):
    """Return (Y, U, V) of an RGB colour, BT.601 limited range (the convention of YUV cameras)."""
    r, g, b = (c / 255.0 for c in rgb)
    y = 16 + 65.481 * r + 128.553 * g + 24.966 * b
    u = 128 - 37.797 * r - 74.203 * g + 112.0 * b
    v = 128 + 112.0 * r - 93.786 * g - 18.214 * b
    return tuple(int(round(c)) for c in (y, u, v))


@pytest.mark.parametrize('encoding', ['uyvy', 'yuv422', 'yuyv', 'yuv422_yuy2', 'nv12', 'nv21'])
def test_yuv_known_colour(encoding):
    colour = (220, 60, 40)  # reddish: swapping U and V would make it bluish
    y, u, v = bt601_limited(colour)
    height, width = 4, 6
    if encoding in ('uyvy', 'yuv422'):
        data, step = bytes([u, y, v, y]) * (width // 2 * height), width * 2
    elif encoding in ('yuyv', 'yuv422_yuy2'):
        data, step = bytes([y, u, y, v]) * (width // 2 * height), width * 2
    else:
        chroma = [u, v] if encoding == 'nv12' else [v, u]
        data = bytes([y] * width * height) + bytes(chroma * (width // 2 * height // 2))
        step = width
    out = image_codec.decode_raw(encoding, height, width, step, data)
    assert np.abs(out.reshape(-1, 3).astype(int) - colour).max() <= 4


@pytest.mark.parametrize('fields, message', [
    (('rgb8', 4, 4, 12, bytes(47)), 'expected at least 48'),
    (('rgb8', 4, 4, 10, bytes(64)), 'step is smaller'),
    (('bgr8', 0, 4, 12, b''), 'zero size'),
    (('mono8', 3, 0, 0, b''), 'zero size'),
    (('yuv422', 2, 3, 6, bytes(12)), 'even width'),
    (('nv12', 3, 4, 4, bytes(24)), 'even width and height'),
    (('nv21', 4, 4, 4, bytes(23)), 'expected at least 24'),
    (('32FC1', 2, 2, 8, bytes(16)), "unsupported image encoding '32FC1'"),
    (('', 2, 2, 6, bytes(12)), "unsupported image encoding ''"),
])
def test_bad_raw_fields_raise_input_error(fields, message):
    with pytest.raises(InputError, match=message):
        image_codec.decode_raw(*fields)


def test_error_names_encoding_and_sizes():
    with pytest.raises(InputError) as info:
        image_codec.decode_raw('bgr8', 480, 640, 1920, bytes(100))
    text = str(info.value)
    assert "'bgr8'" in text and '640x480' in text and '921600' in text


def test_output_does_not_alias_message_data():
    rgb = smooth_image(4, 4)
    _, height, width, step, data = image_codec.encode_raw(rgb, 'rgb8')
    buffer = bytearray(data)
    out = image_codec.decode_raw('rgb8', height, width, step, buffer)
    out[:] = 0
    assert bytes(buffer) == data


def test_compressed_round_trips():
    rgb = smooth_image()
    fmt, data = image_codec.encode_compressed(rgb, 'png')
    assert fmt == 'rgb8; png compressed bgr8'
    np.testing.assert_array_equal(image_codec.decode_compressed(fmt, data), rgb)
    fmt, data = image_codec.encode_compressed(rgb, 'jpeg', quality=95)
    assert fmt == 'rgb8; jpeg compressed bgr8'
    out = image_codec.decode_compressed(fmt, data)
    assert np.abs(out.astype(int) - rgb).mean() < 3.0


@pytest.mark.parametrize('fmt', ['jpeg', 'JPEG', 'jpg', 'bgr8; jpeg compressed bgr8',
                                 'rgb8; jpeg compressed bgr8', ''])
def test_compressed_format_strings(fmt):
    rgb = smooth_image()
    ok, encoded = cv2.imencode('.jpg', cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR),
                               [cv2.IMWRITE_JPEG_QUALITY, 95])
    out = image_codec.decode_compressed(fmt, encoded.tobytes())
    assert np.abs(out.astype(int) - rgb).mean() < 3.0  # RGB order: a swap errs by ~100


def test_compressed_mono_and_16bit_png():
    grey = np.arange(256, dtype=np.uint8).reshape(16, 16)
    _, encoded = cv2.imencode('.png', grey)
    out = image_codec.decode_compressed('mono8; png compressed mono8', encoded.tobytes())
    np.testing.assert_array_equal(out, np.repeat(grey[:, :, None], 3, axis=2))
    deep = (grey.astype(np.uint16) * 257)
    _, encoded = cv2.imencode('.png', deep)
    out = image_codec.decode_compressed('mono16; png compressed mono16', encoded.tobytes())
    np.testing.assert_array_equal(out[:, :, 0], grey)
    # compressed_depth_image_transport: a 12-byte header before the 16-bit PNG.
    out = image_codec.decode_compressed('16UC1; compressedDepth png',
                                        bytes(12) + encoded.tobytes())
    np.testing.assert_array_equal(out[:, :, 1], grey)


def test_corrupt_compressed_raises_input_error():
    rgb = smooth_image()
    _, data = image_codec.encode_compressed(rgb, 'jpeg')
    with pytest.raises(InputError, match='corrupt'):
        image_codec.decode_compressed('jpeg', b'\xff\xd8\xff' + bytes(100) + b'\xff\xd9')
    with pytest.raises(InputError, match='truncated'):
        image_codec.decode_compressed('jpeg', data[:len(data) // 2])
    with pytest.raises(InputError, match='corrupt'):
        image_codec.decode_compressed('png', b'\x89PNG\r\n\x1a\n' + bytes(100))
    with pytest.raises(InputError, match='no image data'):
        image_codec.decode_compressed('jpeg', b'')
    with pytest.raises(InputError, match="unsupported CompressedImage format 'h264'"):
        image_codec.decode_compressed('h264', data)


class FakeRawMsg(types.SimpleNamespace):
    """Fields of sensor_msgs/msg/Image, as a plain object."""


def test_decode_msg_duck_types():
    rgb = smooth_image()
    enc, height, width, step, data = image_codec.encode_raw(rgb, 'bgr8')
    raw = FakeRawMsg(encoding=enc, height=height, width=width, step=step,
                     data=array.array('B', data), is_bigendian=0)
    np.testing.assert_array_equal(image_codec.decode_msg(raw), rgb)
    fmt, data = image_codec.encode_compressed(rgb, 'png')
    compressed = types.SimpleNamespace(format=fmt, data=np.frombuffer(data, dtype=np.uint8))
    np.testing.assert_array_equal(image_codec.decode_msg(compressed), rgb)
    with pytest.raises(InputError, match='neither an Image'):
        image_codec.decode_msg(types.SimpleNamespace(data=b''))


def test_decode_msg_on_rclpy_messages():
    from sensor_msgs.msg import CompressedImage, Image

    rgb = smooth_image()
    msg = Image()
    msg.encoding, msg.height, msg.width, msg.step, data = image_codec.encode_raw(rgb, 'rgb8')
    msg.data = data
    np.testing.assert_array_equal(image_codec.decode_msg(msg), rgb)
    compressed = CompressedImage()
    compressed.format, data = image_codec.encode_compressed(rgb, 'png')
    compressed.data = data
    np.testing.assert_array_equal(image_codec.decode_msg(compressed), rgb)


def test_encode_raw_rejects_bad_images():
    with pytest.raises(InputError, match='uint8 RGB'):
        image_codec.encode_raw(np.zeros((4, 4), np.uint8))
    with pytest.raises(InputError, match='zero size'):
        image_codec.encode_raw(np.zeros((0, 4, 3), np.uint8))
    with pytest.raises(InputError, match='even width'):
        image_codec.encode_raw(np.zeros((4, 5, 3), np.uint8), 'yuyv')
    with pytest.raises(InputError, match='unsupported image encoding'):
        image_codec.encode_raw(np.zeros((4, 4, 3), np.uint8), 'bgr9')


def test_load_image_file(tmp_path):
    rgb = smooth_image()
    png = tmp_path / 'a.png'
    cv2.imwrite(str(png), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    np.testing.assert_array_equal(image_codec.load_image_file(png), rgb)
    jpg = tmp_path / 'b.jpg'
    cv2.imwrite(str(jpg), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])
    assert np.abs(image_codec.load_image_file(str(jpg)).astype(int) - rgb).mean() < 3.0
    tif = tmp_path / 'c.tif'
    cv2.imwrite(str(tif), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR).astype(np.uint16) * 257)
    np.testing.assert_array_equal(image_codec.load_image_file(tif), rgb)


def test_load_image_file_errors_name_the_file(tmp_path):
    missing = tmp_path / 'missing.png'
    with pytest.raises(InputError, match='not found: .*missing.png'):
        image_codec.load_image_file(missing)
    garbage = tmp_path / 'garbage.jpg'
    garbage.write_bytes(b'this is not an image')
    with pytest.raises(InputError, match='garbage.jpg'):
        image_codec.load_image_file(garbage)
    empty = tmp_path / 'empty.png'
    empty.write_bytes(b'')
    with pytest.raises(InputError, match='empty.png is empty'):
        image_codec.load_image_file(empty)
    with pytest.raises(InputError, match='cannot read image file'):
        image_codec.load_image_file(tmp_path)  # a directory
