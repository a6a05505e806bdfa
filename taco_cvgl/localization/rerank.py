"""
Geometric verification of retrieved candidates with local features (SIFT + RANSAC).

Global embeddings find the right neighbourhood; local features decide which candidate really
shows the same ground, and where in it the camera looks. For each of the top candidates the
query's SIFT features are matched to the candidate's (Lowe's ratio test) and a 4-DoF similarity
(rotation, scale, translation) is fitted with RANSAC; the candidate with the most inliers wins if
it has at least `min_inliers`. A wrong match rarely gathers that many geometrically consistent
inliers, which is what makes withheld fixes honest.

The point matcher is a plug-in chosen by `RerankConfig.matcher` (`PointMatcher`): SIFT here, or
learned keypoints matched by LightGlue (taco_cvgl.localization.learned_matching: aliked_lightglue,
disk_lightglue), which finds correspondences where SIFT finds few (dense forest, haze). Every
matcher's correspondences go through the same RANSAC fit (`fit_similarity`) and verification.
A map's features, of each matcher, can be stored beside its database (mapdb/map_features.py,
written by build-db): the Reranker then verifies from them, with no map image read.

From the winning similarity transform:
- heading: the direction the query image's top points to, measured in the candidate image, plus
  the candidate's own heading (map tiles are north-up: heading 0);
- position (only when the database records its images' ground sample distance `gsd_m`, i.e.
  orthorectified map tiles): the ground point under the query image's centre, as an offset from
  the candidate's centre; its covariance grows with the RANSAC residual and shrinks with the
  number of inliers, times a calibration scale.
The similarity model suits a downward-looking camera over mapped ground; tilt beyond ~20 degrees
breaks it (the residual then grows and the fix is withheld).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
from typing import Callable, Iterator, Optional, Sequence, Tuple

import cv2
import numpy as np
from taco_cvgl.errors import InputError


# Point matchers by name: SIFT (this module) and the learned ones (learned_matching.py).
MATCHERS = ('sift', 'aliked_lightglue', 'disk_lightglue')


@dataclasses.dataclass(frozen=True)
class RerankConfig:
    """How many candidates to verify and what counts as verified."""

    candidates: int = 10
    # Candidates checked while there is no recent verified fix to search around (first lock,
    # or lock lost): more work per frame until the localizer knows roughly where it is.
    acquisition_candidates: int = 0
    # Inliers a candidate needs while acquiring (0: min_inliers). Checking many candidates
    # without a prior gives wrong places more chances: a stricter bar keeps the first lock right.
    acquisition_min_inliers: int = 0
    # SIFT only: keypoints per image and Lowe's ratio (the learned matchers keep their own
    # number of keypoints, learned_matching.MAX_KEYPOINTS, and need no ratio test).
    max_features: int = 1500
    ratio: float = 0.8
    ransac_threshold_px: float = 4.0
    # The scales (candidate pixels per query pixel) a verified match may have. RANSAC also
    # "fits" a transform that squeezes the whole query onto one spot of the candidate, whose
    # inliers are many query points paired with one repeated candidate point: on ground the map
    # does not hold (fields, forest) that is how verification fixed the wrong place.
    min_scale: float = 0.125
    max_scale: float = 8.0
    min_inliers: int = 15
    covariance_scale: float = 1.0
    heading_sigma_deg: float = 2.0
    cache_size: int = 4096
    matcher: str = 'sift'       # one of MATCHERS

    def __post_init__(self):
        """Refuse values that make no sense, naming the parameter."""
        if not 0 < self.min_scale < 1 < self.max_scale:
            raise InputError(f'rerank: 0 < min_scale < 1 < max_scale required, got '
                             f'{self.min_scale}, {self.max_scale}')
        if self.candidates < 1 or self.min_inliers < 3 or not 0 < self.ratio < 1:
            raise InputError('rerank: candidates >= 1, min_inliers >= 3 and 0 < ratio < 1 '
                             f'required, got {self.candidates}, {self.min_inliers}, '
                             f'{self.ratio}')
        if self.matcher not in MATCHERS:
            raise InputError(f'rerank: matcher must be one of {", ".join(MATCHERS)}, got '
                             f'{self.matcher!r}')

    @property
    def acquiring_candidates(self) -> int:
        """Return how many candidates a frame without a motion prediction verifies."""
        return max(self.candidates, self.acquisition_candidates)

    @property
    def acquiring_min_inliers(self) -> int:
        """Return the inliers a frame without a motion prediction needs to be verified."""
        return max(self.min_inliers, self.acquisition_min_inliers)


@dataclasses.dataclass
class Verification:
    """The geometric check of one query against its best candidate."""

    index: int                # database index of the verified candidate
    inliers: int
    residual_px: float        # RMS reprojection error of the inliers, candidate pixels
    offset_px: np.ndarray     # (x right, y down) of the query centre from the candidate centre
    rotation_deg: float       # bearing of the query's image top within the candidate image
    scale: float              # candidate pixels per query pixel
    inliers_per_candidate: list


class Features:
    """SIFT keypoints and descriptors of an image (grayscale, contrast-normalised)."""

    def __init__(self, rgb: np.ndarray, detector):
        """Detect on the image's luminance after local contrast equalisation."""
        gray = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2GRAY)
        gray = cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8)).apply(gray)
        keypoints, descriptors = detector.detectAndCompute(gray, None)
        self.points = np.array([k.pt for k in keypoints], np.float32).reshape(-1, 2)
        self.descriptors = descriptors if descriptors is not None else \
            np.zeros((0, 128), np.float32)
        self.shape = rgb.shape[:2]

    @classmethod
    def from_arrays(cls, points: np.ndarray, descriptors: np.ndarray, shape) -> 'Features':
        """Return features detected earlier: points Nx2 and descriptors Nx128 float32."""
        features = cls.__new__(cls)
        features.points, features.descriptors = points, descriptors
        features.shape = (int(shape[0]), int(shape[1]))
        return features


class PointMatcher:
    """
    A verifier's local features: how they are extracted, and which points they pair.

    One plug-in per kind of feature (SIFT here, the learned ones in learned_matching.py),
    chosen by RerankConfig.matcher (`make_matcher`); the geometry is the Reranker's, shared.
    """

    name = ''

    def database_features(self, rgb: np.ndarray) -> Features:
        """Return the features of a database (map) image."""
        raise NotImplementedError

    def query_features(self, rgb: np.ndarray) -> Features:
        """Return the features of a query (camera) image."""
        raise NotImplementedError

    def correspondences(self, query: Features, ref: Features, config: RerankConfig,
                        rotation_ok: Optional[Callable[[float], bool]] = None
                        ) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
        """
        Yield sets of paired points (query Kx2, candidate Kx2 pixels), each fitted on its own.

        rotation_ok(rotation_deg), when given, says whether a fitted rotation could be accepted
        (a heading prior's gate): a matcher may skip the work of rotations it would refuse.
        """
        raise NotImplementedError


class SiftMatcher(PointMatcher):
    """SIFT keypoints, paired by nearest descriptor with Lowe's ratio test."""

    name = 'sift'

    def __init__(self, max_features: int):
        """Create the detector (max_features keypoints per image) and a brute-force matcher."""
        self.detector = cv2.SIFT_create(nfeatures=max_features)
        self.matcher = cv2.BFMatcher(cv2.NORM_L2)

    def database_features(self, rgb: np.ndarray) -> Features:
        """Return the SIFT features of a database image."""
        return Features(rgb, self.detector)

    def query_features(self, rgb: np.ndarray) -> Features:
        """Return the SIFT features of a query image."""
        return Features(rgb, self.detector)

    def correspondences(self, query: Features, ref: Features, config: RerankConfig,
                        rotation_ok: Optional[Callable[[float], bool]] = None
                        ) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
        """Yield the ratio-test matches as one set (SIFT is rotation invariant: one pass)."""
        if len(query.points) < 3 or len(ref.points) < 3:
            return
        pairs = self.matcher.knnMatch(query.descriptors, ref.descriptors, k=2)
        good = [p[0] for p in pairs
                if len(p) == 2 and p[0].distance < config.ratio * p[1].distance]
        yield (query.points[[m.queryIdx for m in good]].reshape(-1, 2),
               ref.points[[m.trainIdx for m in good]].reshape(-1, 2))


def make_matcher(config: RerankConfig) -> PointMatcher:
    """Return the point matcher config.matcher names (InputError if it cannot be loaded)."""
    if config.matcher == 'sift':
        return SiftMatcher(config.max_features)
    from taco_cvgl.localization.learned_matching import LearnedMatcher
    return LearnedMatcher(config.matcher)


class Reranker:
    """Verify retrieval candidates against stored database features, or their images."""

    def __init__(self, load_image: Optional[Callable[[int], np.ndarray]],
                 config: RerankConfig = RerankConfig(),
                 stored: Optional[Sequence[Features]] = None):
        """
        load_image(index) returns the RGB database image of a database entry.

        stored[index], when given, returns that entry's features as extracted before by the
        configured matcher (mapdb/map_features.py; stored.matcher names it, 'sift' when it does
        not say): no image is read then, and nothing is cached, since an entry comes out of the
        (memory-mapped) store in well under a millisecond. Otherwise features are extracted
        from the images on first use and the last config.cache_size are kept.
        """
        if load_image is None and stored is None:
            raise ValueError('Reranker needs load_image or stored features')
        stored_matcher = getattr(stored, 'matcher', 'sift')
        if stored is not None and stored_matcher != config.matcher:
            raise InputError(f'the stored map features are {stored_matcher} features, and '
                             f'rerank matcher {config.matcher} matches its own')
        self.matcher = make_matcher(config)
        self.config = config
        self.load_image = load_image
        self.stored = stored
        self._cache = collections.OrderedDict()

    @property
    def config(self) -> RerankConfig:
        """Return the verification settings."""
        return self._config

    @config.setter
    def config(self, config: RerankConfig) -> None:
        """Apply new settings; the matcher is chosen once (its features are cached)."""
        if config.matcher != self.matcher.name:
            raise InputError(f'rerank matcher is set when the map is loaded ({self.matcher.name}'
                             f'): restart with matcher {config.matcher}')
        self._config = config

    def database_features(self, index: int) -> Features:
        """Return the features of a database entry: stored, or extracted (and cached)."""
        if self.stored is not None:
            return self.stored[index]
        if index in self._cache:
            self._cache.move_to_end(index)
            return self._cache[index]
        features = self.matcher.database_features(self.load_image(index))
        self._cache[index] = features
        if len(self._cache) > self.config.cache_size:
            self._cache.popitem(last=False)
        return features

    def query_features(self, rgb: np.ndarray) -> Features:
        """Return the features of a query image."""
        return self.matcher.query_features(rgb)

    def verify(self, query: Features, candidates: Sequence[int],
               min_inliers: Optional[int] = None,
               accept: Optional[Callable[[int, float], bool]] = None) -> Optional[Verification]:
        """
        Return the best verified candidate among `candidates` (database indices), or None.

        Every candidate given is checked: the caller chooses how many (RerankConfig.candidates).
        min_inliers overrides the configured bar (e.g. the acquisition bar). accept(index,
        rotation_deg), when given, may refuse a candidate whose fitted rotation disagrees with
        what is known (a heading prior); a refused candidate counts 0 inliers. A matcher may
        also ask it beforehand which rotations it would take, to try only those.
        """
        bar = self.config.min_inliers if min_inliers is None else int(min_inliers)
        best, counts = None, []
        for rank, index in enumerate(candidates):
            rotation_ok = None if accept is None else functools.partial(accept, int(index))
            result = self._match(query, self.database_features(int(index)), rotation_ok)
            if result is not None and accept is not None and \
                    not accept(int(index), _rotation_deg(result[0])):
                result = None
            counts.append(0 if result is None else result[1])
            if result is not None and result[1] >= bar and \
                    (best is None or result[1] > best[1][1]):
                best = (rank, result)
        if best is None:
            return None
        rank, (matrix, inliers, residual) = best
        shape = self.database_features(int(candidates[rank])).shape
        h_q, w_q = query.shape
        centre_q = np.array([(w_q - 1) / 2.0, (h_q - 1) / 2.0, 1.0])
        centre_db = np.array([(shape[1] - 1) / 2.0, (shape[0] - 1) / 2.0])
        offset = matrix @ centre_q - centre_db
        scale = float(np.linalg.norm(matrix[:, :2] @ np.array([0.0, -1.0])))
        return Verification(index=int(candidates[rank]), inliers=inliers, residual_px=residual,
                            offset_px=offset, rotation_deg=_rotation_deg(matrix), scale=scale,
                            inliers_per_candidate=counts)

    def _match(self, query: Features, ref: Features,
               rotation_ok: Optional[Callable[[float], bool]] = None):
        """Return the best (matrix, inliers, residual) over the matcher's sets, or None."""
        best = None
        for src, dst in self.matcher.correspondences(query, ref, self.config, rotation_ok):
            fit = fit_similarity(src, dst, self.config)
            if fit is not None and (best is None or fit[1] > best[1]):
                best = fit
        return best


def fit_similarity(src: np.ndarray, dst: np.ndarray, config: RerankConfig):
    """
    Fit the similarity taking query points src (Kx2) to candidate points dst with RANSAC.

    Returns (2x3 matrix, inliers, RMS residual of the inliers in candidate pixels), or None when
    there are fewer than config.min_inliers pairs, no fit, or a fit whose scale lies outside
    [config.min_scale, config.max_scale]: RANSAC also accepts a transform that squeezes the
    query onto one spot, its inliers many query points paired with one candidate point.
    """
    if len(src) < config.min_inliers:
        return None
    matrix, mask = cv2.estimateAffinePartial2D(
        src, dst, method=cv2.RANSAC, ransacReprojThreshold=config.ransac_threshold_px,
        maxIters=2000, confidence=0.995)
    if matrix is None:
        return None
    scale = math.sqrt(abs(float(np.linalg.det(matrix[:, :2]))))
    if not config.min_scale <= scale <= config.max_scale:
        return None
    mask = mask.ravel().astype(bool)
    projected = src[mask] @ matrix[:, :2].T + matrix[:, 2]
    residual = float(np.sqrt(np.mean(np.sum((projected - dst[mask]) ** 2, axis=1))))
    return matrix, int(mask.sum()), residual


def _rotation_deg(matrix: np.ndarray) -> float:
    """Return the bearing (degrees, clockwise) of the query's image top in the candidate."""
    up = matrix[:, :2] @ np.array([0.0, -1.0])      # query "up" in candidate pixels
    return math.degrees(math.atan2(up[0], -up[1])) % 360.0


def offset_to_enu(offset_px: np.ndarray, gsd_m: float, image_heading_deg: float) -> np.ndarray:
    """
    Turn an offset in image pixels (x right, y down) into (east, north) metres.

    image_heading_deg is the compass direction the image's top points to (0 for a north-up tile).
    """
    right, forward = float(offset_px[0]) * gsd_m, -float(offset_px[1]) * gsd_m
    h = math.radians(image_heading_deg if math.isfinite(image_heading_deg) else 0.0)
    # The image's forward axis points along heading h; its right axis along h + 90 degrees.
    east = forward * math.sin(h) + right * math.cos(h)
    north = forward * math.cos(h) - right * math.sin(h)
    return np.array([east, north])


def verified_position_sigma_m(verification: Verification, gsd_m: float) -> float:
    """
    Return the 1-sigma horizontal error (metres, before calibration) of a verified position.

    The fitted centre is an average over the inliers: its error shrinks as residual/sqrt(n),
    but never below one database pixel (the map's own registration and the flat-ground model).
    """
    statistical = verification.residual_px / math.sqrt(max(verification.inliers, 1))
    return gsd_m * math.hypot(1.0, 3.0 * statistical)
