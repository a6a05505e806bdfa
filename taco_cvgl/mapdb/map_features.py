"""
The verification features of a map, stored beside its database: no images needed on the robot.

Geometric verification (taco_cvgl.localization.rerank) matches a query's SIFT features against each
candidate's. Extracted from the database images, those need the images on disk and time at start
or on first use; `taco-cvgl build-db` therefore writes them once, to `<database stem>.features.npz`
beside the database, and `make_reranker` uses that file when it is there. A learned matcher
(RerankConfig.matcher, localization/learned_matching.py) does not read it: it extracts its own
features from the images.

File format (`.npz`, uncompressed so the large arrays can be memory-mapped; no pickle):
- `format` 'taco_cvgl.map_features/1'; `database_digest` (see `database_digest`), `detector`
  ('sift-opencv-<OpenCV version>') and `max_features`: what the features belong to;
- `offsets` (N+1 int64): entry i's keypoints are rows offsets[i]:offsets[i+1] of
- `points` (M x 2 float32: x right, y down, in the image's pixels, as detected) and
  `descriptors` (M x 128 uint8: OpenCV's SIFT descriptors are whole numbers 0..255 held in
  float32, so they are stored exactly; anything else is refused, not rounded);
- `shapes` (N x 2 int32): each image's (height, width).

Size: 8 + 128 = 136 bytes per keypoint, so 204 kB for an entry with the default 1,500 (plus 16
bytes of offset and shape). Loading reads and checks the small arrays and the file's checksums,
and maps `points` and `descriptors` into memory without copying them: an entry's pages are read
when it is verified, and it is the page cache, shared and reclaimable, that holds them. Each
verified entry is copied out as float32 (774 kB at 1,500 keypoints) only while it is matched.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import io
import math
import os
from pathlib import Path
import shutil
import struct
import tempfile
import threading
from typing import Dict, Iterator, Optional, Sequence
import zipfile
import zlib

import cv2
import numpy as np
from taco_cvgl.errors import InputError
from taco_cvgl.files.atomic import atomic_path
from taco_cvgl.localization.rerank import Features, RerankConfig, Reranker

FORMAT = 'taco_cvgl.map_features/1'
SUFFIX = '.features.npz'
DESCRIPTOR_SIZE = 128
KEYS = ('format', 'database_digest', 'detector', 'max_features', 'offsets', 'points',
        'descriptors', 'shapes')
# Arrays mapped from the file rather than read into memory: the ones that grow with keypoints.
MAPPED = ('points', 'descriptors')
_TEXT_KEYS = ('format', 'database_digest', 'detector')
_BLOCK = 1 << 20
_DIGEST_ROWS = 1 << 14
# Errors the zip and npy readers raise on a truncated, damaged or foreign file.
_READ_ERRORS = (zipfile.BadZipFile, zlib.error, ValueError, OSError, EOFError, struct.error,
                OverflowError, NotImplementedError)


def features_path(db_path) -> Path:
    """Return the features file of the database at db_path: map.npz -> map.features.npz."""
    db_path = Path(db_path)
    return db_path.with_name(db_path.stem + SUFFIX)


def detector_name() -> str:
    """Return the name and version of the feature detector, as stored with the features."""
    return f'sift-opencv-{cv2.__version__}'


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


def _rebuild_hint(db_path) -> str:
    """Return the command that writes the features file of the database at db_path."""
    return f'taco-cvgl build-db --features-only --db {db_path}'


# ----------------------------------------------------------------------------- writing
def write_features(db, db_path, max_features: int = RerankConfig.max_features,
                   progress: bool = False, workers: Optional[int] = None) -> Path:
    """
    Extract every entry's features from its image and write them beside the database.

    db is the database saved at db_path (its images are read from db.image_ids). The file is
    written atomically: a failed or stopped write leaves the previous file (or none). workers:
    threads extracting at once (default: the CPUs, at most 4). Returns the path written.
    """
    path = features_path(db_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    offsets, shapes = [0], []
    # The large arrays grow in unnamed temporary files (deleted even if this process is killed)
    # until their length, which the npy header needs first, is known.
    with tempfile.TemporaryFile(dir=path.parent) as points, \
            tempfile.TemporaryFile(dir=path.parent) as descriptors:
        for name, features in zip(db.image_ids, _extracted(db.image_ids, max_features,
                                                           progress, workers)):
            points.write(np.ascontiguousarray(features.points, '<f4').tobytes())
            descriptors.write(_descriptor_bytes(features.descriptors, name))
            offsets.append(offsets[-1] + len(features.points))
            shapes.append(features.shape)
        count = offsets[-1]
        small = {'format': np.array(FORMAT), 'database_digest': np.array(database_digest(db)),
                 'detector': np.array(detector_name()),
                 'max_features': np.array(max_features, np.int64),
                 'offsets': np.array(offsets, np.int64),
                 'shapes': np.array(shapes, np.int32).reshape(-1, 2)}
        large = {'points': (points, np.dtype('<f4'), (count, 2)),
                 'descriptors': (descriptors, np.dtype('u1'), (count, DESCRIPTOR_SIZE))}
        with atomic_path(path) as tmp:
            _write_npz(tmp, small, large)
    return path


def _extracted(image_ids: Sequence[str], max_features: int, progress: bool,
               workers: Optional[int]) -> Iterator[Features]:
    """Yield each image's features in order, extracted by a few threads (OpenCV frees the GIL)."""
    from taco_cvgl.files.image_codec import load_image_file
    from tqdm import tqdm
    local = threading.local()

    def extract(name: str) -> Features:
        if not hasattr(local, 'detector'):
            local.detector = cv2.SIFT_create(nfeatures=max_features)
        return Features(load_image_file(name), local.detector)

    workers = workers or min(4, os.cpu_count() or 1)
    window = 4 * workers      # images in flight: memory stays bounded on any map size
    with concurrent.futures.ThreadPoolExecutor(workers) as pool, \
            tqdm(total=len(image_ids), desc='features', unit='img', disable=not progress,
                 dynamic_ncols=True) as bar:
        pending = [pool.submit(extract, str(name)) for name in image_ids[:window]]
        for index in range(len(image_ids)):
            features = pending[index].result()
            pending[index] = None
            if index + window < len(image_ids):
                pending.append(pool.submit(extract, str(image_ids[index + window])))
            bar.update(1)
            yield features


def _descriptor_bytes(descriptors: np.ndarray, name) -> bytes:
    """Return SIFT descriptors as uint8 bytes, refusing any that uint8 would not hold exactly."""
    small = descriptors.astype(np.uint8)
    if descriptors.shape[1:] != (DESCRIPTOR_SIZE,) or \
            not np.array_equal(small.astype(descriptors.dtype), descriptors):
        raise InputError(f'the SIFT descriptors of {name} are not whole numbers 0..255 '
                         f'({detector_name()}): they cannot be stored exactly')
    return small.tobytes()


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
class StoredFeatures:
    """The stored features of a map: a read-only sequence of Features, one per entry."""

    def __init__(self, path: Path, offsets: np.ndarray, points: np.ndarray,
                 descriptors: np.ndarray, shapes: np.ndarray):
        """Hold the checked arrays of a features file (points and descriptors mapped)."""
        self.path = path
        self.offsets, self.points, self.descriptors, self.shapes = \
            offsets, points, descriptors, shapes

    def __len__(self) -> int:
        """Return the number of entries."""
        return len(self.shapes)

    def __getitem__(self, index: int) -> Features:
        """Return entry `index`'s features, copied out of the file (descriptors as float32)."""
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f'entry {index} of {len(self)}')
        start, end = int(self.offsets[index]), int(self.offsets[index + 1])
        return Features.from_arrays(np.array(self.points[start:end]),
                                    self.descriptors[start:end].astype(np.float32),
                                    self.shapes[index])

    @property
    def bytes_per_entry(self) -> float:
        """Return the file's mean size per entry in bytes (keypoints, offsets and shapes)."""
        total = self.points.nbytes + self.descriptors.nbytes + self.offsets.nbytes + \
            self.shapes.nbytes
        return total / max(len(self), 1)


def load_features(path, db, db_path, max_features: int = RerankConfig.max_features
                  ) -> StoredFeatures:
    """
    Open the features file at `path` of the database `db` (loaded from db_path).

    Refused (InputError naming the file and the command that rebuilds it): a file that is not
    a complete features file (truncated, damaged: every member's CRC is checked), one written
    for another database, or extracted by another detector or with another max_features.
    """
    path = Path(path)
    try:
        arrays = _read_npz(path)
    except _READ_ERRORS as exc:
        raise InputError(f'features file {path} is not readable (truncated or damaged?): '
                         f'{exc}; rebuild it with {_rebuild_hint(db_path)}') from None
    _check_identity(arrays, path, db, db_path, max_features)
    try:
        _check_layout(arrays, len(db))
    except ValueError as exc:
        raise InputError(f'features file {path} is damaged: {exc}; rebuild it with '
                         f'{_rebuild_hint(db_path)}') from None
    return StoredFeatures(path, arrays['offsets'], arrays['points'], arrays['descriptors'],
                          arrays['shapes'])


def _check_identity(arrays: Dict[str, np.ndarray], path: Path, db, db_path,
                    max_features: int) -> None:
    """Refuse a features file that belongs to another database, detector or setting."""
    hint = _rebuild_hint(db_path)
    texts = {key: _text(arrays[key]) for key in _TEXT_KEYS if key in arrays}
    if texts.get('format') != FORMAT:
        raise InputError(f'{path} is not a taco_cvgl features file (format '
                         f'{texts.get("format")!r}, expected {FORMAT!r}); rebuild it with {hint}')
    missing = [key for key in KEYS if key not in arrays]
    if missing:
        raise InputError(f'features file {path} is damaged: arrays {missing} are missing; '
                         f'rebuild it with {hint}')
    if texts['database_digest'] != database_digest(db):
        raise InputError(f'features file {path} was written for another database than '
                         f'{db_path}; rebuild it with {hint}')
    if texts['detector'] != detector_name():
        raise InputError(f'features file {path} was extracted by {texts["detector"]}, and '
                         f'verification here runs {detector_name()}; rebuild it with {hint}')
    stored = arrays['max_features']
    if stored.shape != () or stored.dtype.kind != 'i' or int(stored) != max_features:
        raise InputError(f'features file {path} holds up to {stored} features per image, and '
                         f'verification asks for {max_features}; rebuild it with {hint} '
                         f'--max-features {max_features}')


def _check_layout(arrays: Dict[str, np.ndarray], entries: int) -> None:
    """Raise ValueError where the arrays do not describe `entries` images' keypoints."""
    offsets, points, descriptors, shapes = (arrays[k] for k in
                                            ('offsets', 'points', 'descriptors', 'shapes'))
    if offsets.dtype != np.int64 or offsets.shape != (entries + 1,):
        raise ValueError(f'offsets must be {entries + 1} int64, got {offsets.dtype} '
                         f'{offsets.shape}')
    count = len(points)
    if offsets[0] != 0 or offsets[-1] != count or np.any(np.diff(offsets) < 0):
        raise ValueError(f'offsets do not split {count} keypoints in order')
    if points.dtype != np.float32 or points.shape != (count, 2):
        raise ValueError(f'points must be {count} x 2 float32, got {points.dtype} {points.shape}')
    if descriptors.dtype != np.uint8 or descriptors.shape != (count, DESCRIPTOR_SIZE):
        raise ValueError(f'descriptors must be {count} x {DESCRIPTOR_SIZE} uint8, got '
                         f'{descriptors.dtype} {descriptors.shape}')
    if shapes.dtype.kind != 'i' or shapes.shape != (entries, 2) or np.any(shapes < 1):
        raise ValueError(f'shapes must be {entries} x 2 positive integers, got {shapes.dtype} '
                         f'{shapes.shape}')


def _text(value: np.ndarray) -> Optional[str]:
    """Return a 0-d text array as str, None for anything else."""
    return str(value) if value.shape == () and value.dtype.kind == 'U' else None


def _read_npz(path: Path) -> Dict[str, np.ndarray]:
    """
    Return the arrays of an uncompressed .npz, MAPPED ones memory-mapped, after checking it.

    Every member's CRC is checked (one read of the file, in blocks), and each npy header must
    describe exactly the bytes its member holds, so no header can make this allocate more than
    the file.
    """
    file_size = path.stat().st_size
    arrays = {}
    with open(path, 'rb') as handle, zipfile.ZipFile(handle) as archive:
        for info in archive.infolist():
            name = info.filename[:-4]
            if not info.filename.endswith('.npy') or name not in KEYS:
                continue
            with archive.open(info) as member:      # the CRC is checked at the member's end
                while member.read(_BLOCK):
                    pass
            arrays[name] = _member_array(handle, info, path, file_size, name in MAPPED)
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
    Return the reranker of a loaded database: from its features file, else from its images.

    A features file beside the database (features_path) is used when there is one, and refused
    (InputError) when it does not belong to this database or these settings: a stale file is
    not silently replaced by the images. Without one, every listed image must exist. The file
    holds SIFT features: a learned matcher (config.matcher, learned_matching.py) leaves
    it unread and extracts its own from the images, which must then exist.
    """
    path = features_path(db_path)
    if path.exists() and config.matcher == 'sift':
        return Reranker(None, config, stored=load_features(path, db, db_path,
                                                           config.max_features))
    from taco_cvgl.files.image_codec import load_image_file
    missing = [p for p in db.image_ids if not os.path.isfile(p)]
    if missing and config.matcher != 'sift':
        stored = f', and {path} holds SIFT features only' if path.exists() else ''
        raise InputError(f'rerank matcher {config.matcher} extracts its features from the '
                         f'database images, but {len(missing)} of {len(db)} listed in {db_path} '
                         f'are missing (e.g. {missing[0]}){stored}; restore them, or verify '
                         f'with SIFT (rerank_matcher:=sift)')
    if missing:
        raise InputError(f'geometric re-ranking needs the database images, but '
                         f'{len(missing)} of {len(db)} listed in {db_path} are missing '
                         f'(e.g. {missing[0]}); restore them, or build the features file with '
                         f'{_rebuild_hint(db_path)}, or turn re-ranking off '
                         f'(rerank:=false, --no-rerank) to publish unverified retrieval '
                         f'fixes, which are often wrong on unseen imagery')
    return Reranker(lambda i: load_image_file(db.image_ids[i]), config)
