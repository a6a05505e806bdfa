"""The real ConvNeXt-Tiny embedder on small inputs on the CPU."""

import numpy as np
from PIL import Image
import pytest
from taco_cvgl.errors import InputError, MismatchError, TacoError
from taco_cvgl.model.config import ModelConfig
from taco_cvgl.model.embedder import imagenet_weights_path, ImageRetrievalModel
import torch

CONFIG = ModelConfig(input_size=(64, 64))


@pytest.fixture(scope='module')
def model():
    torch.manual_seed(0)
    return ImageRetrievalModel(CONFIG).to_runtime('cpu')


@pytest.fixture(scope='module')
def images(scene):
    return [np.ascontiguousarray(scene.rgb[900:1000, 700 + 150 * i:820 + 150 * i])
            for i in range(4)]


def test_shape_norm_and_determinism(model, images):
    emb = model.encode_batch(images)
    assert emb.shape == (4, 512) and emb.dtype == torch.float32
    assert torch.allclose(emb.norm(dim=1), torch.ones(4), atol=1e-5)
    again = model.encode_batch(images, batch_size=1)
    assert torch.allclose(emb, again, atol=1e-5)  # eval mode: BN and dropout frozen
    # Different places embed differently; the same place identically.
    sim = model.compute_similarity(emb, emb)
    assert torch.allclose(sim.diagonal(), torch.ones(4), atol=1e-5)
    assert (sim - torch.eye(4)).abs().max() < 0.9999


def test_input_kinds_and_colour_order_agree(model, images):
    rgb = images[0]
    reference = model.encode_image(rgb)
    bgr = np.ascontiguousarray(rgb[:, :, ::-1])
    assert torch.allclose(model.encode_image(bgr, color_order='bgr'), reference, atol=1e-5)
    assert torch.allclose(model.encode_image(Image.fromarray(rgb)), reference, atol=1e-5)
    tensor = torch.from_numpy(rgb).permute(2, 0, 1)
    assert torch.allclose(model.encode_image(tensor), reference, atol=1e-5)
    # Swapping the colour order is a different image for the model.
    assert not torch.allclose(model.encode_image(bgr), reference, atol=1e-3)


def test_retrieve_similar_ranks_the_same_image_first(model, images):
    db = model.encode_batch(images)
    indices, sims = model.retrieve_similar(db[2], db, top_k=3)
    assert indices[0].item() == 2 and sims[0].item() == pytest.approx(1.0, abs=1e-5)
    assert len(indices) == 3 and bool((sims[:-1] >= sims[1:]).all())


def test_gem_pooling_variant_runs():
    torch.manual_seed(0)
    gem = ImageRetrievalModel(ModelConfig(input_size=(64, 64), pooling='gem',
                                          embedding_dim=128)).to_runtime('cpu')
    out = gem.encode_batch([np.full((70, 90, 3), 128, np.uint8)])
    assert out.shape == (1, 128) and torch.isfinite(out).all()


def test_save_load_round_trip_without_pickle(model, images, tmp_path):
    path = tmp_path / 'w.safetensors'
    fingerprint = model.save(path, dtype='fp32')
    loaded = ImageRetrievalModel.load(path, device='cpu')
    assert loaded.config == model.config
    assert loaded.fingerprint() == fingerprint == model.fingerprint()
    assert torch.allclose(loaded.encode_batch(images), model.encode_batch(images), atol=1e-6)
    # fp16 storage: half the size, embeddings within fp16 rounding, a fingerprint of its own.
    half = tmp_path / 'h.safetensors'
    assert model.save(half, dtype='fp16') != fingerprint
    assert half.stat().st_size < 0.6 * path.stat().st_size
    reloaded = ImageRetrievalModel.load(half, device='cpu')
    assert torch.allclose(reloaded.encode_batch(images), model.encode_batch(images), atol=2e-2)


def test_bad_weight_files_are_clear_errors(model, tmp_path):
    with pytest.raises(InputError, match='not found'):
        ImageRetrievalModel.load(tmp_path / 'missing.safetensors')
    path = tmp_path / 'w.safetensors'
    model.save(path)
    truncated = tmp_path / 'cut.safetensors'
    truncated.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(InputError, match='cut.safetensors'):
        ImageRetrievalModel.load(truncated)
    other = ImageRetrievalModel(ModelConfig(input_size=(64, 64), embedding_dim=256))
    with pytest.raises(MismatchError, match='do not fit'):
        ImageRetrievalModel(CONFIG)._load_state(other.state_dict(), path)


def test_imagenet_weights_come_from_the_torchvision_cache(tmp_path, monkeypatch):
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch'))
    cached = imagenet_weights_path()
    assert str(cached).startswith(str(tmp_path)) and cached.name.startswith('convnext_tiny-')
    # No network here: without the cached file the error says what to place where.
    with pytest.raises(TacoError, match='convnext_tiny-') as info:
        ImageRetrievalModel(CONFIG, backbone_weights='imagenet')
    assert str(cached) in str(info.value)
    # With the file in torchvision's cache, it is loaded into the backbone (and the norm).
    import torchvision
    torch.manual_seed(1)
    source = torchvision.models.convnext_tiny(weights=None)
    cached.parent.mkdir(parents=True, exist_ok=True)
    torch.save(source.state_dict(), cached)
    loaded = ImageRetrievalModel(CONFIG, backbone_weights='imagenet')
    assert torch.equal(loaded.backbone[0][0].weight, source.features[0][0].weight)
    assert torch.equal(loaded.norm.weight, source.classifier[0].weight.reshape(-1))


def test_config_validation_names_the_field():
    with pytest.raises(InputError, match='pooling'):
        ModelConfig(pooling='max')
    with pytest.raises(InputError, match='input_size'):
        ModelConfig(input_size=(8, 8))
    with pytest.raises(InputError, match='unknown fields'):
        ModelConfig.from_dict({'embeding_dim': 3})
    assert ModelConfig.from_json(CONFIG.to_json()) == CONFIG


def test_a_fast_path_is_asked_of_the_registry_and_wraps_the_model(images):
    from taco_cvgl.inference.base import Embedder
    from taco_cvgl.inference.registry import make_embedder
    torch.manual_seed(0)
    eager = ImageRetrievalModel(CONFIG).to_runtime('cpu', 'fp32')
    reference = eager.encode_batch(images)
    # 'off' is the model itself: the eager Embedder.
    assert make_embedder(eager, 'off') is eager and isinstance(eager, Embedder)
    assert eager.backend == 'off' and eager.fallback_reason is None
    fast = make_embedder(eager, 'jit')
    assert fast.backend == 'jit' and fast.fallback_reason is None
    assert (fast.config, fast.device, fast.precision) == (CONFIG, torch.device('cpu'), 'fp32')
    out = fast.embed(images)
    assert torch.nn.functional.cosine_similarity(out, reference).min() > 0.999
    assert torch.allclose(out.norm(dim=1), torch.ones(len(images)), atol=1e-5)
    # The model itself is untouched: still the eager path.
    assert torch.allclose(eager.encode_batch(images), reference, atol=1e-6)


def test_the_model_module_does_not_import_the_fast_paths():
    import subprocess
    import sys
    code = ('import sys, taco_cvgl.model.embedder; '
            'print(sorted(m for m in sys.modules if m.startswith("taco_cvgl.inference")))')
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                         check=True, timeout=120).stdout
    assert out.strip() == '[]'


def test_fingerprint_is_kept_until_a_weight_changes(images):
    torch.manual_seed(0)
    model = ImageRetrievalModel(CONFIG)
    first = model.fingerprint()
    moved = model.to_runtime('cpu', 'fp32')   # channels_last copies, the same values
    assert moved.fingerprint() == first
    bias = model.head[-1].bias
    original = bias.detach().clone()
    with torch.no_grad():
        bias.add_(1e-3)                       # in place, as an optimiser step is
    changed = model.fingerprint()
    assert changed != first
    # An independent recomputation: a fresh model given the same state.
    fresh = ImageRetrievalModel(CONFIG)
    fresh.load_state_dict(model.state_dict())
    assert fresh.fingerprint() == changed
    with torch.no_grad():
        bias.copy_(original)                  # back to the first values
    assert model.fingerprint() == first
