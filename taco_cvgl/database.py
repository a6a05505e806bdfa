"""
The embedding database: GPS-tagged embeddings, built from images, stored without pickle.

File format (`.npz`, read with allow_pickle=False): `embeddings` NxD (fp16 or fp32, rows
L2-normalised), `latitude`, `longitude`, `altitude`, `heading` (float64, NaN where unknown; heading
in degrees clockwise from north), `image_ids` (unicode), and JSON strings `model_config`, `meta`,
plus `model_fingerprint`. A database is written to a temporary file and renamed into place, so a
killed build never leaves a file that loads as a database.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
import csv
import dataclasses
import datetime
import json
import math
import os
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence
import zipfile

import numpy as np
from taco_cvgl.atomic import atomic_path
from taco_cvgl.config import ModelConfig
from taco_cvgl.errors import InputError, MismatchError

FORMAT = 'taco_cvgl.database/1'
CSV_REQUIRED = ('image_path', 'latitude', 'longitude')
CSV_OPTIONAL = ('heading', 'altitude')
IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png', '.tif', '.tiff', '.bmp', '.webp')


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

    Relative image paths are taken relative to images_dir (default: the CSV's folder). Errors name
    the file and line.
    """
    csv_path = Path(csv_path)
    base = Path(images_dir) if images_dir else csv_path.parent
    if not csv_path.is_file():
        raise InputError(f'CSV file not found: {csv_path}')
    records = []
    with open(csv_path, newline='', encoding='utf-8') as handle:
        reader = csv.DictReader(handle)
        columns = [c.strip() for c in (reader.fieldnames or [])]
        missing = [c for c in CSV_REQUIRED if c not in columns]
        if missing:
            raise InputError(f'{csv_path}: missing column(s) {missing}; the header must be '
                             f'image_path,latitude,longitude[,heading][,altitude], got {columns}')
        reader.fieldnames = columns
        for line_no, row in enumerate(reader, start=2):
            where = f'{csv_path}:{line_no}'
            try:
                values = {k: _parse_float(row.get(k), k in CSV_OPTIONAL)
                          for k in ('latitude', 'longitude') + CSV_OPTIONAL}
            except ValueError as exc:
                raise InputError(f'{where}: {exc}') from None
            check_coordinates(values['latitude'], values['longitude'], where)
            name = (row.get('image_path') or '').strip()
            if not name:
                raise InputError(f'{where}: empty image_path')
            path = Path(name) if os.path.isabs(name) else base / name
            records.append(ImageRecord(str(path), values['latitude'], values['longitude'],
                                       values['altitude'], values['heading']))
    if not records:
        raise InputError(f'{csv_path}: no rows')
    return records


def _parse_float(text: Optional[str], optional: bool) -> float:
    text = (text or '').strip()
    if not text:
        if optional:
            return math.nan
        raise ValueError('empty value')
    value = float(text)
    if not optional and not math.isfinite(value):
        raise ValueError(f'value {text!r} is not finite')
    return value


def records_from_exif(images_dir) -> List[ImageRecord]:
    """Return a record for each image in a folder that has EXIF GPS tags (sorted by name)."""
    from taco_cvgl.exif import read_gps
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
    from taco_cvgl.bags import iter_images, read_navsat
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
    def grid_spacing_m(self) -> float:
        """Return the typical distance between neighbouring database places (metres)."""
        if 'grid_spacing_m' not in self.meta:
            self.meta['grid_spacing_m'] = typical_spacing_m(self.latitude, self.longitude)
        return float(self.meta['grid_spacing_m'])

    def check_model(self, fingerprint: str, config: ModelConfig, source: str = '') -> None:
        """Refuse a model that would embed differently from the one that built this database."""
        where = f' ({source})' if source else ''
        if config.embedding_dim != self.dim:
            raise MismatchError(f'database{where} holds {self.dim}-D embeddings but the model '
                                f'makes {config.embedding_dim}-D ones')
        if fingerprint != self.model_fingerprint:
            raise MismatchError(
                f'database{where} was built with model {self.model_fingerprint} but the loaded '
                f'weights are model {fingerprint}; rebuild the database with these weights '
                f'(taco-cvgl build-db) or load the weights that built it')

    def save(self, path, dtype: str = 'fp16') -> Path:
        """Write atomically to `path` (.npz); embeddings stored as fp16 (default) or fp32."""
        if dtype not in ('fp16', 'fp32'):
            raise InputError(f"database dtype must be 'fp16' or 'fp32', got {dtype!r}")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.grid_spacing_m  # computed once and stored with the file
        arrays = {
            'format': np.array(FORMAT),
            'embeddings': self.embeddings.astype(np.float16 if dtype == 'fp16' else np.float32),
            'latitude': self.latitude.astype(np.float64),
            'longitude': self.longitude.astype(np.float64),
            'altitude': self.altitude.astype(np.float64),
            'heading': self.heading.astype(np.float64),
            'image_ids': np.asarray(self.image_ids, dtype=str),
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
        """Read a database, checking its format and consistency; errors name the file."""
        path = Path(path)
        if not path.is_file():
            raise InputError(f'database file not found: {path}')
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {k: data[k] for k in data.files}
        except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
            raise InputError(f'{path} is not a readable taco_cvgl database (truncated or '
                             f'another format?): {exc}') from None
        if str(arrays.get('format', '')) != FORMAT:
            raise InputError(f'{path} is not a taco_cvgl database (format '
                             f'{arrays.get("format")!r}, expected {FORMAT!r})')
        embeddings = arrays['embeddings']
        if embeddings.ndim != 2 or len(embeddings) == 0:
            raise InputError(f'database {path} is empty (embeddings shape {embeddings.shape})')
        if not np.isfinite(embeddings).all():
            raise InputError(f'database {path} holds non-finite embeddings')
        try:
            return cls(embeddings=embeddings, latitude=arrays['latitude'],
                       longitude=arrays['longitude'], altitude=arrays['altitude'],
                       heading=arrays['heading'], image_ids=arrays['image_ids'],
                       model_config=ModelConfig.from_json(str(arrays['model_config'])),
                       model_fingerprint=str(arrays['model_fingerprint']),
                       meta=json.loads(str(arrays['meta'])))
        except InputError as exc:
            raise InputError(f'database {path}: {exc}') from None

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


def typical_spacing_m(latitude: np.ndarray, longitude: np.ndarray, sample: int = 2000,
                      seed: int = 0) -> float:
    """
    Return the median distance from a database place to its nearest other place (metres).

    Places at the same spot (several headings of one place) are skipped, so the figure is the
    grid stride of the database, which sets the floor of any position estimate's uncertainty.
    """
    from taco_cvgl.geodesy import to_enu
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
    from taco_cvgl.image_codec import load_image_file
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
        from taco_cvgl.gpu_decode import embed_image_files
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
    """Return 'cuda' or 'cpu': where a model (ImageRetrievalModel or FastEmbedder) runs."""
    return str(getattr(model, 'device', 'cpu')).split(':')[0]


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit='img', disable=not enabled, dynamic_ncols=True)


def iter_image_files(folder) -> Iterable[Path]:
    """Yield the image files under a folder, sorted."""
    return (p for p in sorted(Path(folder).rglob('*')) if p.suffix.lower() in IMAGE_SUFFIXES)
