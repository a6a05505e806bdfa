"""
Read and write rosbag2 bags (MCAP and sqlite3) without ROS, through the ``rosbags`` library.

Times are integer nanoseconds since the Unix epoch. A message's *log time* is when the recorder
received it (the bag's own timestamp); its *stamp* is ``header.stamp``. Images come out in the core
convention of :mod:`taco_cvgl.files.image_codec`: (H, W, 3) uint8 RGB.

Message types come from the bag's own embedded definitions; a bag without them (older sqlite3
bags) is read with the ROS 2 Kilted definitions plus the geographic_msgs messages this project
publishes (:data:`GEOGRAPHIC_MSGS`), which rosbags does not know by itself.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
import functools
import os
from pathlib import Path
import shutil
import sqlite3
import tempfile
from typing import Any

import numpy as np
from rosbags.highlevel import AnyReader, AnyReaderError
from rosbags.rosbag2 import Reader, ReaderError, StoragePlugin, Writer, WriterError
from rosbags.serde import SerdeError
from rosbags.typesys import get_types_from_msg, get_typestore, Stores, TypesysError
from rosbags.typesys.store import Typestore
from taco_cvgl.errors import InputError
from taco_cvgl.files import image_codec

IMAGE_TYPE = 'sensor_msgs/msg/Image'
COMPRESSED_IMAGE_TYPE = 'sensor_msgs/msg/CompressedImage'
NAVSAT_TYPE = 'sensor_msgs/msg/NavSatFix'
GEOPOSE_COV_STAMPED_TYPE = 'geographic_msgs/msg/GeoPoseWithCovarianceStamped'
GEOPOSE_STAMPED_TYPE = 'geographic_msgs/msg/GeoPoseStamped'
GEOPOINT_STAMPED_TYPE = 'geographic_msgs/msg/GeoPointStamped'

#: Position topic types that :func:`read_navsat` reads.
POSITION_TYPES = (NAVSAT_TYPE, GEOPOSE_COV_STAMPED_TYPE, GEOPOSE_STAMPED_TYPE,
                  GEOPOINT_STAMPED_TYPE)

# Field lists of the geographic_msgs messages (wire-compatible with ros-geographic-info's
# geographic_msgs, so their RIHS01 type hashes equal the real package's). rosbags' Kilted
# typestore has no geographic_msgs.
GEOGRAPHIC_MSGS: dict[str, str] = {
    'geographic_msgs/msg/GeoPoint': 'float64 latitude\nfloat64 longitude\nfloat64 altitude\n',
    'geographic_msgs/msg/GeoPose': 'GeoPoint position\ngeometry_msgs/Quaternion orientation\n',
    'geographic_msgs/msg/GeoPoseStamped': 'std_msgs/Header header\nGeoPose pose\n',
    'geographic_msgs/msg/GeoPointStamped': 'std_msgs/Header header\nGeoPoint position\n',
    'geographic_msgs/msg/GeoPoseWithCovariance': 'GeoPose pose\nfloat64[36] covariance\n',
    'geographic_msgs/msg/GeoPoseWithCovarianceStamped':
        'std_msgs/Header header\nGeoPoseWithCovariance pose\n',
}

# rosbag2 metadata version written: 8 is read by Iron, Jazzy and Kilted.
_BAG_VERSION = 8
_STORAGES = {'mcap': StoragePlugin.MCAP, 'sqlite3': StoragePlugin.SQLITE3}
# Errors the rosbags reader raises for unreadable or malformed bags.
_BAG_ERRORS = (AnyReaderError, ReaderError, TypesysError, SerdeError, sqlite3.Error, OSError,
               KeyError, ValueError, AssertionError)
_MAX_REPORTED_ERRORS = 10


@functools.lru_cache(maxsize=1)
def typestore() -> Typestore:
    """Return the ROS 2 Kilted typestore with the project's geographic_msgs types registered."""
    store = get_typestore(Stores.ROS2_KILTED)
    types: dict[str, Any] = {}
    for name, text in GEOGRAPHIC_MSGS.items():
        types.update(get_types_from_msg(text, name))
    store.register(types)
    return store


def _bag_error(path: Path, err: BaseException) -> InputError:
    """Wrap a rosbags/storage exception into an InputError naming the bag."""
    if isinstance(err, FileNotFoundError):
        return InputError(f'bag not found: {path} ({err})')
    detail = ' '.join(str(a) for a in err.args) or type(err).__name__
    return InputError(f'cannot read bag {path}: {detail}')


@contextmanager
def _open_any(bag_path: str | os.PathLike) -> Iterator[AnyReader]:
    """Open a bag for deserializing reads, turning rosbags' errors into InputError."""
    path = Path(bag_path)
    if not path.exists():
        raise InputError(f'bag not found: {path}')
    try:
        reader = AnyReader([path], default_typestore=typestore())
        reader.open()
    except _BAG_ERRORS as err:
        raise _bag_error(path, err) from None
    try:
        _add_missing_types(reader)
        yield reader
    finally:
        reader.close()


def _add_missing_types(reader: AnyReader) -> None:
    """Register our default types for connections whose bag carries no definition of them."""
    known = reader.typestore.fielddefs
    if all(conn.msgtype in known for conn in reader.connections):
        return
    default = typestore().fielddefs
    reader.typestore.register({k: v for k, v in default.items() if k not in known})


@contextmanager
def _open_raw(bag_path: str | os.PathLike) -> Iterator[Reader]:
    """Open a rosbag2 bag for raw (serialized) reads; no type definitions needed."""
    path = Path(bag_path)
    if not path.exists():
        raise InputError(f'bag not found: {path}')
    if path.suffix == '.bag':
        raise InputError(f'{path} is a ROS 1 bag; only rosbag2 bags (MCAP, sqlite3) hold CDR data')
    try:
        reader = Reader(path)
        reader.open()
    except _BAG_ERRORS as err:
        raise _bag_error(path, err) from None
    try:
        yield reader
    finally:
        reader.close()


def list_topics(bag_path: str | os.PathLike) -> dict[str, str]:
    """Return {topic: message type} of a bag (a rosbag2 directory, .mcap or .db3 file)."""
    path = Path(bag_path)
    opener = _open_any if path.suffix == '.bag' else _open_raw
    with opener(path) as reader:
        return {name: (info.msgtype or 'mixed types')
                for name, info in sorted(reader.topics.items())}


def require_topics(path: str | os.PathLike, available: dict[str, str], wanted: Iterable[str]
                   ) -> None:
    """Raise InputError listing the bag's topics ({topic: type}) when a wanted topic is absent."""
    missing = [t for t in wanted if t not in available]
    if missing:
        have = ', '.join(f'{t} ({m})' for t, m in available.items()) or 'none'
        raise InputError(f'bag {path} has no topic {", ".join(missing)}; its topics: {have}')


def stamp_ns(msg: Any, fallback_ns: int) -> int:
    """Return ``msg.header.stamp`` in ns, or fallback_ns when the message has a zero stamp."""
    header = getattr(msg, 'header', None)
    stamp = getattr(header, 'stamp', None)
    if stamp is None:
        return int(fallback_ns)
    value = int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)
    return value if value != 0 else int(fallback_ns)


def iter_messages(bag_path: str | os.PathLike, topics: Iterable[str] | None = None
                  ) -> Iterator[tuple[str, str, int, Any]]:
    """
    Yield (topic, msgtype, log_time_ns, message) in log-time order.

    ``topics`` None reads every topic; a topic the bag lacks raises InputError listing the bag's
    topics. A message that cannot be deserialized raises InputError naming topic and time.
    """
    path = Path(bag_path)
    with _open_any(path) as reader:
        available = {name: info.msgtype or 'mixed types' for name, info in reader.topics.items()}
        wanted = list(available) if topics is None else list(topics)
        require_topics(path, available, wanted)
        connections = [c for c in reader.connections if c.topic in set(wanted)]
        if not connections:
            return
        try:
            for conn, log_ns, raw in reader.messages(connections=connections):
                try:
                    msg = reader.deserialize(raw, conn.msgtype)
                except _BAG_ERRORS as err:
                    raise InputError(
                        f'bag {path}: cannot deserialize {conn.msgtype} on {conn.topic} at '
                        f'{log_ns} ns: {err}') from None
                yield conn.topic, conn.msgtype, log_ns, msg
        except _BAG_ERRORS as err:
            raise _bag_error(path, err) from None


def iter_raw(bag_path: str | os.PathLike, topics: Iterable[str] | None = None
             ) -> Iterator[tuple[str, str, int, bytes]]:
    """Yield (topic, msgtype, log_time_ns, cdr_bytes) of a rosbag2 bag in log-time order."""
    path = Path(bag_path)
    with _open_raw(path) as reader:
        available = {name: info.msgtype or 'mixed types' for name, info in reader.topics.items()}
        wanted = set(available) if topics is None else set(topics)
        require_topics(path, available, sorted(wanted))
        connections = [c for c in reader.connections if c.topic in wanted]
        if not connections:
            return
        try:
            for conn, log_ns, raw in reader.messages(connections=connections):
                yield conn.topic, conn.msgtype, log_ns, bytes(raw)
        except _BAG_ERRORS as err:
            raise _bag_error(path, err) from None


class ImageStream:
    """
    The images of one topic of a bag, an iterator of (stamp_ns, rgb).

    ``stamp_ns`` is ``header.stamp``, or the log time when the stamp is zero. Raw
    (``sensor_msgs/msg/Image``) and compressed (``sensor_msgs/msg/CompressedImage``) topics both
    work. A message that cannot be decoded is skipped: ``skipped`` counts them and ``errors``
    keeps the first few reasons. Constructing checks the topic, so a wrong topic fails at once.
    ``iter()`` (a ``for`` loop) starts again from the first image; ``close()`` ends reading early.
    """

    def __init__(self, bag_path: str | os.PathLike, topic: str) -> None:
        """Check that the bag has an image topic ``topic``."""
        self.bag_path = Path(bag_path)
        self.topic = topic
        with _open_any(self.bag_path) as reader:
            available = {n: i.msgtype or 'mixed types' for n, i in reader.topics.items()}
            require_topics(self.bag_path, available, [topic])
            self.msgtype = available[topic]
            self.message_count = reader.topics[topic].msgcount
        if self.msgtype not in (IMAGE_TYPE, COMPRESSED_IMAGE_TYPE):
            raise InputError(
                f'bag {self.bag_path}: topic {topic} has type {self.msgtype}, not '
                f'{IMAGE_TYPE} or {COMPRESSED_IMAGE_TYPE}')
        self.skipped = 0
        self.errors: list[str] = []
        self._images: Iterator[tuple[int, np.ndarray]] | None = None

    def __iter__(self) -> ImageStream:
        """Start reading from the first image (counters restart too)."""
        self.close()
        self._images = self._generate()
        return self

    def __next__(self) -> tuple[int, np.ndarray]:
        """Return the next (stamp_ns, rgb)."""
        if self._images is None:
            self._images = self._generate()
        return next(self._images)

    def close(self) -> None:
        """Stop reading and release the bag."""
        images, self._images = self._images, None
        if images is not None:
            images.close()

    def _generate(self) -> Iterator[tuple[int, np.ndarray]]:
        """Read the bag from the start, skipping and counting bad messages."""
        self.skipped = 0
        self.errors = []
        with _open_any(self.bag_path) as reader:
            connections = [c for c in reader.connections if c.topic == self.topic]
            try:
                for conn, log_ns, raw in reader.messages(connections=connections):
                    try:
                        msg = reader.deserialize(raw, conn.msgtype)
                        yield stamp_ns(msg, log_ns), image_codec.decode_msg(msg)
                    except (InputError, *_BAG_ERRORS) as err:
                        self._skip(log_ns, err)
            except _BAG_ERRORS as err:
                raise _bag_error(self.bag_path, err) from None

    def _skip(self, log_ns: int, err: BaseException) -> None:
        """Count a bad message and remember why (the first few only)."""
        self.skipped += 1
        if len(self.errors) < _MAX_REPORTED_ERRORS:
            self.errors.append(f'{self.topic} at {log_ns} ns: {err}')


def iter_images(bag_path: str | os.PathLike, topic: str) -> ImageStream:
    """Return the (stamp_ns, rgb) images of ``topic``; see :class:`ImageStream`."""
    return ImageStream(bag_path, topic)


@dataclass
class GpsTrack:
    """
    Positions over time, sorted by stamp.

    Arrays of equal length N: ``stamps_ns`` (int64 ns), ``lat`` and ``lon`` (WGS 84 degrees),
    ``alt`` (m above the WGS 84 ellipsoid, NaN when unknown), ``status`` (NavSatStatus.status;
    0 for geographic_msgs topics). ``covariance`` is (N, 3, 3) or None: for NavSatFix the
    position covariance in m^2 on East, North, Up axes (NaN where the fix says UNKNOWN); for
    GeoPoseWithCovariance the top-left 3x3 of its 6x6 matrix, axes (latitude, longitude,
    altitude) as that message defines them (``covariance_axes`` says which). ``dropped`` counts
    fixes left out (NO_FIX status or NaN latitude/longitude); ``msgtype`` is the type read.
    """

    stamps_ns: np.ndarray
    lat: np.ndarray
    lon: np.ndarray
    alt: np.ndarray
    status: np.ndarray
    covariance: np.ndarray | None = None
    covariance_axes: str = ''
    dropped: int = 0
    msgtype: str = ''

    def __post_init__(self) -> None:
        """Convert to arrays and sort by stamp (stable, so equal stamps keep bag order)."""
        self.stamps_ns = np.asarray(self.stamps_ns, dtype=np.int64).reshape(-1)
        order = np.argsort(self.stamps_ns, kind='stable')
        self.stamps_ns = self.stamps_ns[order]
        self.lat = np.asarray(self.lat, dtype=np.float64).reshape(-1)[order]
        self.lon = np.asarray(self.lon, dtype=np.float64).reshape(-1)[order]
        self.alt = np.asarray(self.alt, dtype=np.float64).reshape(-1)[order]
        self.status = np.asarray(self.status, dtype=np.int16).reshape(-1)[order]
        if self.covariance is not None:
            self.covariance = np.asarray(self.covariance, dtype=np.float64).reshape(-1, 3, 3)
            self.covariance = self.covariance[order]
        sizes = {len(a) for a in (self.stamps_ns, self.lat, self.lon, self.alt, self.status)}
        if self.covariance is not None:
            sizes.add(len(self.covariance))
        if len(sizes) != 1:
            raise ValueError(f'GpsTrack arrays differ in length: {sorted(sizes)}')

    def __len__(self) -> int:
        """Return the number of positions."""
        return len(self.stamps_ns)

    def interpolate_many(self, stamps_ns: Any, max_gap_s: float = 1.0
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """
        Interpolate linearly in time at many stamps; return (lat, lon, alt, valid).

        A stamp is valid when it lies within the track and both positions around it are at most
        ``max_gap_s`` seconds away from it (an exact match is always valid); invalid entries are
        NaN. Longitude is interpolated along the short way round, so a track crossing the
        antimeridian stays continuous; results lie in [-180, 180).
        """
        t = np.asarray(stamps_ns, dtype=np.int64).reshape(-1)
        nan = np.full(t.shape, np.nan)
        n = len(self.stamps_ns)
        if n == 0:
            return nan, nan.copy(), nan.copy(), np.zeros(t.shape, dtype=bool)
        ts = self.stamps_ns
        upper = np.searchsorted(ts, t, side='right')  # ts[upper - 1] <= t < ts[upper]
        lo = np.clip(upper - 1, 0, n - 1)
        hi = np.clip(upper, 0, n - 1)
        exact = ts[lo] == t
        max_gap_ns = max_gap_s * 1e9
        valid = (t >= ts[0]) & (t <= ts[-1]) & (
            exact | ((t - ts[lo] <= max_gap_ns) & (ts[hi] - t <= max_gap_ns)))
        span = (ts[hi] - ts[lo]).astype(np.float64)
        frac = np.where(exact | (span <= 0), 0.0, (t - ts[lo]) / np.where(span > 0, span, 1.0))
        lat = self.lat[lo] + frac * (self.lat[hi] - self.lat[lo])
        dlon = (self.lon[hi] - self.lon[lo] + 180.0) % 360.0 - 180.0
        lon = (self.lon[lo] + frac * dlon + 180.0) % 360.0 - 180.0
        alt = self.alt[lo] + frac * (self.alt[hi] - self.alt[lo])
        alt = np.where(exact, self.alt[lo], alt)  # no NaN leaking in from the next fix
        return (np.where(valid, lat, np.nan), np.where(valid, lon, np.nan),
                np.where(valid, alt, np.nan), valid)

    def interpolate(self, stamp_ns: int, max_gap_s: float = 1.0
                    ) -> tuple[float, float, float] | None:
        """Return (lat, lon, alt) at stamp_ns, or None without a position within max_gap_s."""
        lat, lon, alt, valid = self.interpolate_many([stamp_ns], max_gap_s)
        if not valid[0]:
            return None
        return float(lat[0]), float(lon[0]), float(alt[0])


def read_navsat(bag_path: str | os.PathLike, topic: str) -> GpsTrack:
    """
    Read a position topic into a GpsTrack.

    Reads ``sensor_msgs/msg/NavSatFix`` (ground truth or estimates) and the geographic_msgs
    GeoPoseWithCovarianceStamped, GeoPoseStamped and GeoPointStamped estimate topics. Stamps are
    ``header.stamp`` (the log time where the stamp is zero).
    """
    path = Path(bag_path)
    msgtype = list_topics(path).get(topic)
    if msgtype is not None and msgtype not in POSITION_TYPES:
        raise InputError(f'bag {path}: topic {topic} has type {msgtype}; expected one of '
                         f'{", ".join(POSITION_TYPES)}')
    stamps, lat, lon, alt, status, cov = [], [], [], [], [], []
    dropped = 0
    for _topic, msgtype, log_ns, msg in iter_messages(path, [topic]):
        point, fix_status, matrix = _position_of(msgtype, msg)
        if fix_status == -1 or not (np.isfinite(point[0]) and np.isfinite(point[1])):
            dropped += 1  # NavSatStatus.STATUS_NO_FIX or no coordinates: not a position
            continue
        stamps.append(stamp_ns(msg, log_ns))
        lat.append(point[0])
        lon.append(point[1])
        alt.append(point[2])
        status.append(fix_status)
        cov.append(matrix)
    has_cov = any(c is not None for c in cov)
    covariance = None
    if has_cov:
        covariance = np.array([c if c is not None else np.full((3, 3), np.nan) for c in cov])
    axes = ''
    if has_cov:
        axes = 'east,north,up' if msgtype == NAVSAT_TYPE else 'latitude,longitude,altitude'
    return GpsTrack(np.array(stamps, dtype=np.int64), lat, lon, alt, status,
                    covariance if len(stamps) else None, axes, dropped, msgtype or '')


def _position_of(msgtype: str, msg: Any) -> tuple[tuple[float, float, float], int,
                                                  np.ndarray | None]:
    """Return ((lat, lon, alt), status, 3x3 covariance or None) of a position message."""
    if msgtype == NAVSAT_TYPE:
        matrix = np.asarray(msg.position_covariance, dtype=np.float64).reshape(3, 3)
        if int(msg.position_covariance_type) == 0:  # COVARIANCE_TYPE_UNKNOWN
            matrix = None
        point = (float(msg.latitude), float(msg.longitude), float(msg.altitude))
        return point, int(msg.status.status), matrix
    if msgtype == GEOPOSE_COV_STAMPED_TYPE:
        position = msg.pose.pose.position
        matrix = np.asarray(msg.pose.covariance, dtype=np.float64).reshape(6, 6)[:3, :3]
    elif msgtype == GEOPOSE_STAMPED_TYPE:
        position, matrix = msg.pose.position, None
    else:
        position, matrix = msg.position, None
    point = (float(position.latitude), float(position.longitude), float(position.altitude))
    return point, 0, matrix


def _ros_time(stamp: int) -> Any:
    """Return a builtin_interfaces/msg/Time for a stamp in ns."""
    time_cls = typestore().types['builtin_interfaces/msg/Time']
    sec, nanosec = divmod(int(stamp), 1_000_000_000)
    return time_cls(sec=sec, nanosec=nanosec)


def _header(stamp: int, frame_id: str) -> Any:
    """Return a std_msgs/msg/Header."""
    return typestore().types['std_msgs/msg/Header'](stamp=_ros_time(stamp), frame_id=frame_id)


class BagWriter:
    """
    Write a rosbag2 bag (MCAP or sqlite3), all or nothing; usable from any thread.

    Messages go to a hidden temporary directory next to ``path``; ``close()`` renames the finished
    bag into place. On an exception inside ``with``, or after a crash, nothing appears at
    ``path``. An existing ``path`` is refused. The log time of every message is the given stamp.
    Every storage call runs on one worker thread of the writer (sqlite3 connections work only on
    the thread that opened them), so ROS callbacks on executor threads may write.
    """

    def __init__(self, path: str | os.PathLike, storage: str = 'mcap') -> None:
        """Start a bag that will appear at ``path`` on close."""
        self.path = Path(path)
        if storage not in _STORAGES:
            raise InputError(f'unknown bag storage {storage!r}; use one of {", ".join(_STORAGES)}')
        if self.path.exists() or self.path.is_symlink():
            raise InputError(f'{self.path} already exists; refusing to overwrite it')
        self.storage = storage
        self.count = 0
        self._connections: dict[tuple[str, str], Any] = {}
        parent = self.path.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
            self._tmp_root = Path(tempfile.mkdtemp(
                prefix=f'.{self.path.name}.', suffix='.partial', dir=parent))
        except OSError as err:
            raise InputError(f'cannot create bag {self.path}: {err}') from None
        self._io: ThreadPoolExecutor | None = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix='bag-writer')
        self._writer: Writer | None = Writer(
            self._tmp_root / self.path.name, version=_BAG_VERSION,
            storage_plugin=_STORAGES[storage])
        try:
            self._run(self._writer.open)
        except (WriterError, OSError) as err:
            self.abort()
            raise InputError(f'cannot create bag {self.path}: {err}') from None

    def _run(self, func: Any, *args: Any) -> Any:
        """Run func(*args) on the writer thread and return its result (or raise its error)."""
        if self._io is None:
            raise InputError(f'bag {self.path} is already closed')
        return self._io.submit(func, *args).result()

    def __enter__(self) -> BagWriter:
        """Return self."""
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        """Close on success, abort (leaving nothing at path) on an exception."""
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def _connection(self, topic: str, msgtype: str) -> Any:
        """Return the connection for (topic, msgtype), adding it on first use (writer thread)."""
        if self._writer is None:
            raise InputError(f'bag {self.path} is already closed')
        key = (topic, msgtype)
        if key not in self._connections:
            if msgtype not in typestore().fielddefs:
                raise InputError(
                    f'cannot record {topic}: message type {msgtype} is unknown (not in ROS 2 '
                    'Kilted nor geographic_msgs)')
            self._connections[key] = self._writer.add_connection(
                topic, msgtype, typestore=typestore())
        return self._connections[key]

    def _write(self, topic: str, msgtype: str, stamp_ns: int, data: bytes) -> None:
        """Write one serialized message (writer thread)."""
        conn = self._connection(topic, msgtype)
        self._writer.write(conn, stamp_ns, data)
        self.count += 1

    def add_topic(self, topic: str, msgtype: str) -> None:
        """Declare a topic now, so that it is listed in the bag even if no message arrives."""
        self._run(self._connection, topic, msgtype)

    def write_raw(self, topic: str, msgtype: str, stamp_ns: int, cdr_bytes: bytes) -> None:
        """Write an already serialized (CDR) message with log time stamp_ns."""
        self._run(self._write, topic, msgtype, int(stamp_ns), bytes(cdr_bytes))

    def write_msg(self, topic: str, stamp_ns: int, msg: Any) -> None:
        """Serialize a rosbags message object (from :func:`typestore`) and write it."""
        msgtype = msg.__msgtype__
        self.write_raw(topic, msgtype, stamp_ns, typestore().serialize_cdr(msg, msgtype))

    def write_image(self, topic: str, stamp_ns: int, rgb: np.ndarray, frame_id: str = 'camera',
                    encoding: str = 'bgr8', compressed: str | None = None,
                    quality: int = 90) -> None:
        """
        Write an (H, W, 3) uint8 RGB image as an Image, or a CompressedImage when compressed.

        ``compressed`` is None (raw ``encoding``), 'jpeg' or 'png'.
        """
        types = typestore().types
        if compressed:
            fmt, data = image_codec.encode_compressed(rgb, compressed, quality)
            msg = types[COMPRESSED_IMAGE_TYPE](
                header=_header(stamp_ns, frame_id), format=fmt,
                data=np.frombuffer(data, dtype=np.uint8))
        else:
            enc, height, width, step, data = image_codec.encode_raw(rgb, encoding)
            msg = types[IMAGE_TYPE](
                header=_header(stamp_ns, frame_id), height=height, width=width, encoding=enc,
                is_bigendian=0, step=step, data=np.frombuffer(data, dtype=np.uint8))
        self.write_msg(topic, stamp_ns, msg)

    def write_navsat(self, topic: str, stamp_ns: int, lat: float, lon: float, alt: float,
                     cov: Any = None, status: int = 0, frame_id: str = 'gps') -> None:
        """Write a NavSatFix; ``cov`` is a 3x3 (or 9) ENU position covariance in m^2, or None."""
        types = typestore().types
        if cov is None:
            matrix, cov_type = np.zeros(9), 0  # COVARIANCE_TYPE_UNKNOWN
        else:
            matrix, cov_type = np.asarray(cov, dtype=np.float64).reshape(9), 3  # KNOWN
        msg = types[NAVSAT_TYPE](
            header=_header(stamp_ns, frame_id),
            status=types['sensor_msgs/msg/NavSatStatus'](status=int(status), service=1),
            latitude=float(lat), longitude=float(lon), altitude=float(alt),
            position_covariance=matrix, position_covariance_type=cov_type)
        self.write_msg(topic, stamp_ns, msg)

    def write_geopose(self, topic: str, stamp_ns: int, lat: float, lon: float, alt: float,
                      cov: Any = None, orientation: tuple[float, float, float, float] = (
                          0.0, 0.0, 0.0, 1.0), frame_id: str = 'map') -> None:
        """
        Write a GeoPoseWithCovarianceStamped; ``cov`` is 6x6 (or 36) or None (zeros).

        ``orientation`` is an (x, y, z, w) quaternion in the local ENU frame.
        """
        types = typestore().types
        matrix = np.zeros(36) if cov is None else np.asarray(cov, dtype=np.float64).reshape(36)
        pose = types['geographic_msgs/msg/GeoPose'](
            position=types['geographic_msgs/msg/GeoPoint'](
                latitude=float(lat), longitude=float(lon), altitude=float(alt)),
            orientation=types['geometry_msgs/msg/Quaternion'](*map(float, orientation)))
        msg = types[GEOPOSE_COV_STAMPED_TYPE](
            header=_header(stamp_ns, frame_id),
            pose=types['geographic_msgs/msg/GeoPoseWithCovariance'](pose=pose, covariance=matrix))
        self.write_msg(topic, stamp_ns, msg)

    def close(self) -> None:
        """Finish the bag and move it to ``path``; calling close twice does nothing."""
        if self._writer is None:
            return
        writer, self._writer = self._writer, None
        try:
            self._io.submit(writer.close).result()
        except BaseException:
            self._remove_tmp()
            raise
        finally:
            self._stop_io()
        if self.path.exists():
            kept = self._tmp_root / self.path.name
            raise InputError(f'{self.path} appeared while recording; the bag is kept at {kept}')
        os.rename(self._tmp_root / self.path.name, self.path)
        self._remove_tmp()

    def abort(self) -> None:
        """Discard everything written; nothing appears at ``path``."""
        writer, self._writer = self._writer, None
        if writer is not None and self._io is not None:
            try:
                self._io.submit(writer.abort).result()
            except Exception:  # noqa: BLE001 - the files are deleted next anyway
                pass
        self._stop_io()
        self._remove_tmp()

    def _stop_io(self) -> None:
        """Stop the writer thread."""
        io, self._io = self._io, None
        if io is not None:
            io.shutdown(wait=True)

    def _remove_tmp(self) -> None:
        """Delete the temporary directory."""
        shutil.rmtree(self._tmp_root, ignore_errors=True)
