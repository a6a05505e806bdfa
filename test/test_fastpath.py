"""
The fast inference path, ONNX export and batched JPEG decoding, on the CPU.

The real ConvNeXt-Tiny at 64 px (random weights) stands in for a trained model: the checks
compare embeddings, not what they mean. GPU-only paths (CUDA graphs, nvJPEG) have tests that
run where CUDA is present and skip elsewhere.
"""

import logging

import cv2
import numpy as np
from PIL import Image
import pytest
from taco_cvgl.errors import InputError, MismatchError
from taco_cvgl.files.image_codec import load_image_file
from taco_cvgl.inference import gpu_decode, int8, onnx_export
from taco_cvgl.inference.base import Embedder, MIN_COSINE, NetworkUnderAutocast
from taco_cvgl.inference.cpu import find_cxx_compiler
from taco_cvgl.inference.cuda_graph import FrameNetwork
from taco_cvgl.inference.registry import make_embedder, upgrade_in_background
from taco_cvgl.model.config import ModelConfig
from taco_cvgl.model.embedder import ImageRetrievalModel
from taco_cvgl.model.preprocess import prepare_batch
import torch
import torch.nn.functional as F

CONFIG = ModelConfig(input_size=(64, 64))
CUDA = torch.cuda.is_available()


@pytest.fixture(scope='module')
def model():
    torch.manual_seed(0)
    return ImageRetrievalModel(CONFIG).to_runtime('cpu', 'fp32')


@pytest.fixture(scope='module')
def frames(scene):
    """Camera-sized real frames: 4 places, and 2 re-views (rotated, brighter) of the first 2."""
    rows = [(300, 400), (700, 900), (1100, 500), (900, 1300)]
    places = [np.ascontiguousarray(scene.rgb[r:r + 480, c:c + 640]) for r, c in rows]
    views = []
    for place in places[:2]:
        m = cv2.getRotationMatrix2D((320, 240), 5.0, 1.03)
        view = cv2.warpAffine(place, m, (640, 480), borderMode=cv2.BORDER_REFLECT)
        views.append(np.clip(view.astype(np.int16) + 12, 0, 255).astype(np.uint8))
    return places, views


@pytest.fixture(scope='module')
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp('fastpath_cache')


def _top1(embeddings, places):
    """Top-1 place of each view, from embeddings of places + views (in that order)."""
    db, q = embeddings[:len(places)], embeddings[len(places):]
    return (q @ db.T).argmax(dim=1)


def test_fast_path_gives_the_eager_embeddings(model, frames, cache_dir):
    places, views = frames
    fast = make_embedder(model, 'auto', cache_dir=cache_dir)
    # On the CPU in fp32 'auto' is int8 when given calibration images; without them it says
    # so and takes ONNX Runtime where installed, else the frozen TorchScript.
    expected = 'onnxruntime' if onnx_export.onnxruntime_available() else 'jit'
    assert fast.backend == expected and 'calibration images' in fast.fallback_reason
    assert isinstance(fast, Embedder) and fast.fingerprint() == model.fingerprint()
    reference = model.encode_batch(places + views)
    got = fast.encode_batch(places + views, batch_size=4)
    assert got.shape == reference.shape and got.dtype == torch.float32
    assert float(F.cosine_similarity(got, reference).min()) >= MIN_COSINE
    assert torch.equal(_top1(got, places), _top1(reference, places))
    # A normalised batch through embed_tensor: the network alone, without preprocessing.
    batch = prepare_batch(places[:2], CONFIG, torch.device('cpu'))
    assert torch.allclose(fast.embed_tensor(batch), model.embed_tensor(batch), atol=1e-4)
    assert fast.describe()['backend'] == expected


def test_bf16_path_is_frozen_bf16_weights_within_the_cosine_bar(frames):
    places, views = frames
    torch.manual_seed(0)
    bf16 = ImageRetrievalModel(CONFIG).to_runtime('cpu', 'bf16')
    fast = make_embedder(bf16, 'jit')
    assert fast.backend == 'jit' and fast.precision == 'bf16'
    torch.manual_seed(0)
    fp32 = ImageRetrievalModel(CONFIG).to_runtime('cpu', 'fp32')
    got, reference = fast.encode_batch(places + views), fp32.encode_batch(places + views)
    assert float(F.cosine_similarity(got, reference).min()) >= MIN_COSINE
    assert torch.equal(_top1(got, places), _top1(reference, places))


@pytest.mark.integration
def test_int8_backend_calibrated_on_map_images_keeps_the_embeddings(scene, frames, tmp_path):
    """Static int8 (+ bf16 elsewhere), calibrated on map images, then run on other images."""
    places, views = frames
    torch.manual_seed(0)
    bf16 = ImageRetrievalModel(CONFIG).to_runtime('cpu', 'bf16')
    reference = ImageRetrievalModel(CONFIG)
    reference.load_state_dict(bf16.state_dict())
    reference.to_runtime('cpu', 'fp32')
    # Calibration: map-like crops of the scene elsewhere than the test frames.
    map_images = [np.ascontiguousarray(scene.rgb[r:r + 256, c:c + 256])
                  for r in range(100, 1500, 350) for c in range(1500, 1900, 200)]
    # auto does not wait for a compiler: without the package it takes the next backend.
    quick = make_embedder(bf16, 'auto', calibration_images=map_images, cache_dir=tmp_path,
                          compile_int8=False)
    assert quick.backend != 'int8' and 'not compiled yet' in quick.fallback_reason
    fast = make_embedder(bf16, 'int8', calibration_images=map_images, cache_dir=tmp_path)
    assert fast.backend == 'int8' and fast.fallback_reason is None
    assert not fast.runner.from_cache
    got = fast.encode_batch(places + views, batch_size=3)   # batch sizes it was not built with
    expected = reference.encode_batch(places + views)
    # The product's bar. Top-1 is not compared: an untrained network embeds different places
    # nearly parallel, so rounding can flip which one is nearest.
    assert float(F.cosine_similarity(got, expected).min()) >= MIN_COSINE

    # The compiled package is kept: the same weights and map load it instead of compiling.
    package = fast.runner.path
    assert package.parent == tmp_path / 'int8' and package.is_file()
    # 'auto' on the CPU is int8 first: the same package, loaded.
    again = make_embedder(bf16, 'auto', calibration_images=map_images, cache_dir=tmp_path,
                          compile_int8=False)
    assert again.backend == 'int8' and again.runner.from_cache
    assert torch.equal(again.encode_batch(places + views, batch_size=3), got)
    # The background upgrade hands its embedder over once built (here: from the cache).
    installed, said = [], []
    upgrade_in_background(bf16, map_images, installed.append, said.append,
                          cache_dir=tmp_path).join(timeout=120)
    assert [e.backend for e in installed] == ['int8'] and 'switched to int8' in said[0]
    # Anything the package depends on names another package: calibration, precision, threads.
    batch = int8.calibration_batch(map_images, CONFIG)
    assert int8.int8_package_path(bf16, 'bf16', batch, tmp_path) == package
    assert int8.int8_package_path(bf16, 'bf16', batch[:-1], tmp_path) != package
    assert int8.int8_package_path(bf16, 'fp32', batch, tmp_path) != package
    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)
    try:
        assert int8.int8_package_path(bf16, 'bf16', batch, tmp_path) != package
    finally:
        torch.set_num_threads(threads)

    # A damaged package is compiled again over, not an error.
    package.write_bytes(b'not a package')
    rebuilt = make_embedder(bf16, 'int8', calibration_images=map_images, cache_dir=tmp_path)
    assert rebuilt.backend == 'int8' and not rebuilt.runner.from_cache
    assert float(F.cosine_similarity(rebuilt.encode_batch(places + views),
                                     expected).min()) >= MIN_COSINE


def test_int8_without_calibration_falls_back_and_says_why(model, caplog):
    with caplog.at_level(logging.WARNING, logger='taco_cvgl.inference'):
        fast = make_embedder(model, 'int8')
    assert fast.backend == 'jit' and 'calibration images' in fast.fallback_reason
    assert 'calibration images' in caplog.text
    assert len(int8.calibration_images(['/no/such/file.jpg'])) == 0


def test_uint8_resize_stays_within_one_grey_level(frames):
    places, _ = frames
    exact = prepare_batch(places[:2], CONFIG, torch.device('cpu'))
    quick = prepare_batch(places[:2], CONFIG, torch.device('cpu'), uint8_resize=True)
    std = torch.tensor(CONFIG.std).view(1, 3, 1, 1)
    # Normalised values differ by at most one grey level over the channel's std.
    assert float(((quick - exact).abs() * std).max()) <= 1.0 / 255 + 1e-6
    bgr = [np.ascontiguousarray(p[:, :, ::-1]) for p in places[:2]]
    assert torch.equal(prepare_batch(bgr, CONFIG, torch.device('cpu'), 'bgr', uint8_resize=True),
                       quick)


def test_forced_failure_falls_back_to_eager_with_a_warning(model, frames, caplog):
    places, _ = frames
    with caplog.at_level(logging.WARNING, logger='taco_cvgl.inference'):
        fast = make_embedder(model, 'onnxruntime', force_failure=True, uint8_resize=False)
    assert fast.backend == 'eager'
    assert 'onnxruntime' in fast.fallback_reason and 'forced' in fast.fallback_reason
    assert any('falling back' in r.getMessage() for r in caplog.records)
    assert torch.allclose(fast.encode_batch(places[:2]), model.encode_batch(places[:2]),
                          atol=1e-6)


def test_compile_without_a_compiler_falls_back(model, monkeypatch, tmp_path):
    # A robot without g++: inductor cannot build CPU kernels, so the fast path must not try.
    from torch._inductor import config as inductor_config
    monkeypatch.setenv('PATH', str(tmp_path))
    monkeypatch.delenv('CXX', raising=False)
    monkeypatch.setattr(inductor_config.cpp, 'cxx', (None, 'no-such-compiler++'))
    assert find_cxx_compiler() is None
    fast = make_embedder(model, 'compile')
    assert fast.backend == 'eager' and 'C++ compiler' in fast.fallback_reason


def test_cuda_graph_backend_refused_without_cuda(model):
    if CUDA:
        pytest.skip('this machine has CUDA: the refusal is for CPU-only machines')
    fast = make_embedder(model, 'cuda_graph')
    assert fast.backend == 'eager' and 'CUDA' in fast.fallback_reason


def test_unknown_backend_is_an_input_error(model):
    with pytest.raises(InputError, match='backend'):
        make_embedder(model, 'tensorrt')


def test_frame_network_preprocesses_as_prepare_batch(model, frames):
    # The module the GPU captures (uint8 frames in, embeddings out), checked here on the CPU.
    places, _ = frames
    network = NetworkUnderAutocast(model, torch.device('cpu'), 'fp32')
    stacked = torch.from_numpy(np.stack([p[:, :, ::-1] for p in places[:3]]).copy())
    with torch.inference_mode():
        got = FrameNetwork(network, CONFIG, 'bgr')(stacked)
    assert torch.allclose(got, model.encode_batch(places[:3]), atol=1e-5)


@pytest.mark.skipif(not CUDA, reason='CUDA graphs need a CUDA device')
def test_cuda_graphs_match_eager_on_gpu(frames):
    places, views = frames
    torch.manual_seed(0)
    gpu_model = ImageRetrievalModel(CONFIG).to_runtime('cuda', 'fp16')
    fast = make_embedder(gpu_model, 'cuda_graph', batch_sizes=(1, 2, 4))
    assert fast.backend == 'cuda_graph'
    reference = gpu_model.encode_batch(places + views)
    for batch_size in (1, 3, 4, 9):  # captured, padded and chunked batch sizes
        got = fast.encode_batch(places + views, batch_size=batch_size)
        assert float(F.cosine_similarity(got, reference).min()) >= MIN_COSINE
    bgr = [np.ascontiguousarray(p[:, :, ::-1]) for p in places]
    got = fast.encode_batch(bgr, color_order='bgr')
    assert float(F.cosine_similarity(got, reference[:len(places)]).min()) >= MIN_COSINE


# ------------------------------------------------------------------------------------- ONNX
def test_onnx_export_round_trip(model, frames, cache_dir):
    places, _ = frames
    # The export the fast path made (or a new one): exported once per weights, then reused.
    path = onnx_export.cached_export(model, cache_dir)
    assert path.is_file() and not list(path.parent.glob('.*tmp*'))
    assert onnx_export.cached_export(model, cache_dir) == path
    check = onnx_export.check_export(model, path)
    if not onnx_export.onnxruntime_available():
        assert check.checked_with == 'onnx.checker'
        return
    assert check.checked_with == 'onnxruntime'
    assert check.min_cosine >= onnx_export.MIN_COSINE
    assert check.max_abs_diff <= onnx_export.MAX_ABS_DIFF
    meta = onnx_export.read_metadata(path)
    assert ModelConfig.from_json(meta['taco_cvgl.model_config']) == CONFIG
    assert meta['taco_cvgl.fingerprint'] == model.fingerprint()
    # Real frames, preprocessed as the product does, through ONNX Runtime with batch 3.
    batch = prepare_batch(places[:3], CONFIG, torch.device('cpu'))
    session = onnx_export.make_session(path)
    got = torch.from_numpy(session.run(None, {onnx_export.INPUT_NAME: batch.numpy()})[0])
    assert torch.allclose(got, model.embed_tensor(batch), atol=1e-4)
    # The check catches an export that embeds differently: another model's weights.
    torch.manual_seed(1)
    other = ImageRetrievalModel(CONFIG).to_runtime('cpu', 'fp32')
    with pytest.raises(MismatchError, match='embeds differently'):
        onnx_export.check_export(other, path, batch_sizes=(1,))


def test_onnx_export_cli_reports_a_missing_weights_file(tmp_path, capsys):
    assert onnx_export.main(['--weights', str(tmp_path / 'none.safetensors'),
                             '--out', str(tmp_path / 'x.onnx')]) == 2
    assert 'not found' in capsys.readouterr().err
    assert not (tmp_path / 'x.onnx').exists()


# ------------------------------------------------------------------------------------- JPEG
def _write_oriented(folder, image, orientation):
    path = folder / f'o{orientation}.jpg'
    exif = Image.Exif()
    exif[gpu_decode.EXIF_ORIENTATION_TAG] = orientation
    Image.fromarray(image).save(path, quality=92, exif=exif)
    return path


def test_batched_jpeg_decoding_matches_opencv_with_exif_orientation(frames, tmp_path):
    place = frames[0][0][:120, :160]   # not symmetric: every orientation changes the pixels
    paths = [_write_oriented(tmp_path, place, o) for o in range(1, 9)]
    datas = [p.read_bytes() for p in paths]
    decoded = gpu_decode.decode_jpegs(datas, 'cpu', [str(p) for p in paths])
    for path, tensor in zip(paths, decoded):
        expected = load_image_file(path)   # OpenCV applies the EXIF orientation
        got = tensor.permute(1, 2, 0).numpy()
        assert got.shape == expected.shape, path
        assert np.abs(got.astype(int) - expected).mean() < 1.0, path
    assert decoded[5].shape[1:] == (160, 120)   # orientation 6: turned a quarter


def test_a_bad_jpeg_is_named_and_does_not_cost_the_batch(frames, tmp_path):
    good = _write_oriented(tmp_path, frames[0][0][:64, :64], 1)
    bad = tmp_path / 'bad.jpg'
    bad.write_bytes(good.read_bytes()[:200])    # truncated
    out = gpu_decode.decode_jpegs([good.read_bytes(), bad.read_bytes()], 'cpu',
                                  ['good.jpg', str(bad)])
    assert isinstance(out[0], torch.Tensor) and out[0].shape == (3, 64, 64)
    assert isinstance(out[1], InputError) and 'bad.jpg' in str(out[1])


def test_embed_image_files_on_cpu_matches_encode_batch(model, frames, tmp_path):
    places, _ = frames
    paths = []
    for i, place in enumerate(places[:4]):
        path = tmp_path / f'{i}.jpg'
        cv2.imwrite(str(path), place[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 90])
        paths.append(str(path))
    (tmp_path / 'broken.png').write_bytes(b'not an image')
    with gpu_decode.ImageFileLoader('cpu') as loader:
        assert not loader.gpu and 'not a CUDA device' in loader.reason
    expected = model.encode_batch([load_image_file(p) for p in paths]).numpy()
    emb, kept = gpu_decode.embed_image_files(model, paths, batch_size=3, workers=2)
    assert kept == [0, 1, 2, 3] and np.allclose(emb, expected, atol=1e-5)
    with_bad = paths[:2] + [str(tmp_path / 'broken.png')] + paths[2:]
    with pytest.raises(InputError, match='broken.png'):
        gpu_decode.embed_image_files(model, with_bad, batch_size=2)
    skipped = []
    emb, kept = gpu_decode.embed_image_files(model, with_bad, batch_size=2, skip_bad=True,
                                             on_skip=lambda p, why: skipped.append(p))
    assert kept == [0, 1, 3, 4] and skipped == [str(tmp_path / 'broken.png')]
    assert np.allclose(emb, expected, atol=1e-5)


@pytest.mark.skipif(not CUDA, reason='nvJPEG needs a CUDA device')
def test_nvjpeg_decoding_is_close_to_opencv(frames, tmp_path):
    place = frames[0][0]
    path = _write_oriented(tmp_path, place, 6)
    with gpu_decode.ImageFileLoader('cuda') as loader:
        assert loader.gpu
        (tensor,) = loader.load([str(path)])
    assert tensor.is_cuda
    got = tensor.permute(1, 2, 0).cpu().numpy().astype(int)
    assert np.abs(got - load_image_file(path)).mean() < 2.0
