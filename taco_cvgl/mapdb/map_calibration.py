"""
MapCalibration: what a map knows of its own geometry and of how far off its fixes are.

One typed record, saved in the database's `meta` under the keys it always had (so maps built
before still load, and a map keeps working with older readers):

- `gsd_m`: ground size of one database-image pixel, metres. It turns a verification's pixel
  offset into metres (the in-tile refinement) and scales the covariance; without it a verified
  fix is placed at the tile's centre. `taco-cvgl build-db --gsd-m`, or known to the demo.
- `grid_spacing_m`: typical distance between neighbouring places, metres
  (`build-db --grid-spacing-m`); without it, measured from the positions (median
  nearest-neighbour distance) and recorded when the database is saved.
- `covariance_scale`: factor on the retrieval estimate's covariance (`build-db
  --covariance-scale`).
- `verified_covariance_scale`: factor on the uncalibrated verified sigma (maps calibrated
  before the feature model existed).
- `verified_covariance_model`, `verified_confidence_model`, `unverified_confidence`: the models
  fitted on a calibration flight (`mapdb.calibration`), by `taco-cvgl calibrate` or the demo
  (`localization.calibrate.fit_map_calibration`).

`from_meta` checks every value and names the key it refuses; nothing else reads these keys.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, Mapping, Optional

from taco_cvgl.errors import InputError
from taco_cvgl.mapdb.calibration import (CONFIDENCE_META_KEY, ConfidenceModel,
                                         COVARIANCE_META_KEY, CovarianceModel,
                                         unverified_confidence, UNVERIFIED_META_KEY)

# The plain numbers of the record: meta key -> whether it may be absent (None).
NUMBERS = {'gsd_m': True, 'grid_spacing_m': True, 'covariance_scale': False,
           'verified_covariance_scale': False}
# Every meta key the record owns.
KEYS = tuple(NUMBERS) + (COVARIANCE_META_KEY, CONFIDENCE_META_KEY, UNVERIFIED_META_KEY)


@dataclasses.dataclass(frozen=True)
class MapCalibration:
    """The map's ground scale, place spacing and error models (see the module docstring)."""

    gsd_m: Optional[float] = None
    grid_spacing_m: Optional[float] = None
    covariance_scale: float = 1.0
    verified_covariance_scale: float = 1.0
    covariance_model: Optional[CovarianceModel] = None
    confidence_model: Optional[ConfidenceModel] = None
    unverified_confidence: float = 0.0

    def __post_init__(self):
        """Refuse a number that is not positive and finite, naming it."""
        for name, optional in NUMBERS.items():
            value = getattr(self, name)
            if value is None and optional:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                    not (math.isfinite(value) and value > 0):
                raise InputError(f'{name} must be a positive number, got {value!r}')
        if not 0.0 <= self.unverified_confidence <= 1.0:
            raise InputError(f'unverified_confidence must be within [0, 1], got '
                             f'{self.unverified_confidence!r}')

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any]) -> 'MapCalibration':
        """Return the record a database meta holds (InputError naming a malformed key)."""
        numbers = {name: meta[name] for name in NUMBERS if meta.get(name) is not None}
        covariance = meta.get(COVARIANCE_META_KEY)
        confidence = meta.get(CONFIDENCE_META_KEY)
        return cls(**numbers,
                   covariance_model=None if covariance is None else
                   CovarianceModel.from_meta(covariance),
                   confidence_model=None if confidence is None else
                   ConfidenceModel.from_meta(confidence),
                   unverified_confidence=unverified_confidence(meta))

    def to_meta(self) -> Dict[str, Any]:
        """Return the meta entries of this record (absent values left out)."""
        out: Dict[str, Any] = {name: float(getattr(self, name)) for name in NUMBERS
                               if getattr(self, name) is not None}
        if self.covariance_model is not None:
            out[COVARIANCE_META_KEY] = self.covariance_model.to_meta()
        if self.confidence_model is not None:
            out[CONFIDENCE_META_KEY] = self.confidence_model.to_meta()
        return out

    def apply_to(self, meta: Dict[str, Any], unverified: Optional[Dict[str, Any]] = None
                 ) -> None:
        """
        Replace the calibration entries of a database meta by this record's.

        unverified: the fit_unverified record (with its counts) behind unverified_confidence;
        without one, a non-zero unverified_confidence is stored as a bare probability.
        """
        for key in KEYS:
            meta.pop(key, None)
        meta.update(self.to_meta())
        if unverified is not None:
            meta[UNVERIFIED_META_KEY] = dict(unverified)
        elif self.unverified_confidence > 0:
            meta[UNVERIFIED_META_KEY] = {'kind': 'rate',
                                         'probability': float(self.unverified_confidence)}
