"""
How far off a verified fix is, and how likely it is right: two small models fitted on a flight.

A verified fix (rerank.Verification) carries what the geometric check saw: the inliers, their
RMS residual, the fitted scale, and the inliers every other candidate gathered. On a
calibration flight with ground truth each fix's error is known, so both models are fitted there
and stored in the map database's meta as plain JSON (`to_meta()` / `from_meta()`):

- `CovarianceModel`: the 1-sigma horizontal error of a fix, sigma = gsd_m * exp(c . x), x being
  1 and the fix's terms (by default log inliers, log residual, and the query centre's offset
  from the candidate's centre: the further off, the further the inliers' similarity transform
  is extrapolated), fitted by maximum likelihood of an isotropic 2-D Gaussian on the (east,
  north) errors. The likelihood is convex in c (Newton's method finds its optimum). With too
  few fixes for the terms it falls back to one factor on `rerank.verified_position_sigma_m`,
  the factor that puts 95 % of the errors within 2 sigma (what the demo calibrated before).
- `ConfidenceModel`: P(the fix lies within `right_within_m` of the truth), a logistic
  regression on the terms (by default those of the covariance and the log ratio of the best to
  the runner-up candidate's inliers), fitted with a small ridge penalty so that a flight whose
  fixes are all right still gives finite weights. With too few right or too few wrong fixes
  it falls back to inliers / (inliers + min_inliers), the localizer's formula.

Each term is clipped to the range it spanned on the calibration flight, so a fix unlike any
seen there gets the figure of the nearest one seen, not an extrapolation.
Units: metres, pixels of the database image (residual), candidate pixels per query pixel
(scale); errors on (east, north) axes.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

import numpy as np
from taco_cvgl.errors import InputError
from taco_cvgl.localization.estimate import calibrate_scale
from taco_cvgl.localization.rerank import verified_position_sigma_m

# Keys of the database meta that hold the models.
COVARIANCE_META_KEY = 'verified_covariance_model'
CONFIDENCE_META_KEY = 'verified_confidence_model'
UNVERIFIED_META_KEY = 'unverified_confidence'
# A residual below this (px) is taken as this: a perfect fit says nothing more than a tiny one.
RESIDUAL_FLOOR_PX = 0.05
# The defaults won on the demo's calibration flights (likelihood, cross-validated log loss);
# log_scale added nothing there once the offset was in.
COVARIANCE_TERMS = ('log_inliers', 'log_residual', 'offset_100px')
CONFIDENCE_TERMS = ('log_inliers', 'log_residual', 'log_inlier_margin', 'offset_100px')
# Fixes needed per fitted coefficient before the feature model is trusted.
FIXES_PER_COEFFICIENT = 8
# Fixes the single-scale fallback needs (as the demo's calibration did).
MIN_FALLBACK_FIXES = 10
# Right and wrong fixes each needed before a logistic fit is trusted.
MIN_CLASS_FIXES = 5
# A term with less spread than this over the flight is dropped (it only repeats the constant).
_MIN_SPREAD = 1e-6


@dataclasses.dataclass(frozen=True)
class FixFeatures:
    """What a verified fix says about itself (see rerank.Verification)."""

    inliers: int
    residual_px: float          # RMS residual of the inliers, database pixels
    scale: float                # database pixels per query pixel
    gsd_m: float                # ground size of a database pixel, metres
    runner_up_inliers: int = 0  # inliers of the best other candidate (0: none)
    offset_px: float = 0.0      # query centre's distance from the candidate's, database pixels

    @classmethod
    def of(cls, verification, gsd_m: float) -> 'FixFeatures':
        """Return the features of a rerank.Verification on a map of ground pixel gsd_m."""
        counts = sorted((int(c) for c in verification.inliers_per_candidate), reverse=True)
        # The winner is among the counts; the runner-up is the largest of the others.
        runner_up = counts[1] if len(counts) > 1 else 0
        return cls(inliers=int(verification.inliers),
                   residual_px=float(verification.residual_px),
                   scale=float(verification.scale), gsd_m=float(gsd_m),
                   runner_up_inliers=min(runner_up, int(verification.inliers)),
                   offset_px=float(np.hypot(*np.asarray(verification.offset_px, float)[:2])))


def _column(features: Sequence[FixFeatures], name: str) -> np.ndarray:
    """Return one field of every fix as a float array."""
    return np.array([getattr(f, name) for f in features], dtype=float)


# Each term: a function of the features' columns, named in the stored model.
TERMS: Dict[str, Callable[[Sequence[FixFeatures]], np.ndarray]] = {
    'log_inliers': lambda f: np.log(np.maximum(_column(f, 'inliers'), 1.0)),
    'log_residual': lambda f: np.log(np.maximum(_column(f, 'residual_px'), RESIDUAL_FLOOR_PX)),
    'log_scale': lambda f: np.log(_column(f, 'scale')),
    'offset_100px': lambda f: _column(f, 'offset_px') / 100.0,
    'log_inlier_margin': lambda f: np.log1p(_column(f, 'inliers'))
    - np.log1p(_column(f, 'runner_up_inliers')),
}


def term_matrix(features: Sequence[FixFeatures], terms: Sequence[str]) -> np.ndarray:
    """Return the N x len(terms) values of the named terms (InputError for an unknown name)."""
    unknown = [t for t in terms if t not in TERMS]
    if unknown:
        raise InputError(f'unknown calibration term {unknown[0]!r}; known: {sorted(TERMS)}')
    if not len(features) or not len(terms):
        return np.zeros((len(features), len(terms)))
    return np.stack([TERMS[t](features) for t in terms], axis=1).reshape(len(features), -1)


def _design(features, terms, bounds) -> np.ndarray:
    """Return [1, terms...] per fix, each term clipped to its fitted range."""
    x = term_matrix(features, terms)
    if len(terms):
        low, high = np.asarray(bounds, dtype=float).reshape(-1, 2).T
        x = np.clip(x, low, high)
    return np.concatenate([np.ones((len(x), 1)), x], axis=1)


def _newton(objective, start: np.ndarray, iterations: int = 100,
            tolerance: float = 1e-10) -> Optional[np.ndarray]:
    """
    Minimise a convex objective(c) -> (value, gradient, hessian) by damped Newton steps.

    Returns None when it does not converge or the Hessian is singular (an ill-posed fit).
    """
    c = np.asarray(start, dtype=float)
    value, gradient, hessian = objective(c)
    for _ in range(iterations):
        try:
            step = np.linalg.solve(hessian, -gradient)
        except np.linalg.LinAlgError:
            return None
        decrease = -float(gradient @ step)
        if not np.isfinite(decrease):
            return None
        if decrease < tolerance:
            return c
        t = 1.0
        while t > 1e-10:   # backtrack until the objective drops enough (Armijo)
            trial = c + t * step
            new = objective(trial)
            if np.isfinite(new[0]) and new[0] <= value - 0.25 * t * decrease:
                break
            t *= 0.5
        else:
            return None
        c, (value, gradient, hessian) = trial, new
    return None


def _standardized(x: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return the terms (columns 1..) centred and scaled, with their means and spreads."""
    mean, spread = x[:, 1:].mean(axis=0), x[:, 1:].std(axis=0)
    z = x.copy()
    z[:, 1:] = (x[:, 1:] - mean) / spread
    return z, mean, spread


def _unstandardized(c: np.ndarray, mean: np.ndarray, spread: np.ndarray) -> np.ndarray:
    """Turn coefficients of standardized terms into coefficients of the raw terms."""
    weights = c[1:] / spread
    return np.concatenate([[c[0] - float(weights @ mean)], weights])


def _kept_terms(features, terms) -> Tuple[Tuple[str, ...], np.ndarray]:
    """Return the terms that vary over the flight, and their [low, high] ranges."""
    x = term_matrix(features, terms)
    if not np.isfinite(x).all():
        raise InputError('calibration: a fix has a term that is not finite (scale <= 0?)')
    keep = [i for i in range(len(terms)) if x[:, i].std() > _MIN_SPREAD] if len(x) else []
    bounds = np.stack([x[:, keep].min(axis=0), x[:, keep].max(axis=0)], axis=1) \
        if keep else np.zeros((0, 2))
    return tuple(terms[i] for i in keep), bounds


# ---------------------------------------------------------------------------------------------
# Covariance


@dataclasses.dataclass(frozen=True)
class CovarianceModel:
    """
    The 1-sigma horizontal error of a verified fix, metres (same on east and north).

    kind 'features': sigma = gsd_m * exp(coefficients . [1, terms]), terms clipped to bounds.
    kind 'single_scale': sigma^2 = scale * rerank.verified_position_sigma_m(fix)^2.
    """

    kind: str = 'single_scale'
    terms: Tuple[str, ...] = ()
    coefficients: Tuple[float, ...] = ()
    bounds: Tuple[Tuple[float, float], ...] = ()
    scale: float = 1.0
    fixes: int = 0                  # fixes it was fitted on
    note: str = ''                  # why the fallback was taken ('' for a feature fit)

    def __post_init__(self):
        """Refuse a model that cannot compute a sigma, naming what is wrong."""
        _check_model(self.kind, ('features', 'single_scale'), self.terms, self.coefficients,
                     self.bounds, 'covariance')
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise InputError(f'covariance model: scale must be a positive number, got '
                             f'{self.scale!r}')

    def sigmas_m(self, features: Sequence[FixFeatures]) -> np.ndarray:
        """Return the 1-sigma horizontal error (m) of each fix."""
        gsd = _column(features, 'gsd_m')
        if self.kind == 'features':
            x = _design(features, self.terms, self.bounds)
            return gsd * np.exp(x @ np.asarray(self.coefficients))
        return math.sqrt(self.scale) * _base_sigmas_m(features)

    def sigma_m(self, features: FixFeatures) -> float:
        """Return the 1-sigma horizontal error (m) of one fix."""
        return float(self.sigmas_m([features])[0])

    def covariance_en(self, features: FixFeatures) -> np.ndarray:
        """Return the fix's 2x2 (east, north) covariance, m^2."""
        return self.sigma_m(features) ** 2 * np.eye(2)

    def to_meta(self) -> Dict[str, Any]:
        """Return the model as a JSON-able dict (for EmbeddingDatabase.meta)."""
        return _to_meta(self)

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any]) -> 'CovarianceModel':
        """Return the model a to_meta() dict describes (InputError when it is malformed)."""
        return _from_meta(cls, meta, 'covariance')


def _base_sigmas_m(features: Sequence[FixFeatures]) -> np.ndarray:
    """Return rerank.verified_position_sigma_m per fix (it reads inliers and residual_px)."""
    return np.array([verified_position_sigma_m(f, f.gsd_m) for f in features], dtype=float)


def fit_single_scale(features: Sequence[FixFeatures], errors_en, note: str = ''
                     ) -> CovarianceModel:
    """
    Return the one-factor model: 95 % of the errors within 2 sigma of the base formula.

    With fewer than MIN_FALLBACK_FIXES fixes the factor stays 1 (uncalibrated) and note says so.
    """
    errors = _errors(features, errors_en)
    if len(errors) < MIN_FALLBACK_FIXES:
        return CovarianceModel(fixes=len(errors), note=(
            f'{note}; ' if note else '') + f'only {len(errors)} fixes: uncalibrated (scale 1)')
    base = _base_sigmas_m(features) ** 2
    scale = calibrate_scale(errors, base[:, None, None] * np.eye(2))
    return CovarianceModel(scale=max(scale, 1e-12), fixes=len(errors), note=note)


def fit_covariance(features: Sequence[FixFeatures], errors_en,
                   terms: Sequence[str] = COVARIANCE_TERMS) -> CovarianceModel:
    """
    Fit sigma = gsd * exp(c . [1, terms]) by maximum likelihood on (east, north) errors (m).

    Each error e is taken as drawn from N(0, sigma^2 I): its negative log-likelihood is
    2 log sigma + |e|^2 / (2 sigma^2) + const, convex in c. Terms that do not vary over the
    flight are dropped; with fewer than FIXES_PER_COEFFICIENT fixes per coefficient, or a fit
    that does not converge, the single-scale fallback is returned (its note says why).
    """
    errors = _errors(features, errors_en)
    kept, bounds = _kept_terms(features, tuple(terms))
    needed = FIXES_PER_COEFFICIENT * (len(kept) + 1)
    if len(errors) < needed:
        return fit_single_scale(features, errors, note=f'{len(errors)} fixes, fewer than the '
                                f'{needed} a fit of {len(kept) + 1} coefficients needs')
    x = _design(features, kept, bounds)
    z, mean, spread = _standardized(x)
    gsd = _column(features, 'gsd_m')
    # Half the squared error in ground pixels, floored: an exact hit must not pull sigma to 0.
    half_sq = np.maximum(0.5 * np.sum(errors ** 2, axis=1) / gsd ** 2, 1e-12)

    def objective(c):
        log_sigma = z @ c
        w = half_sq * np.exp(-2.0 * log_sigma)
        return (float(np.sum(2.0 * log_sigma + w)), 2.0 * z.T @ (1.0 - w),
                4.0 * (z * w[:, None]).T @ z)

    start = np.zeros(z.shape[1])
    start[0] = 0.5 * math.log(float(np.mean(half_sq)))
    c = _newton(objective, start)
    if c is None:
        return fit_single_scale(features, errors, note='the likelihood fit did not converge')
    return CovarianceModel(kind='features', terms=kept,
                           coefficients=tuple(float(v) for v in
                                              _unstandardized(c, mean, spread)),
                           bounds=tuple((float(a), float(b)) for a, b in bounds),
                           fixes=len(errors))


def _errors(features: Sequence[FixFeatures], errors_en) -> np.ndarray:
    """Return the errors as N x 2, refusing a count or a value that does not fit."""
    errors = np.asarray(errors_en, dtype=float).reshape(-1, 2)
    if len(errors) != len(features):
        raise InputError(f'calibration: {len(features)} fixes but {len(errors)} errors')
    if not np.isfinite(errors).all():
        raise InputError('calibration: every error must be finite (leave out frames without '
                         'ground truth)')
    gsd = _column(features, 'gsd_m')
    if len(gsd) and not (np.isfinite(gsd).all() and (gsd > 0).all()):
        raise InputError('calibration: every fix needs a positive gsd_m (a map of '
                         'orthorectified tiles)')
    return errors


# ---------------------------------------------------------------------------------------------
# Confidence


@dataclasses.dataclass(frozen=True)
class ConfidenceModel:
    """
    P(a verified fix lies within right_within_m of the truth).

    kind 'logistic': 1 / (1 + exp(-coefficients . [1, terms])), terms clipped to bounds.
    kind 'inlier_ratio': inliers / (inliers + min_inliers), the localizer's formula.
    """

    kind: str = 'inlier_ratio'
    terms: Tuple[str, ...] = ()
    coefficients: Tuple[float, ...] = ()
    bounds: Tuple[Tuple[float, float], ...] = ()
    min_inliers: int = 15
    right_within_m: float = math.inf
    fixes: int = 0
    note: str = ''

    def __post_init__(self):
        """Refuse a model that cannot compute a probability, naming what is wrong."""
        _check_model(self.kind, ('logistic', 'inlier_ratio'), self.terms, self.coefficients,
                     self.bounds, 'confidence')
        if isinstance(self.min_inliers, bool) or not isinstance(self.min_inliers, int) or \
                self.min_inliers < 1:
            raise InputError(f'confidence model: min_inliers must be an integer >= 1, got '
                             f'{self.min_inliers!r}')
        if not self.right_within_m > 0:
            raise InputError(f'confidence model: right_within_m must be > 0, got '
                             f'{self.right_within_m!r}')

    def probabilities(self, features: Sequence[FixFeatures]) -> np.ndarray:
        """Return P(right) of each fix."""
        if self.kind == 'logistic':
            logit = _design(features, self.terms, self.bounds) @ np.asarray(self.coefficients)
            return 0.5 * (1.0 + np.tanh(0.5 * logit))   # the logistic function, overflow-free
        inliers = _column(features, 'inliers')
        return inliers / (inliers + self.min_inliers)

    def probability(self, features: FixFeatures) -> float:
        """Return P(right) of one fix."""
        return float(self.probabilities([features])[0])

    def to_meta(self) -> Dict[str, Any]:
        """Return the model as a JSON-able dict (for EmbeddingDatabase.meta)."""
        meta = _to_meta(self)
        if not math.isfinite(self.right_within_m):
            meta['right_within_m'] = None     # JSON has no infinity
        return meta

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any]) -> 'ConfidenceModel':
        """Return the model a to_meta() dict describes (InputError when it is malformed)."""
        if isinstance(meta, Mapping) and meta.get('right_within_m', 0) is None:
            meta = {**meta, 'right_within_m': math.inf}
        return _from_meta(cls, meta, 'confidence')


def fit_confidence(features: Sequence[FixFeatures], errors_m, right_within_m: float,
                   terms: Sequence[str] = CONFIDENCE_TERMS, ridge: float = 1.0,
                   min_inliers: int = 15) -> ConfidenceModel:
    """
    Fit P(error <= right_within_m) as a logistic regression on the fixes' terms.

    errors_m: each fix's horizontal error (m). The penalty ridge/2 |w|^2 on the weights of the
    standardized terms (not on the constant) keeps them finite when no fix is wrong. With
    fewer than MIN_CLASS_FIXES right or wrong fixes, or FIXES_PER_COEFFICIENT fixes per
    coefficient, the inlier-ratio fallback (min_inliers as the localizer's) is returned.
    """
    errors = np.asarray(errors_m, dtype=float).reshape(-1)
    if len(errors) != len(features):
        raise InputError(f'calibration: {len(features)} fixes but {len(errors)} errors')
    if not (right_within_m > 0) or np.isnan(errors).any() or not ridge >= 0:
        raise InputError('calibration: right_within_m must be > 0, ridge >= 0, errors not NaN')
    right = errors <= right_within_m
    kept, bounds = _kept_terms(features, tuple(terms))
    counts = (int(right.sum()), int((~right).sum()))
    needed = FIXES_PER_COEFFICIENT * (len(kept) + 1)
    common = {'min_inliers': int(min_inliers), 'right_within_m': float(right_within_m),
              'fixes': len(errors)}
    if min(counts) < MIN_CLASS_FIXES or len(errors) < needed:
        return ConfidenceModel(note=f'{counts[0]} right and {counts[1]} wrong fixes; a fit '
                               f'needs {MIN_CLASS_FIXES} of each and {needed} in all', **common)
    z, mean, spread = _standardized(_design(features, kept, bounds))
    y = right.astype(float)
    penalty = np.full(z.shape[1], float(ridge))
    penalty[0] = 0.0

    def objective(c):
        logit = z @ c
        p = 0.5 * (1.0 + np.tanh(0.5 * logit))
        # -log likelihood, written with logaddexp so that no probability rounds to 0 or 1.
        value = float(np.sum(np.logaddexp(0.0, logit) - y * logit) + 0.5 * penalty @ c ** 2)
        return (value, z.T @ (p - y) + penalty * c,
                (z * (p * (1.0 - p))[:, None]).T @ z + np.diag(penalty))

    start = np.zeros(z.shape[1])
    start[0] = math.log(counts[0] / counts[1])
    c = _newton(objective, start)
    if c is None:
        return ConfidenceModel(note='the logistic fit did not converge', **common)
    return ConfidenceModel(kind='logistic', terms=kept,
                           coefficients=tuple(float(v) for v in
                                              _unstandardized(c, mean, spread)),
                           bounds=tuple((float(a), float(b)) for a, b in bounds), **common)


# ---------------------------------------------------------------------------------------------
# Storage


def _check_model(kind, kinds, terms, coefficients, bounds, what: str) -> None:
    """Refuse an unknown kind, unknown terms, or coefficients and bounds that do not fit."""
    if kind not in kinds:
        raise InputError(f'{what} model: kind must be one of {list(kinds)}, got {kind!r}')
    unknown = [t for t in terms if t not in TERMS]
    if unknown:
        raise InputError(f'{what} model: unknown term {unknown[0]!r}; known: {sorted(TERMS)}')
    fitted = kind in ('features', 'logistic')
    if fitted and len(coefficients) != len(terms) + 1:
        raise InputError(f'{what} model: {len(terms)} terms need {len(terms) + 1} '
                         f'coefficients, got {len(coefficients)}')
    if fitted and len(bounds) != len(terms):
        raise InputError(f'{what} model: {len(terms)} terms need {len(terms)} bounds, got '
                         f'{len(bounds)}')
    values = [*coefficients, *(v for pair in bounds for v in pair)]
    if not all(math.isfinite(v) for v in values) or any(lo > hi for lo, hi in bounds):
        raise InputError(f'{what} model: coefficients and bounds must be finite numbers, '
                         f'each bound low <= high')


def _to_meta(model) -> Dict[str, Any]:
    """Return a model's fields as JSON-able values (tuples as lists)."""
    meta = dataclasses.asdict(model)
    meta['terms'] = list(model.terms)
    meta['coefficients'] = list(model.coefficients)
    meta['bounds'] = [list(pair) for pair in model.bounds]
    return meta


def _from_meta(cls, meta, what: str):
    """Build a model from its to_meta() dict, refusing anything else with a clear message."""
    if not isinstance(meta, Mapping):
        raise InputError(f'{what} model: expected a JSON object, got {type(meta).__name__}')
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(meta) - set(fields))
    if unknown or 'kind' not in meta:
        raise InputError(f'{what} model: unknown keys {unknown}' if unknown else
                         f'{what} model: no kind given')
    values = dict(meta)
    try:
        for name in ('terms', 'coefficients', 'bounds'):
            if name in values:
                values[name] = _as_tuple(values[name], name)
        for name in ('scale', 'right_within_m'):
            if name in values and (isinstance(values[name], bool)
                                   or not isinstance(values[name], (int, float))):
                raise TypeError(f'{name} must be a number')
        if 'fixes' in values and (isinstance(values['fixes'], bool)
                                  or not isinstance(values['fixes'], int)):
            raise TypeError('fixes must be an integer')
        if not isinstance(values.get('note', ''), str):
            raise TypeError('note must be a string')
    except (TypeError, ValueError) as exc:
        raise InputError(f'{what} model: {exc}') from None
    return cls(**values)


def _as_tuple(value, name: str):
    """Return a JSON list (of strings, numbers or number pairs) as nested tuples."""
    if not isinstance(value, (list, tuple)):
        raise TypeError(f'{name} must be a list')
    if name == 'terms':
        if not all(isinstance(v, str) for v in value):
            raise TypeError('terms must be strings')
        return tuple(value)
    if name == 'bounds':
        if not all(isinstance(p, (list, tuple)) and len(p) == 2 for p in value):
            raise TypeError('bounds must be [low, high] pairs')
        return tuple(tuple(_number(v, name) for v in p) for p in value)
    return tuple(_number(v, name) for v in value)


def _number(value, name: str) -> float:
    """Return a JSON number as a float (a bool or a string is not one)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f'{name} must hold numbers, got {value!r}')
    return float(value)


def fit_unverified(errors_m, right_within_m: float) -> Dict[str, Any]:
    """
    Return the meta entry for frames that no candidate verified: how often they were right anyway.

    errors_m: the retrieval estimate's error (m) of each such frame of a calibration flight;
    right: within right_within_m. The probability is Laplace's rule of succession,
    (right + 1) / (frames + 2), so that a short flight neither promises nor rules out.
    """
    errors = np.asarray(errors_m, dtype=float).reshape(-1)
    errors = errors[np.isfinite(errors)]
    right = int(np.count_nonzero(errors <= right_within_m))
    return {'kind': 'rate', 'right': right, 'frames': int(errors.size),
            'right_within_m': float(right_within_m),
            'probability': (right + 1) / (errors.size + 2)}


def unverified_confidence(meta: Mapping[str, Any]) -> float:
    """Return P(right) of an unverified frame as the map's calibration holds it, else 0."""
    entry = meta.get(UNVERIFIED_META_KEY)
    if entry is None:
        return 0.0
    try:
        value = _number(entry['probability'], 'probability')
    except (KeyError, TypeError) as exc:
        raise InputError(f'{UNVERIFIED_META_KEY} is not a probability record: {exc}') from None
    if not 0.0 <= value <= 1.0:
        raise InputError(f'{UNVERIFIED_META_KEY}: probability {value} is not within [0, 1]')
    return value
