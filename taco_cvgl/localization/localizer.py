"""CVGLLocalizer: image in, GPS measurement out; the one object the node and the tools share."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
import time
from typing import List, Optional, Sequence

import numpy as np
from taco_cvgl.errors import InputError, MismatchError, TacoError
from taco_cvgl.geo.geodesy import angle_difference_deg, from_enu, to_enu, wrap_degrees
from taco_cvgl.geo.place_grid import PlaceGrid
from taco_cvgl.localization.estimate import (estimate_pose, EstimatorConfig, mahalanobis_sq,
                                             PoseEstimate)
from taco_cvgl.localization.heading import (HeadingPrior, merge_rotations, north_up,
                                            rotation_agrees, tta_angles)
from taco_cvgl.localization.rerank import (offset_to_enu, RerankConfig, Reranker, Verification,
                                           verified_position_sigma_m)
from taco_cvgl.localization.tracking import ConstantVelocityTrack, TrackConfig
from taco_cvgl.mapdb.calibration import FixFeatures
from taco_cvgl.mapdb.database import EmbeddingDatabase
from taco_cvgl.mapdb.map_features import make_reranker
from taco_cvgl.mapdb.search import make_index
from taco_cvgl.model.embedder import ImageRetrievalModel
from taco_cvgl.model.preprocess import image_to_tensor
import torch


# localize_batch(track=OWN_TRACK): continue the localizer's own motion track (what the node does).
OWN_TRACK = 'own'
# How the cameras look at the ground (see LocalizerConfig.camera_model).
CAMERA_MODELS = ('nadir', 'forward')
# A forward camera's map entries within about a field of view of the prior count as facing the
# same way: the spread added to the prior's sigma before an entry's heading is weighed.
FORWARD_HEADING_SPREAD_DEG = 30.0
# Cells of the places' grid (metres): four grid strides, or this where the map has no stride.
PLACE_CELL_M = 200.0


@dataclasses.dataclass(frozen=True)
class LocalizerConfig:
    """How many neighbours to retrieve, which index to search them in, and the estimate."""

    top_k: int = 10
    index: str = 'auto'
    estimator: EstimatorConfig = EstimatorConfig()
    rerank: Optional[RerankConfig] = None  # None: retrieval only
    # Motion prior (needs rerank): a constant-velocity track over the verified fixes predicts
    # where the camera is; the places inside the prediction's 3-sigma gate (at least
    # prior_radius_m wide) are verified too, up to prior_candidates of them, and candidates are
    # ranked by similarity combined with the prediction. The track stops predicting
    # prior_max_age_s after its last verified fix. prior_radius_m 0 disables it.
    prior_radius_m: float = 0.0
    prior_max_age_s: float = 30.0
    prior_candidates: int = 10
    track_accel_sigma_mps2: float = 1.0
    track_speed_sigma_mps: float = 10.0
    # Ranking with the prior: score = similarity / temperature - squared Mahalanobis / 2.
    prior_similarity_temperature: float = 0.05
    # Heading prior (localization/heading.py). nadir: a query with a prior is turned north-up
    # before it is embedded and verification accepts only rotations within heading_gate_sigmas
    # of it; without one it is embedded at rotation_tta rotations, each entry keeping its best
    # similarity. forward: entries facing away from the prior are ranked down. After a verified
    # fix its heading is the prior of later frames without one, its sigma growing by
    # track_heading_rate_sigma_dps (0: not used), for at most prior_max_age_s.
    camera_model: str = 'nadir'
    rotation_tta: int = 1
    heading_gate_sigmas: float = 3.0
    track_heading_rate_sigma_dps: float = 0.0

    def __post_init__(self):
        """Refuse a top_k below 1."""
        if int(self.top_k) < 1:
            raise InputError(f'top_k must be >= 1, got {self.top_k}')
        if self.prior_radius_m < 0 or self.prior_max_age_s < 0 or self.prior_candidates < 0:
            raise InputError('prior_radius_m, prior_max_age_s and prior_candidates must be >= 0')
        if not self.prior_similarity_temperature > 0:
            raise InputError('prior_similarity_temperature must be > 0, got '
                             f'{self.prior_similarity_temperature}')
        if self.camera_model not in CAMERA_MODELS:
            raise InputError(f'camera_model must be one of {", ".join(CAMERA_MODELS)}, got '
                             f'{self.camera_model!r}')
        if int(self.rotation_tta) < 1 or not self.heading_gate_sigmas > 0 or \
                not self.track_heading_rate_sigma_dps >= 0:
            raise InputError('rotation_tta >= 1, heading_gate_sigmas > 0 and '
                             'track_heading_rate_sigma_dps >= 0 required, got '
                             f'{self.rotation_tta}, {self.heading_gate_sigmas}, '
                             f'{self.track_heading_rate_sigma_dps}')
        if self.prior_radius_m > 0 and self.rerank is None:
            raise InputError('the motion prior (prior_radius_m > 0) needs re-ranking enabled: '
                             'only a geometric check can accept a place the retrieval missed')

    def track_config(self) -> TrackConfig:
        """Return the motion model of the prior's track."""
        return TrackConfig(accel_sigma_mps2=self.track_accel_sigma_mps2,
                           speed_sigma_mps=self.track_speed_sigma_mps,
                           max_age_s=self.prior_max_age_s)


@dataclasses.dataclass
class Match:
    """One retrieved database entry."""

    index: int
    image_id: str
    latitude: float
    longitude: float
    heading: float
    similarity: float


@dataclasses.dataclass
class Measurement:
    """
    A GPS measurement from one image.

    position_covariance is 3x3 in ENU (m^2) around the estimate; heading in degrees clockwise from
    north (NaN when the database has no headings), heading_variance in rad^2. fix is False when
    the confidence is below the threshold: such a measurement must not be used as a position.
    """

    timestamp: Optional[float]
    fix: bool
    latitude: float
    longitude: float
    altitude: float
    heading: float
    heading_variance: float
    position_covariance: np.ndarray
    confidence: float
    matches: List[Match]
    latency_s: float = 0.0
    verified: Optional[bool] = None   # geometric check passed (None: no check configured)
    inliers: int = 0
    # Database indices ranked by the image's embedding alone (matches are ranked by the
    # localizer: verified place first, then similarity combined with the motion prior).
    retrieval: List[int] = dataclasses.field(default_factory=list)
    tracked: bool = False             # the motion prior's prediction was used for this frame
    checked: int = 0                  # database places verified geometrically for this frame
    no_fix_reason: str = ''           # why fix is False ('' for a fix)
    # Where the heading prior came from: 'given' (topic, flag), 'track' (the last verified
    # fix), 'tta' (none: the query was embedded at several rotations) or '' (none used).
    heading_source: str = ''
    # The geometric check of the verified place (None without one); not serialised.
    verification: Optional[Verification] = dataclasses.field(default=None, repr=False)

    def to_dict(self) -> dict:
        """
        Return a strict-JSON-ready dict (covariance flattened row-major, 9 numbers).

        Every number missing or not finite (no fix, no heading, no altitude) is None, so that
        json.dumps(..., allow_nan=False) writes null, never the NaN that JSON does not have.
        """
        def num(value):
            return float(value) if value is not None and math.isfinite(value) else None
        return {
            'timestamp': num(self.timestamp),
            'fix': bool(self.fix),
            'latitude': num(self.latitude),
            'longitude': num(self.longitude),
            'altitude': num(self.altitude),
            'heading': num(self.heading),
            'heading_variance': num(self.heading_variance),
            'position_covariance': [num(v) for v in self.position_covariance.reshape(-1)],
            'confidence': num(self.confidence),
            'latency_s': num(self.latency_s),
            'verified': self.verified,
            'inliers': int(self.inliers),
            'tracked': bool(self.tracked),
            'checked': int(self.checked),
            'no_fix_reason': self.no_fix_reason or None,
            'heading_source': self.heading_source or None,
            'retrieval': [int(i) for i in self.retrieval],
            'top_k': [{'index': int(m.index), 'image_id': m.image_id, 'latitude': num(m.latitude),
                       'longitude': num(m.longitude), 'heading': num(m.heading),
                       'similarity': num(m.similarity)} for m in self.matches],
        }


class CVGLLocalizer:
    """Embed an image, search the map database, estimate a pose."""

    def __init__(self, model: ImageRetrievalModel, config: LocalizerConfig = LocalizerConfig()):
        """Wrap a model already placed on its runtime device (see ImageRetrievalModel.load)."""
        self.model = model
        self.config = config
        self.database: Optional[EmbeddingDatabase] = None
        self.index = None
        self.reranker: Optional[Reranker] = None
        # The database places in a local ENU frame (.enu), bucketed for the prior's gate.
        self._places: Optional[PlaceGrid] = None
        self.track = ConstantVelocityTrack(config.track_config())
        self.upgrade = None       # the thread compiling a faster backend (from_settings)
        self._fingerprint = model.fingerprint()

    @classmethod
    def from_files(cls, weights, database, device: str = 'auto', precision: str = 'auto',
                   config: LocalizerConfig = LocalizerConfig()) -> 'CVGLLocalizer':
        """Load weights and a database (checked against each other) and warm up."""
        localizer = cls(ImageRetrievalModel.load(weights, device, precision), config)
        localizer.load_map(database)
        localizer.warm_up()
        return localizer

    @classmethod
    def from_settings(cls, params, report_upgrade=None) -> 'CVGLLocalizer':
        """
        Load the localizer a `settings.NodeParams` describes: weights, map, fast path, warm-up.

        What the node, `taco-cvgl localize` and `evaluate` all call. Errors name the setting
        and the file. fast_path auto takes int8 only when its package is cached; otherwise it
        starts on the next backend of the chain and, with report_upgrade (a callable taking a
        message: a long-running caller such as the node), prepares the thread that compiles
        int8 in the background and switches to it, so that a start never waits minutes for a
        compiler: `upgrade`, which the caller starts (`upgrade.start()`) once it has started.
        """
        from taco_cvgl.localization.settings import localizer_config

        params.require_files()
        for name in ('weights', 'database'):
            path = Path(getattr(params, name))
            if not path.is_file():
                raise InputError(f'parameter {name}: file not found: {path}')
        if params.device.startswith('cuda') and not torch.cuda.is_available():
            raise TacoError(f'parameter device: {params.device!r} requested but CUDA is not '
                            f'available here; use auto or cpu')
        try:
            model = ImageRetrievalModel.load(params.weights, params.device, params.precision)
        except MismatchError as exc:
            raise MismatchError(f'parameter weights: {exc}') from None
        except TacoError as exc:
            raise InputError(f'parameter weights: {exc}') from None
        localizer = cls(model, localizer_config(params))
        try:
            localizer.load_map(params.database)
        except MismatchError as exc:
            raise MismatchError(f'parameters weights and database do not match '
                                f'({params.weights}, {params.database}): {exc}') from None
        except TacoError as exc:
            raise InputError(f'parameter database: {exc}') from None
        if params.fast_path != 'off':   # an Embedder with the model's calls, backend chosen
            from taco_cvgl.inference.int8 import calibration_images
            from taco_cvgl.inference.registry import make_embedder
            calibration = None
            if params.fast_path in ('auto', 'int8'):  # int8 ranges measured on the map's images
                calibration = calibration_images(localizer.database.image_ids)
            localizer.model = make_embedder(model, params.fast_path,
                                            calibration_images=calibration,
                                            compile_int8=params.fast_path != 'auto')
            # int8 needs the map's images to calibrate: without them a build could only fail.
            if report_upgrade is not None and params.fast_path == 'auto' and calibration and \
                    localizer.model.device.type == 'cpu' and localizer.model.backend != 'int8':
                from taco_cvgl.inference.registry import upgrade_in_background
                localizer.upgrade = upgrade_in_background(
                    model, calibration, lambda embedder: setattr(localizer, 'model', embedder),
                    report_upgrade, start=False)
        localizer.warm_up()
        return localizer

    def load_map(self, path) -> EmbeddingDatabase:
        """Load a database built by the same model and build its search index."""
        db = EmbeddingDatabase.load(path)
        db.check_model(self._fingerprint, self.model.config, str(path))
        if not (np.any(db.latitude != db.latitude[0]) or np.any(db.longitude != db.longitude[0])):
            raise InputError(f'database {path} has a single place ({len(db)} entries there): a '
                             f'fix needs other places to compare against (it would name that '
                             f'place for any image); build the map from at least 2 places')
        index_device = str(self.model.device) if self.config.index in ('auto', 'exact') else 'cpu'
        self.index = make_index(db.embeddings, self.config.index, device=index_device,
                                cache_prefix=str(path))
        self.reranker = make_reranker(db, path, self.config.rerank) if self.config.rerank \
            else None
        self.database = db
        self._origin = (float(np.mean(db.latitude)), float(np.mean(db.longitude)))
        try:
            self._calibration = db.calibration
        except InputError as exc:
            raise InputError(f'database {path}: its calibration: {exc}') from None
        self._estimator = self._scaled_estimator()
        spacing = float(db.grid_spacing_m or 0.0)
        cell_m = 4.0 * spacing if math.isfinite(spacing) and spacing > 0 else PLACE_CELL_M
        self._places = PlaceGrid(to_enu(*self._origin, db.latitude, db.longitude), cell_m)
        self.track.reset()
        return db

    def _scaled_estimator(self) -> EstimatorConfig:
        """Return the estimator config with the map's calibrated covariance scale on top."""
        estimator = self.config.estimator
        return dataclasses.replace(estimator, covariance_scale=estimator.covariance_scale
                                   * self._calibration.covariance_scale)

    def reconfigure(self, config: LocalizerConfig) -> None:
        """
        Apply new thresholds, verification and track settings without reloading the map.

        What a running node changes at run time. The index and whether re-ranking runs are
        built with the map: changing those needs load_map (InputError). The motion track keeps
        its state under its new settings.
        """
        if config.index != self.config.index or (config.rerank is None) != (
                self.config.rerank is None):
            raise InputError('index and rerank on/off are set when the map is loaded: '
                             'restart with the new values')
        self.config = config
        self.track.config = config.track_config()
        if self.reranker is not None:
            self.reranker.config = config.rerank
        if self.database is not None:
            self._estimator = self._scaled_estimator()

    def warm_up(self, sizes=((480, 640),)) -> None:
        """
        Run the model once per input size so the first real frame is not slow.

        With re-ranking, a map small enough to be checked whole before the first lock (no more
        entries than the acquisition candidates, and within the feature cache) has its local
        features extracted now: otherwise the first frames wait for them, and a live node
        drops the frames that arrive meanwhile.
        """
        for h, w in sizes:
            self.model.encode_batch([np.zeros((h, w, 3), np.uint8)])
        if self.index is not None:
            self.index.search(np.zeros((1, self.model.config.embedding_dim), np.float32), 1)
        rerank = self.config.rerank
        if self.reranker is not None and self.database is not None:
            if len(self.database) <= min(rerank.acquiring_candidates, rerank.cache_size):
                for index in range(len(self.database)):
                    self.reranker.database_features(index)

    def localize(self, image, timestamp: Optional[float] = None, color_order: str = 'rgb',
                 camera_yaw_deg: float = 0.0, heading: Optional[HeadingPrior] = None,
                 track=OWN_TRACK) -> Measurement:
        """Localize one image (numpy HxWx3 uint8, PIL image or tensor); see localize_batch."""
        return self.localize_batch([image], [timestamp], [camera_yaw_deg], color_order,
                                   [heading], track=track)[0]

    def reset_track(self) -> None:
        """Forget the motion track and the heading it remembers (the robot was moved)."""
        self.track.reset()

    def new_track(self) -> ConstantVelocityTrack:
        """Return an empty motion track under this localizer's settings (one per flight)."""
        return ConstantVelocityTrack(self.config.track_config())

    def localize_batch(self, images: Sequence, timestamps: Optional[Sequence] = None,
                       camera_yaws_deg: Optional[Sequence[float]] = None,
                       color_order: str = 'rgb',
                       headings: Optional[Sequence[Optional[HeadingPrior]]] = None,
                       track=OWN_TRACK) -> List[Measurement]:
        """
        Localize several images (e.g. one per camera) in one batch on the device.

        camera_yaws_deg: each camera's mounting yaw relative to the robot's forward axis,
        counter-clockwise positive (REP-103); the returned heading is the robot's.
        headings: a HeadingPrior of the robot (or None) per image, e.g. from a compass.
        track: the motion track these frames continue and update with their verified fixes:
        OWN_TRACK, the localizer's own (the live node's); a track of one flight (new_track());
        or None, each image on its own (unrelated photos): no motion or heading prior from
        earlier frames, and nothing remembered for later ones.
        """
        track = self.track if track is OWN_TRACK else track
        if self.database is None:
            raise TacoError('no map loaded: call load_map(path) first')
        n = len(images)
        timestamps = list(timestamps) if timestamps is not None else [None] * n
        yaws = list(camera_yaws_deg) if camera_yaws_deg is not None else [0.0] * n
        given = list(headings) if headings is not None else [None] * n
        if not len(timestamps) == len(yaws) == len(given) == n:
            raise InputError(f'{n} images but {len(timestamps)} timestamps, {len(yaws)} yaws '
                             f'and {len(given)} headings')
        start = time.perf_counter()
        priors = [g if g is not None or track is None else track.heading_prior(
            t, self.config.track_heading_rate_sigma_dps) for g, t in zip(given, timestamps)]
        views, owner, view_order = self._query_views(images, color_order, priors, yaws)
        vectors = self.model.encode_batch(views, batch_size=max(1, len(views)),
                                          color_order=view_order,
                                          keep_on_device=self.model.device.type == 'cuda')
        rerank = self.config.rerank
        tracked = self.config.top_k if rerank is None else \
            max(self.config.top_k, rerank.candidates)
        acquiring_k = tracked if rerank is None else max(tracked, rerank.acquiring_candidates)
        # Only a frame without a motion prediction checks the acquisition candidates: while
        # the track holds, the batch searches no deeper than it verifies (on a large
        # approximate index, hundreds of neighbours per frame cost more than the frame).
        searched = acquiring_k if any(self._predict(track, t) is None for t in timestamps) \
            else tracked
        all_indices, all_sims = self.index.search(vectors, searched)
        out = []
        for i in range(n):
            verification = None
            top = self.config.top_k
            rows = [v for v, frame in enumerate(owner) if frame == i]
            queries = vectors[rows]
            prediction = self._predict(track, timestamps[i])
            found, found_sims = self._merged(all_indices[rows], all_sims[rows], searched)
            if self.reranker is not None and prediction is None and searched < acquiring_k:
                # The track was lost within this batch: search this frame again, deeper.
                deeper, deeper_sims = self.index.search(queries, acquiring_k)
                found, found_sims = self._merged(deeper, deeper_sims, acquiring_k)
            prior = priors[i]
            if prior is not None and self.config.camera_model == 'forward':
                found, found_sims = self._facing(found, found_sims,
                                                 prior.camera_heading(yaws[i]), prior.sigma_deg)
            candidates, cand_sims = found[:top], found_sims[:top]
            if self.reranker is not None:
                acquiring = prediction is None
                count = rerank.acquiring_candidates if acquiring else rerank.candidates
                bar = rerank.acquiring_min_inliers if acquiring else rerank.min_inliers
                checked = [int(j) for j in found[:count]]
                near, near_sims = self._prior(queries, checked, prediction)
                features = self.reranker.query_features(self._rgb(images[i], color_order))
                checked += near.tolist()
                verification = self.reranker.verify(features, checked, bar,
                                                    accept=self._rotation_gate(prior, yaws[i]))
                # The estimate also sees every place that was checked beyond the top_k.
                similarity = dict(zip(found.tolist(), found_sims.tolist()))
                similarity.update(zip(near.tolist(), near_sims.tolist()))
                top_set = set(candidates.tolist())
                extra = [j for j in checked if j not in top_set]
                candidates = np.concatenate([candidates, extra]).astype(np.int64)
                cand_sims = np.concatenate(
                    [cand_sims, [similarity[j] for j in extra]]).astype(np.float32)
            measurement = self._measure(
                candidates, cand_sims, timestamps[i], yaws[i], verification, prediction,
                retrieval=[int(j) for j in found[:top]],
                checked=len(checked) if self.reranker is not None else 0,
                heading_source=prior.source if prior is not None else
                ('tta' if len(rows) > 1 else ''))
            if track is not None and measurement.fix and measurement.verified:
                self._continue(track, measurement)
            out.append(measurement)
        latency = (time.perf_counter() - start) / max(1, n)
        return [dataclasses.replace(m, latency_s=latency) for m in out]

    def _continue(self, track: ConstantVelocityTrack, measurement: Measurement) -> None:
        """Feed a verified fix to the track: its position (motion prior on) and its heading."""
        stamp = measurement.timestamp
        if self.config.prior_radius_m > 0:
            track.update(stamp, to_enu(*self._origin, measurement.latitude,
                                       measurement.longitude),
                         measurement.position_covariance[:2, :2])
        track.remember_heading(stamp, measurement.heading,
                               math.degrees(math.sqrt(measurement.heading_variance)))

    @staticmethod
    def _rgb(image, color_order: str) -> np.ndarray:
        """Return any accepted image (array, PIL image, tensor) as an HxWx3 uint8 RGB array."""
        tensor = image_to_tensor(image, color_order)
        return np.ascontiguousarray(tensor.permute(1, 2, 0).cpu().numpy())

    def _query_views(self, images: Sequence, color_order: str,
                     priors: Sequence[Optional[HeadingPrior]], yaws: Sequence[float]):
        """
        Return (images to embed, the frame each belongs to, their colour order).

        A downward camera's image is turned north-up by its heading prior, or without one
        tried at rotation_tta rotations; anything else is embedded as it comes.
        """
        config = self.config
        if config.camera_model != 'nadir' or (config.rotation_tta == 1 and
                                              all(p is None for p in priors)):
            return list(images), list(range(len(images))), color_order
        views, owner = [], []
        for i, image in enumerate(images):
            rgb = self._rgb(image, color_order)
            if priors[i] is not None:
                angles = [priors[i].camera_heading(yaws[i])]
            else:
                angles = tta_angles(config.rotation_tta) if config.rotation_tta > 1 else [None]
            for angle in angles:
                views.append(rgb if angle is None else north_up(rgb, angle))
                owner.append(i)
        return views, owner, 'rgb'

    @staticmethod
    def _merged(indices, sims, k: int):
        """Return one frame's (indices, similarities): of its only query, or merged rotations."""
        if len(indices) == 1:
            return indices[0], sims[0]
        found, found_sims, _ = merge_rotations(list(indices), list(sims), k)
        return found, found_sims

    def _facing(self, found: np.ndarray, sims: np.ndarray, camera_heading: float,
                sigma_deg: float):
        """
        Rank down a forward camera's entries that face away from the prior heading.

        similarity - temperature x (angle / spread)^2 / 2, the prior's sigma widened by
        FORWARD_HEADING_SPREAD_DEG (entries without a heading are left as they are).
        """
        entry_heading = self.database.heading[found]
        angle = np.nan_to_num(angle_difference_deg(entry_heading, camera_heading), nan=0.0)
        spread = math.hypot(sigma_deg, FORWARD_HEADING_SPREAD_DEG)
        adjusted = sims - self.config.prior_similarity_temperature * 0.5 * (angle / spread) ** 2
        order = np.argsort(-adjusted, kind='stable')
        return found[order], adjusted[order].astype(np.float32)

    def _rotation_gate(self, prior: Optional[HeadingPrior], yaw: float):
        """Return verify's accept(index, rotation) for a downward camera's prior, or None."""
        if prior is None or self.config.camera_model != 'nadir':
            return None
        camera_heading = prior.camera_heading(yaw)
        headings = self.database.heading
        gate = self.config.heading_gate_sigmas

        def accept(index: int, rotation_deg: float) -> bool:
            entry = float(headings[index])
            expected = camera_heading - (entry if math.isfinite(entry) else 0.0)
            return rotation_agrees(rotation_deg, expected, prior.sigma_deg, gate)
        return accept

    def _predict(self, track: Optional[ConstantVelocityTrack], timestamp):
        """Return the track's (position, covariance) at this time, or None (no prior)."""
        if track is None or self.config.prior_radius_m <= 0 or self.reranker is None:
            return None
        return track.predict(timestamp)

    def _prior(self, queries, checked: Sequence[int], prediction):
        """
        Return (indices, similarities) of the places inside the prediction's gate, not checked.

        The gate is the 3-sigma ellipse of the prediction's covariance widened by
        prior_radius_m (its 3-sigma radius when the prediction is exact); the nearest
        prior_candidates places inside it by Mahalanobis distance are returned. queries: the
        frame's query vectors (several rotations: each place takes its best).
        """
        config = self.config
        none = (np.zeros(0, np.int64), np.zeros(0, np.float32))
        if prediction is None or config.prior_candidates == 0:
            return none
        mean, covariance = prediction
        gate = covariance + (config.prior_radius_m / 3.0) ** 2 * np.eye(2)
        # Only the places in the gate's bounding box can be inside it (3 sigma on each axis).
        reach = 3.0 * np.sqrt(np.diag(gate))
        boxed = self._places.within(mean - reach, mean + reach)
        distance_sq = mahalanobis_sq(self._places.enu[boxed] - mean, gate[None])
        seen = set(checked)
        near = [int(boxed[j])
                for j in np.argsort(distance_sq, kind='stable')[:config.prior_candidates]
                if distance_sq[j] <= 9.0 and int(boxed[j]) not in seen]
        if not near:
            return none
        # Their similarities are computed exactly, so the estimate weighs them like the rest.
        vectors = np.asarray(queries.detach().float().cpu(), dtype=np.float32).reshape(
            -1, self.database.embeddings.shape[1])
        sims = (self.database.embeddings[near].astype(np.float32) @ vectors.T).max(axis=1)
        return np.array(near, np.int64), sims.astype(np.float32)

    def _rank_with_prior(self, matches: List[Match], idx: np.ndarray, prediction) -> None:
        """
        Order matches by similarity / temperature - (squared Mahalanobis distance) / 2.

        That is the log of (similarity likelihood x Gaussian prior): a place the embedding
        likes but the motion cannot reach drops, a reachable place rises. The prediction's
        covariance is widened by half the grid spacing (a place is an area, not a point).
        """
        mean, covariance = prediction
        half = 0.5 * float(self.database.grid_spacing_m or 0.0)
        distance_sq = mahalanobis_sq(self._places.enu[idx] - mean,
                                     (covariance + half ** 2 * np.eye(2))[None])
        score = np.array([m.similarity for m in matches]) / \
            self.config.prior_similarity_temperature - 0.5 * distance_sq
        order = np.argsort(-score, kind='stable')
        matches[:] = [matches[j] for j in order]

    def _measure(self, idx: np.ndarray, sim: np.ndarray, timestamp, yaw: float,
                 verification: Optional[Verification], prediction=None,
                 **record) -> Measurement:
        """
        Return the frame's Measurement: the retrieval estimate, or the verified one.

        record: the frame's retrieval, checked and heading_source, stored as they come.
        """
        db = self.database
        pose = estimate_pose(db.latitude[idx], db.longitude[idx], db.altitude[idx],
                             db.heading[idx], sim, db.grid_spacing_m, self._estimator,
                             heading_offset_deg=yaw)
        matches = [Match(int(i), str(db.image_ids[i]), float(db.latitude[i]),
                         float(db.longitude[i]), float(db.heading[i]), float(s))
                   for i, s in zip(idx, sim)]
        if prediction is not None:
            self._rank_with_prior(matches, idx, prediction)
        if self.reranker is None:
            outcome = {'fix': pose.fix, 'no_fix_reason': '' if pose.fix else
                       'retrieval confidence below min_confidence'}
        elif verification is None:
            outcome = self._unverified()
        else:
            outcome = self._verified(pose, matches, verification, yaw)
        fields = {'latitude': pose.latitude, 'longitude': pose.longitude,
                  'heading': pose.heading, 'heading_variance': pose.heading_variance,
                  'position_covariance': pose.position_covariance,
                  'confidence': pose.confidence}
        fields.update(outcome)
        return Measurement(timestamp=timestamp, altitude=pose.altitude, matches=matches,
                           tracked=prediction is not None, **fields, **record)

    def _unverified(self) -> dict:
        """
        Return the outcome of a frame whose candidates all failed the geometric check.

        It keeps the retrieval estimate for the record but is not a fix: retrieval alone is
        wrong too often to publish. Its confidence is the chance such an estimate is right,
        as the map's calibration flight measured it, else 0: confidence always estimates
        whether the reported position is right, on the scale of the verified fixes'.
        """
        return {'fix': False, 'verified': False, 'no_fix_reason': 'no candidate verified',
                'confidence': self._calibration.unverified_confidence}

    def _verified(self, pose: PoseEstimate, matches: List[Match],
                  verification: Verification, yaw: float) -> dict:
        """
        Return the outcome of a verified frame: the verified place refined in-tile.

        The verified place moves to the front of `matches`. The position is the place's
        centre moved by the verification's offset (with the map's ground sampling distance),
        its covariance the map's calibrated model, else the inlier-based sigma.
        """
        db, calibration = self.database, self._calibration
        config = self.config.rerank
        entry = verification.index
        rank = next(r for r, match in enumerate(matches) if match.index == entry)
        matches.insert(0, matches.pop(rank))
        # Whether it is a fix: the share of inliers over the bar, as without a calibration.
        share = verification.inliers / (verification.inliers + config.min_inliers)
        fix = share >= self.config.estimator.min_confidence
        gsd = math.nan if calibration.gsd_m is None else calibration.gsd_m
        features = FixFeatures.of(verification, gsd)
        outcome = {
            'fix': fix, 'verified': True, 'inliers': verification.inliers,
            'verification': verification,
            'no_fix_reason': '' if fix else 'verified confidence below min_confidence',
            # The reported confidence: the map's calibrated P(right) when it holds one.
            'confidence': share if calibration.confidence_model is None else
            calibration.confidence_model.probability(features)}
        db_heading = float(db.heading[entry])
        if math.isfinite(db_heading):
            outcome.update(heading=float(wrap_degrees(db_heading + verification.rotation_deg
                                                      + yaw)),
                           heading_variance=math.radians(config.heading_sigma_deg) ** 2)
        if not math.isfinite(gsd):  # no ground scale: the verified place itself
            return dict(outcome, latitude=float(db.latitude[entry]),
                        longitude=float(db.longitude[entry]))
        east, north = offset_to_enu(verification.offset_px, gsd, db_heading)
        lat, lon = from_enu(float(db.latitude[entry]), float(db.longitude[entry]), east, north)
        covariance = np.array(pose.position_covariance, dtype=float)
        if calibration.covariance_model is not None:   # fitted on a calibration flight
            covariance[:2, :2] = config.covariance_scale * \
                calibration.covariance_model.covariance_en(features)
        else:
            scale = config.covariance_scale * calibration.verified_covariance_scale
            sigma = verified_position_sigma_m(verification, gsd)
            covariance[:2, :2] = scale * sigma ** 2 * np.eye(2)
        return dict(outcome, latitude=float(lat), longitude=float(lon),
                    position_covariance=covariance)
