"""
The embedding database: GPS-tagged embeddings, built from images, stored without pickle.

File format (`.npz`, read with allow_pickle=False): `embeddings` NxD (fp16 or fp32, rows
L2-normalised), `latitude`, `longitude`, `altitude`, `heading` (float64, NaN where unknown; heading
in degrees clockwise from north), `image_ids` (unicode), and JSON strings `model_config`, `meta`,
plus `model_fingerprint`. A database is written to a temporary file and renamed into place, so a
killed build never leaves a file that loads as a database.

Image paths: `image_base` 'database' (written since it was added) says a relative `image_ids`
entry is relative to the database file's folder: images under that folder are stored relative to
it, others absolute, so a map folder can be moved or used from any working directory. Files
without `image_base` hold paths as build-db was given them (relative to the folder it ran in) and
load as they are. In memory (after `load`) the ids are paths usable from the working directory.

Loading checks every array against this format before it is used (a malformed or hostile file is
one InputError naming it); an array whose header claims more data than its zip member holds is
refused before any memory is allocated for it.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
import csv
import dataclasses
import datetime
import io
import json
import math
import os
from pathlib import Path
import struct
import tokenize
from typing import Callable, Dict, Iterable, List, Optional, Sequence
import zipfile
import zlib

import numpy as np
from taco_cvgl.errors import InputError, MismatchError
from taco_cvgl.files.atomic import atomic_path
from taco_cvgl.mapdb.map_calibration import MapCalibration
from taco_cvgl.model.config import ModelConfig

FORMAT = 'taco_cvgl.database/1'
CSV_REQUIRED = ('image_path', 'latitude', 'longitude')
CSV_OPTIONAL = ('heading', 'altitude')
IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png', '.tif', '.tiff', '.bmp', '.webp')
REQUIRED_KEYS = ('embeddings', 'latitude', 'longitude', 'altitude', 'heading', 'image_ids',
                 'model_config', 'model_fingerprint', 'meta')
# Value of the `image_base` array: relative image paths are relative to the database's folder.
IMAGE_BASE = 'database'
# Rows whose norm is further than this from 1 are not L2-normalised (fp16 storage stays within).
NORM_TOLERANCE = 1e-2
# Bytes copied at a time from a zip member, and embedding rows checked at a time.
_READ_BLOCK = 1 << 24
_ROW_BLOCK = 1 << 13


@dataclasses.dataclass
class ImageRecord:
    """One database image: where its file is and where it was taken."""

    path: str
    latitude: float
    longitude: float
    altitude: float = math.nan
    heading: float = math.nan


def check_coordinates(lat: float, lon: float, where: str) -> None:
    """Raise InputError unless lat/lon are finite and in range."""
    if not (math.isfinite(lat) and math.isfinite(lon)):
        raise InputError(f'{where}: latitude/longitude must be numbers, got {lat}, {lon}')
    if not (-90.0 <= lat <= 90.0 and -180.0 <= lon <= 180.0):
        raise InputError(f'{where}: latitude {lat} / longitude {lon} out of range')


def read_csv(csv_path, images_dir=None) -> List[ImageRecord]:
    """
    Read the database CSV `image_path,latitude,longitude[,heading][,altitude]`.

    Relative image paths are taken relative to images_dir (default: the CSV's folder). The file
    must be UTF-8; the byte-order mark spreadsheet programs write ("CSV UTF-8") is accepted.
    Errors name the file and line.
    """
    csv_path = Path(csv_path)
    base = Path(images_dir) if images_dir else csv_path.parent
    if not csv_path.is_file():
        raise InputError(f'CSV file not found: {csv_path}')
    reader = csv.DictReader(io.StringIO(_read_utf8(csv_path), newline=''))
    try:
        columns = [c.strip() for c in (reader.fieldnames or [])]
        missing = [c for c in CSV_REQUIRED if c not in columns]
        if missing:
            raise InputError(f'{csv_path}: missing column(s) {missing}; the header must be '
                             f'image_path,latitude,longitude[,heading][,altitude], got {columns}')
        reader.fieldnames = columns
        records = [_csv_record(row, base, f'{csv_path}:{reader.line_num}') for row in reader]
    except csv.Error as exc:
        raise InputError(f'{csv_path}:{reader.line_num}: not valid CSV ({exc})') from None
    if not records:
        raise InputError(f'{csv_path}: no rows')
    return records


def _read_utf8(path: Path) -> str:
    """Return a text file's content, refusing anything but UTF-8 (with or without a BOM)."""
    data = path.read_bytes()
    try:
        text = data.decode('utf-8-sig')
    except UnicodeDecodeError as exc:
        line = data.count(b'\n', 0, exc.start) + 1
        raise InputError(f'{path}:{line}: not UTF-8 text (byte {data[exc.start]:#04x}); save '
                         f'the file as UTF-8 ("CSV UTF-8" in a spreadsheet program)') from None
    if '\0' in text:   # UTF-16 without a byte-order mark decodes, NUL bytes and all
        line = text.count('\n', 0, text.index('\0')) + 1
        raise InputError(f'{path}:{line}: holds NUL bytes, so it is not UTF-8 text (UTF-16?); '
                         f'save the file as UTF-8 ("CSV UTF-8" in a spreadsheet program)')
    return text


def _csv_record(row: Dict[str, Optional[str]], base: Path, where: str) -> ImageRecord:
    """Turn one CSV row into a record, refusing values that cannot be a place or a pose."""
    try:
        lat, lon = (_parse_float(row.get(k), False) for k in ('latitude', 'longitude'))
        heading, altitude = (_parse_float(row.get(k), True) for k in CSV_OPTIONAL)
    except ValueError as exc:
        raise InputError(f'{where}: {exc}') from None
    check_coordinates(lat, lon, where)
    if math.isinf(altitude):
        raise InputError(f'{where}: altitude must be a finite number of metres (or empty when '
                         f'unknown), got {altitude}')
    heading = checked_heading(heading, where)
    name = (row.get('image_path') or '').strip()
    if not name:
        raise InputError(f'{where}: empty image_path')
    path = Path(name) if os.path.isabs(name) else base / name
    return ImageRecord(str(path), lat, lon, altitude, heading)


def checked_heading(heading: float, where: str) -> float:
    """Return a heading (degrees clockwise from north) in [0, 360); NaN, unknown, stays NaN."""
    if math.isinf(heading) or abs(heading) > 360.0:
        raise InputError(f'{where}: heading must be degrees clockwise from north in [-360, 360] '
                         f'(or empty when unknown), got {heading}')
    return heading % 360.0


def _parse_float(text: Optional[str], optional: bool) -> float:
    """Parse a number; an empty optional value is NaN (unknown)."""
    text = (text or '').strip()
    if not text:
        if optional:
            return math.nan
        raise ValueError('empty value')
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f'{text!r} is not a number') from None
    if not optional and not math.isfinite(value):
        raise ValueError(f'value {text!r} is not finite')
    return value


def records_from_exif(images_dir) -> List[ImageRecord]:
    """Return a record for each image in a folder that has EXIF GPS tags (sorted by name)."""
    from taco_cvgl.geo.exif import read_gps
    images_dir = Path(images_dir)
    if not images_dir.is_dir():
        raise InputError(f'image folder not found: {images_dir}')
    records = []
    for path in sorted(images_dir.rglob('*')):
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        gps = read_gps(path)
        if gps is not None:
            records.append(ImageRecord(str(path), gps.latitude, gps.longitude, gps.altitude,
                                       gps.heading))
    if not records:
        raise InputError(f'no image under {images_dir} carries EXIF GPS tags; give a CSV')
    return records


def records_from_bag(bag_path, image_topic: str, gps_topic: str, images_dir,
                     every: int = 1, max_gap_s: float = 1.0,
                     progress: bool = True) -> List[ImageRecord]:
    """
    Write a bag's camera images as JPEG files, each tagged with the interpolated GPS position.

    Images without a GPS position within max_gap_s of their stamp are left out; `every` keeps
    one image in that many. The files are what geometric re-ranking later reads, so they are
    kept in images_dir next to the database.
    """
    import cv2
    from taco_cvgl.files.bags import iter_images, read_navsat
    track = read_navsat(bag_path, gps_topic)
    if len(track) == 0:
        raise InputError(f'bag {bag_path}: topic {gps_topic} holds no usable GPS fix')
    stream = iter_images(bag_path, image_topic)
    images_dir = Path(images_dir)
    images_dir.mkdir(parents=True, exist_ok=True)
    records = []
    bar = _progress(None, 'reading bag', progress)
    for count, (stamp_ns, rgb) in enumerate(stream):
        bar.update(1)
        if count % max(1, every):
            continue
        position = track.interpolate(stamp_ns, max_gap_s)
        if position is None:
            continue
        path = images_dir / f'{stamp_ns}.jpg'
        tmp = images_dir / f'.{stamp_ns}.jpg.tmp'
        ok, data = cv2.imencode('.jpg', cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR),
                                [cv2.IMWRITE_JPEG_QUALITY, 95])
        tmp.write_bytes(data.tobytes())
        os.replace(tmp, path)
        records.append(ImageRecord(str(path.resolve()), *position))
    bar.close()
    if not records:
        raise InputError(f'bag {bag_path}: no image on {image_topic} has a GPS fix on '
                         f'{gps_topic} within {max_gap_s} s of its stamp')
    return records


@dataclasses.dataclass
class EmbeddingDatabase:
    """GPS-tagged embeddings plus the identity of the model that made them."""

    embeddings: np.ndarray
    latitude: np.ndarray
    longitude: np.ndarray
    altitude: np.ndarray
    heading: np.ndarray
    image_ids: np.ndarray
    model_config: ModelConfig
    model_fingerprint: str
    meta: Dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        """Check that every column has one entry per embedding."""
        n = len(self.embeddings)
        for name in ('latitude', 'longitude', 'altitude', 'heading', 'image_ids'):
            if len(getattr(self, name)) != n:
                raise InputError(f'database column {name} has {len(getattr(self, name))} '
                                 f'entries, embeddings have {n}')

    def __len__(self) -> int:
        """Return the number of entries."""
        return len(self.embeddings)

    @property
    def dim(self) -> int:
        """Return the embedding dimension."""
        return int(self.embeddings.shape[1])

    @property
    def calibration(self) -> MapCalibration:
        """Return the map's calibration record (ground scale, spacing, error models)."""
        return MapCalibration.from_meta(self.meta)

    @property
    def grid_spacing_m(self) -> float:
        """Return the typical distance between neighbouring places (m): recorded, or measured."""
        recorded = self.calibration.grid_spacing_m
        return self._measured_spacing_m() if recorded is None else recorded

    def _measured_spacing_m(self) -> float:
        """Return typical_spacing_m of the places, measured once per set of places."""
        key = (len(self), self.latitude.ctypes.data, self.longitude.ctypes.data)
        if getattr(self, '_spacing', (None,))[0] != key:
            self._spacing = (key, typical_spacing_m(self.latitude, self.longitude))
        return self._spacing[1]

    def check_model(self, fingerprint: str, config: ModelConfig, source: str = '') -> None:
        """Refuse a model that would embed differently from the one that built this database."""
        where = f' ({source})' if source else ''
        if config.embedding_dim != self.dim:
            raise MismatchError(f'database{where} holds {self.dim}-D embeddings but the model '
                                f'makes {config.embedding_dim}-D ones')
        if fingerprint != self.model_fingerprint and config.backbone != self.model_config.backbone:
            raise MismatchError(
                f'database{where} was built with a {self.model_config.backbone} model but the '
                f'loaded weights are a {config.backbone} model ({fingerprint}); rebuild the '
                f'database with these weights (taco-cvgl build-db) or load the '
                f'{self.model_config.backbone} weights that built it')
        if fingerprint != self.model_fingerprint:
            raise MismatchError(
                f'database{where} was built with model {self.model_fingerprint} but the loaded '
                f'weights are model {fingerprint}; rebuild the database with these weights '
                f'(taco-cvgl build-db) or load the weights that built it')

    def save(self, path, dtype: str = 'fp16', weights=None) -> Path:
        """
        Write atomically to `path` (.npz); embeddings stored as fp16 (default) or fp32.

        Embeddings no search can use (NaN, zero or not unit length: broken weights) are refused
        before anything is written, so a good database at `path` is kept; `weights` names the
        file that made them, for the message.
        """
        if dtype not in ('fp16', 'fp32'):
            raise InputError(f"database dtype must be 'fp16' or 'fp32', got {dtype!r}")
        path = Path(path)
        problem = embedding_problem(self.embeddings)
        if problem:
            raise InputError(f'{problem}: the weights {weights or "that made them"} are broken '
                             f'(a diverged training?); nothing was written to {path}')
        path.parent.mkdir(parents=True, exist_ok=True)
        if self.meta.get('grid_spacing_m') is None and math.isfinite(self._measured_spacing_m()):
            self.meta['grid_spacing_m'] = self._measured_spacing_m()  # recorded with the map
        arrays = {
            'format': np.array(FORMAT),
            'embeddings': self.embeddings.astype(np.float16 if dtype == 'fp16' else np.float32),
            'latitude': self.latitude.astype(np.float64),
            'longitude': self.longitude.astype(np.float64),
            'altitude': self.altitude.astype(np.float64),
            'heading': self.heading.astype(np.float64),
            'image_ids': np.array(stored_image_ids(self.image_ids, path.parent), dtype=str),
            'image_base': np.array(IMAGE_BASE),
            'model_config': np.array(self.model_config.to_json()),
            'model_fingerprint': np.array(self.model_fingerprint),
            'meta': np.array(json.dumps(self.meta, sort_keys=True)),
        }
        with atomic_path(path) as tmp, open(tmp, 'wb') as handle:
            np.savez(handle, **arrays)
            handle.flush()
            os.fsync(handle.fileno())
        return path

    @classmethod
    def load(cls, path) -> 'EmbeddingDatabase':
        """Read a database, checking every array against the format; errors name the file."""
        path = Path(path)
        if not path.is_file():
            raise InputError(f'database file not found: {path}')
        try:
            arrays = read_npz(path)
        except (zipfile.BadZipFile, zlib.error, ValueError, OSError, EOFError, RuntimeError,
                NotImplementedError, struct.error, OverflowError) as exc:
            raise InputError(f'{path} is not a readable taco_cvgl database (truncated or '
                             f'another format?): {exc}') from None
        try:
            return cls._from_arrays(arrays, path.parent)
        except InputError as exc:
            raise InputError(f'database {path}: {exc}') from None

    @classmethod
    def _from_arrays(cls, arrays: Dict[str, np.ndarray], folder: Path) -> 'EmbeddingDatabase':
        """Check the arrays of a database file and build it; image ids resolved from folder."""
        try:
            found = _text(arrays, 'format') if 'format' in arrays else None
        except InputError:
            found = None
        if found != FORMAT:
            raise InputError(f'not a taco_cvgl database (format {found!r}, expected {FORMAT!r})')
        missing = [k for k in REQUIRED_KEYS if k not in arrays]
        if missing:
            raise InputError(f'arrays {missing} are missing (damaged, or not written by '
                             f'taco-cvgl build-db); rebuild it')
        ids = _image_ids(arrays['image_ids'])
        base = _text(arrays, 'image_base') if 'image_base' in arrays else None
        if base not in (None, IMAGE_BASE):
            raise InputError(f'image_base {base!r} is unknown (expected {IMAGE_BASE!r})')
        db = cls(embeddings=_embeddings(arrays['embeddings']),
                 latitude=_column(arrays, 'latitude'), longitude=_column(arrays, 'longitude'),
                 altitude=_column(arrays, 'altitude'), heading=_column(arrays, 'heading'),
                 image_ids=resolve_image_ids(ids, folder) if base else ids,
                 model_config=_model_config(_text(arrays, 'model_config')),
                 model_fingerprint=_text(arrays, 'model_fingerprint'),
                 meta=_meta(_text(arrays, 'meta')))
        _check_places(db)
        return db

    @classmethod
    def concatenate(cls, parts: Sequence['EmbeddingDatabase']) -> 'EmbeddingDatabase':
        """Merge shards built by the same model into one database."""
        if not parts:
            raise InputError('no database shards to merge')
        first = parts[0]
        for part in parts[1:]:
            part.check_model(first.model_fingerprint, first.model_config, 'shard')
        cat = np.concatenate
        return cls(embeddings=cat([p.embeddings for p in parts]),
                   latitude=cat([p.latitude for p in parts]),
                   longitude=cat([p.longitude for p in parts]),
                   altitude=cat([p.altitude for p in parts]),
                   heading=cat([p.heading for p in parts]),
                   image_ids=cat([np.asarray(p.image_ids, dtype=str) for p in parts]),
                   model_config=first.model_config, model_fingerprint=first.model_fingerprint,
                   meta={k: v for k, v in first.meta.items() if k != 'grid_spacing_m'})


def embedding_problem(embeddings: np.ndarray) -> Optional[str]:
    """Return why these embeddings cannot be searched by cosine (NaN, zero, not unit), or None."""
    n = len(embeddings)
    norms = np.empty(n, np.float64)
    for start in range(0, n, _ROW_BLOCK):   # in blocks: no float64 copy of a large database
        block = np.asarray(embeddings[start:start + _ROW_BLOCK], np.float64)
        with np.errstate(invalid='ignore', over='ignore'):
            norms[start:start + len(block)] = np.sqrt(np.einsum('ij,ij->i', block, block))
    nonfinite = np.flatnonzero(~np.isfinite(norms))
    if len(nonfinite):
        return (f'{len(nonfinite)} of {n} embeddings are NaN or infinite (first: entry '
                f'{nonfinite[0]})')
    zero = np.flatnonzero(norms < 1e-3)
    if len(zero):
        return (f'{len(zero)} of {n} embeddings are zero vectors (first: entry {zero[0]}), '
                f'which match every image equally')
    off = np.flatnonzero(np.abs(norms - 1.0) > NORM_TOLERANCE)
    if len(off):
        return (f'{len(off)} of {n} embeddings are not unit length (entry {off[0]} has norm '
                f'{norms[off[0]]:.4g}); rows must be L2-normalised')
    return None


def stored_image_ids(image_ids: Sequence[str], folder) -> List[str]:
    """Return image paths as stored by a database in `folder`: relative under it, else absolute."""
    root = os.path.join(os.path.abspath(folder), '')
    stored = []
    for name in image_ids:
        full = os.path.abspath(str(name))
        stored.append(full[len(root):] if full.startswith(root) else full)
    return stored


def resolve_image_ids(image_ids: np.ndarray, folder) -> np.ndarray:
    """Return the stored image paths of a database in `folder` as paths usable from anywhere."""
    root = os.path.abspath(folder)
    return np.array([name if os.path.isabs(name) else os.path.join(root, name)
                     for name in image_ids.tolist()], dtype=str)


def read_npz(path: Path) -> Dict[str, np.ndarray]:
    """
    Return the arrays of an .npz file without trusting its headers.

    np.load allocates what an array's header declares before reading it, so a file claiming a
    huge shape exhausts memory; here each declared size is compared with its zip member first.
    """
    file_size = path.stat().st_size
    with zipfile.ZipFile(path) as archive:
        return {info.filename[:-4]: _read_member(archive, info, file_size)
                for info in archive.infolist() if info.filename.endswith('.npy')}


def _read_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, file_size: int) -> np.ndarray:
    """Read one .npy member whose declared size fits the bytes the member can hold."""
    name = info.filename
    expansion = 1 if info.compress_type == zipfile.ZIP_STORED else 1032  # deflate's maximum
    room = min(info.file_size, info.compress_size * expansion)
    if info.compress_size > file_size:
        raise ValueError(f'{name} claims {info.compress_size} bytes, more than the whole file')
    with archive.open(info) as member:
        version = np.lib.format.read_magic(member)
        if version not in ((1, 0), (2, 0)):
            raise ValueError(f'{name}: unsupported .npy version {version}')
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) \
            else np.lib.format.read_array_header_2_0
        try:
            shape, fortran, dtype = read_header(member)
        except (SyntaxError, TypeError, tokenize.TokenError, RecursionError) as exc:
            raise ValueError(f'{name}: unreadable .npy header ({exc})') from None
        if dtype.kind not in 'biufcU' or dtype.fields is not None or dtype.subdtype is not None:
            raise ValueError(f'{name} holds {dtype} values, which a database never does')
        count = math.prod(shape)
        size = count * dtype.itemsize
        if min(shape, default=0) < 0 or size > room:
            raise ValueError(f'{name} declares shape {shape} of {dtype} ({size} bytes) but '
                             f'its zip member holds at most {room} bytes')
        array = np.empty(count, dtype)
        if size:
            _read_into(member, array.view(np.uint8), name)
        if member.read(1):
            raise ValueError(f'{name} holds more data than its header declares')
    return array.reshape(shape, order='F' if fortran else 'C')


def _read_into(member, raw: np.ndarray, name: str) -> None:
    """Fill a byte array from a zip member in blocks (no second copy of a large array)."""
    got = 0
    while got < len(raw):
        block = member.read(min(_READ_BLOCK, len(raw) - got))
        if not block:
            raise ValueError(f'{name} is truncated')
        raw[got:got + len(block)] = np.frombuffer(block, np.uint8)
        got += len(block)


def _text(arrays: Dict[str, np.ndarray], key: str) -> str:
    """Return a text array of a database file, refusing anything else."""
    value = arrays[key]
    if value.ndim != 0 or value.dtype.kind != 'U':
        raise InputError(f'{key} must be a text string, got {value.dtype} of shape {value.shape}')
    return str(value)


def _image_ids(value: np.ndarray) -> np.ndarray:
    """Return the image_ids array of a database file, refusing anything but 1-D text."""
    if value.ndim != 1 or value.dtype.kind != 'U':
        raise InputError(f'image_ids must be a 1-D array of text, got {value.dtype} of shape '
                         f'{value.shape}')
    return value


def _embeddings(value: np.ndarray) -> np.ndarray:
    """Return the embeddings array of a database file, refusing what no search can use."""
    if value.ndim != 2:
        raise InputError(f'embeddings must be a 2-D array (entries x dimension), got shape '
                         f'{value.shape}')
    if value.size == 0:
        raise InputError(f'the database is empty (embeddings shape {value.shape})')
    if value.dtype.kind != 'f':
        raise InputError(f'embeddings must be fp16 or fp32 numbers, got {value.dtype}')
    problem = embedding_problem(value)
    if problem:
        raise InputError(f'{problem}; rebuild it with taco-cvgl build-db')
    return value


def _column(arrays: Dict[str, np.ndarray], key: str) -> np.ndarray:
    """Return a per-entry number column of a database file as float64."""
    value = arrays[key]
    if value.ndim != 1 or value.dtype.kind not in 'fiu':
        raise InputError(f'{key} must be a 1-D array of numbers, got {value.dtype} of shape '
                         f'{value.shape}')
    return value.astype(np.float64)


def _model_config(text: str) -> ModelConfig:
    """Parse a database's model config; a malformed one is an InputError."""
    try:
        return ModelConfig.from_json(text)
    except (TypeError, ValueError, AttributeError, KeyError) as exc:
        raise InputError(f'model_config is not a valid model config: {exc}') from None


def _meta(text: str) -> Dict:
    """Parse a database's meta, which must be a JSON object."""
    try:
        meta = json.loads(text)
    except ValueError as exc:
        raise InputError(f'meta is not valid JSON: {exc}') from None
    if not isinstance(meta, dict):
        raise InputError(f'meta must be a JSON object, got {type(meta).__name__}')
    try:
        MapCalibration.from_meta(meta)
    except InputError as exc:
        raise InputError(f'meta calibration: {exc}') from None
    return meta


def _check_places(db: 'EmbeddingDatabase') -> None:
    """Refuse entries that are not places on Earth, or carry an infinite altitude or heading."""
    lat, lon = db.latitude, db.longitude
    with np.errstate(invalid='ignore'):
        bad = ~(np.isfinite(lat) & np.isfinite(lon) & (np.abs(lat) <= 90) & (np.abs(lon) <= 180))
    if bad.any():
        i = int(np.argmax(bad))
        check_coordinates(float(lat[i]), float(lon[i]), f'entry {i}')
    for name in ('altitude', 'heading'):
        column = getattr(db, name)
        if np.isinf(column).any():
            i = int(np.argmax(np.isinf(column)))
            raise InputError(f'{name} of entry {i} is {column[i]}: it must be finite, or NaN '
                             f'where unknown')


def typical_spacing_m(latitude: np.ndarray, longitude: np.ndarray, sample: int = 2000,
                      seed: int = 0) -> float:
    """
    Return the median distance from a database place to its nearest other place (metres).

    Places at the same spot (several headings of one place) are skipped, so the figure is the
    grid stride of the database, which sets the floor of any position estimate's uncertainty.
    """
    from taco_cvgl.geo.geodesy import to_enu
    n = len(latitude)
    if n < 2:
        return math.nan
    enu = to_enu(float(np.mean(latitude)), float(np.mean(longitude)), latitude, longitude)
    rng = np.random.default_rng(seed)
    picks = rng.choice(n, size=min(n, sample), replace=False)
    nearest = []
    for start in range(0, len(picks), 256):
        block = enu[picks[start:start + 256]]
        d = np.sqrt(((block[:, None, :] - enu[None, :, :]) ** 2).sum(-1))
        d[d < 0.5] = np.inf  # the point itself and co-located entries
        nearest.append(d.min(axis=1))
    nearest = np.concatenate(nearest)
    nearest = nearest[np.isfinite(nearest)]
    return float(np.median(nearest)) if len(nearest) else math.nan


def check_records(records: Sequence[ImageRecord], skip_bad: bool = False) -> None:
    """Refuse no records, and missing image files (all named at once) unless skip_bad."""
    if not records:
        raise InputError('no images to put in the database')
    missing = [r.path for r in records if not os.path.isfile(r.path)]
    if missing and not skip_bad:
        more = f' and {len(missing) - 5} more' if len(missing) > 5 else ''
        raise InputError(f'{len(missing)} image file(s) not found: {missing[:5]}{more}')


def build_database(model, records: Sequence[ImageRecord], batch_size: int = 32,
                   workers: int = 4, skip_bad: bool = False, progress: bool = True,
                   source: str = '', on_skip: Optional[Callable[[str, str], None]] = None,
                   pipeline: str = 'auto') -> EmbeddingDatabase:
    """
    Embed every record's image with `model` (already on its runtime device).

    Missing files are reported all at once before any work starts. An unreadable image is an
    error naming the file, or skipped and counted when skip_bad is set.

    pipeline: 'host' decodes and preprocesses on the CPU (threads) and hands the model ready
    batches; 'device' reads files in threads, decodes JPEGs in batches on the model's GPU
    (nvJPEG; other files and CPU-only machines decode on the CPU) and preprocesses there,
    reading the next batch while one is embedded (gpu_decode.embed_image_files); 'auto' takes
    'device' on CUDA and 'host' elsewhere.
    """
    from taco_cvgl.files.image_codec import load_image_file
    if pipeline not in ('auto', 'host', 'device'):
        raise InputError(f"pipeline must be 'auto', 'host' or 'device', got {pipeline!r}")
    check_records(records, skip_bad)
    if pipeline == 'auto':
        pipeline = 'device' if torch_device_type(model) == 'cuda' else 'host'
    kept: List[ImageRecord] = []
    chunks = []
    skipped = 0
    bar = _progress(len(records), 'embedding', progress)
    if pipeline == 'device':
        from taco_cvgl.inference.gpu_decode import embed_image_files
        embeddings, kept_at = embed_image_files(
            model, [r.path for r in records], batch_size=batch_size, workers=workers,
            skip_bad=skip_bad, on_skip=on_skip, on_batch=bar.update)
        chunks.append(embeddings)
        kept = [records[i] for i in kept_at]
        skipped = len(records) - len(kept)
    else:
        def load(record: ImageRecord):
            try:
                return load_image_file(record.path)
            except InputError as exc:
                if not skip_bad:
                    raise
                return exc

        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            for start in range(0, len(records), batch_size):
                batch_records = records[start:start + batch_size]
                images = list(pool.map(load, batch_records))
                good = [(r, im) for r, im in zip(batch_records, images)
                        if not isinstance(im, Exception)]
                for r, im in zip(batch_records, images):
                    if isinstance(im, Exception):
                        skipped += 1
                        if on_skip:
                            on_skip(r.path, str(im))
                if good:
                    chunks.append(model.encode_batch([im for _, im in good],
                                                     batch_size=batch_size).numpy())
                    kept.extend(r for r, _ in good)
                bar.update(len(batch_records))
    bar.close()
    if not kept:
        raise InputError('no readable image among the records')
    db = EmbeddingDatabase(
        embeddings=np.concatenate(chunks).astype(np.float32),
        latitude=np.array([r.latitude for r in kept]),
        longitude=np.array([r.longitude for r in kept]),
        altitude=np.array([r.altitude for r in kept]),
        heading=np.array([r.heading for r in kept]),
        image_ids=np.array([r.path for r in kept], dtype=str),
        model_config=model.config,
        model_fingerprint=model.fingerprint(),
        meta={'created': datetime.datetime.now(datetime.timezone.utc).isoformat(),
              'source': source, 'skipped': skipped})
    return db


def torch_device_type(model) -> str:
    """Return 'cuda' or 'cpu': where an Embedder (the model or a fast backend) runs."""
    return str(getattr(model, 'device', 'cpu')).split(':')[0]


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit='img', disable=not enabled, dynamic_ncols=True)


def iter_image_files(folder) -> Iterable[Path]:
    """Yield the image files under a folder, sorted."""
    return (p for p in sorted(Path(folder).rglob('*')) if p.suffix.lower() in IMAGE_SUFFIXES)
