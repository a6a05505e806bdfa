"""
Ground truth for `taco-cvgl evaluate`: positions and headings read from bags, and VPR datasets.

- bags: the ground-truth NavSatFix track, ground-truth headings (QuaternionStamped, Imu,
  GeoPose), the heading priors of an orientation topic as the node reads them, image counts;
- VPR dataset folders: each image's position from its file name (VPR_NAME) or from a CSV.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, TYPE_CHECKING

import numpy as np
from taco_cvgl.errors import InputError
from taco_cvgl.evaluation.scoring import interpolate_headings
from taco_cvgl.files import bags
from taco_cvgl.geo.geodesy import enu_yaw_to_heading
from taco_cvgl.localization.heading import quaternion_yaw
from taco_cvgl.localization.orientation import message_prior, MESSAGE_TYPES, OrientationBuffer

if TYPE_CHECKING:   # torch loads in seconds: not before it is needed
    from taco_cvgl.mapdb.database import ImageRecord

QUATERNION_STAMPED_TYPE = MESSAGE_TYPES['quaternion']
IMU_TYPE = MESSAGE_TYPES['imu']
#: Topic types whose orientation gives a heading (quaternion in the ENU frame, REP-103/145).
HEADING_TYPES = (QUATERNION_STAMPED_TYPE, IMU_TYPE, bags.GEOPOSE_COV_STAMPED_TYPE,
                 bags.GEOPOSE_STAMPED_TYPE)
# A yaw variance above (2 pi)^2 rad^2 says nothing about the heading (the node publishes 1e6
# when it has none).
UNKNOWN_YAW_VARIANCE = (2.0 * math.pi) ** 2
MAX_LISTED_FAILURES = 10

#: The fields of a VPR dataset file name (gmberton's VPR-datasets-downloader and
#: VPR-methods-evaluation), between '@' signs and before the extension; any may be empty.
VPR_FIELDS = ('utm_east', 'utm_north', 'utm_zone_number', 'utm_zone_letter', 'latitude',
              'longitude', 'pano_id', 'tile_num', 'heading', 'pitch', 'roll', 'height',
              'timestamp', 'note')
VPR_NAME = '@' + '@'.join(VPR_FIELDS) + '@.jpg'
UTM_BANDS = 'CDEFGHJKLMNPQRSTUVWX'    # latitude band letters, south to north; N on: north


def _topics(path: Path) -> Dict[str, str]:
    """Return {topic: type} of a bag (InputError naming the bag when it cannot be read)."""
    return bags.list_topics(path)


def require_topic(path: Path, topic: str, what: str) -> str:
    """Return the type of `topic` in the bag, or raise InputError listing the bag's topics."""
    available = _topics(path)
    if topic not in available:
        have = ', '.join(f'{t} ({m})' for t, m in available.items()) or 'none'
        raise InputError(f'bag {path} has no {what} topic {topic}; its topics: {have}')
    return available[topic]


def read_truth(path: Path, topic: str) -> bags.GpsTrack:
    """Read the ground-truth position topic; refuse one without a single usable position."""
    require_topic(path, topic, 'ground-truth')
    track = bags.read_navsat(path, topic)
    if len(track) == 0:
        raise InputError(f'bag {path}: ground-truth topic {topic} holds no usable position '
                         f'({track.dropped} message(s) without a fix)')
    return track


def _yaw(q) -> float:
    """Return the ENU yaw (rad, counter-clockwise from east) of a quaternion message, or NaN."""
    try:
        return quaternion_yaw(q.x, q.y, q.z, q.w)
    except InputError:   # not finite, or zero norm
        return math.nan


def _orientation_messages(path: Path, topic: str, what: str, types: Sequence[str]):
    """Yield (stamp_ns, msgtype, message) of a topic of one of `types` (InputError if not)."""
    msgtype = require_topic(path, topic, what)
    if msgtype not in types:
        raise InputError(f'bag {path}: topic {topic} has type {msgtype}; a {what} topic must '
                         f'be one of {", ".join(types)}')
    for _topic, msgtype, log_ns, msg in bags.iter_messages(path, [topic]):
        yield bags.stamp_ns(msg, log_ns), msgtype, msg


def read_headings(path: Path, topic: str) -> Tuple[np.ndarray, np.ndarray]:
    """
    Return (stamps_ns, compass headings in degrees) of an orientation topic.

    Reads geometry_msgs/QuaternionStamped and sensor_msgs/Imu (orientation relative to ENU, as
    REP-145 asks of an IMU; an Imu whose orientation_covariance[0] is -1 has none and is
    skipped) and the geographic_msgs GeoPose estimates (a yaw variance above (2 pi)^2 marks an
    unknown heading: NaN, as a NaN or zero quaternion does).
    """
    stamps, headings = [], []
    for stamp, msgtype, msg in _orientation_messages(path, topic, 'heading', HEADING_TYPES):
        heading = math.nan
        if msgtype == QUATERNION_STAMPED_TYPE:
            heading = enu_yaw_to_heading(_yaw(msg.quaternion))
        elif msgtype == IMU_TYPE:
            if float(msg.orientation_covariance[0]) == -1.0:
                continue
            heading = enu_yaw_to_heading(_yaw(msg.orientation))
        elif msgtype == bags.GEOPOSE_COV_STAMPED_TYPE:
            variance = float(np.asarray(msg.pose.covariance, dtype=float)[35])
            if math.isfinite(variance) and variance < UNKNOWN_YAW_VARIANCE:
                heading = enu_yaw_to_heading(_yaw(msg.pose.pose.orientation))
        else:
            heading = enu_yaw_to_heading(_yaw(msg.pose.orientation))
        stamps.append(stamp)
        headings.append(heading)
    return np.array(stamps, dtype=np.int64), np.array(headings, dtype=float)


def read_heading_priors(path: Path, topic: str, default_sigma_deg: float
                        ) -> Tuple[OrientationBuffer, Dict[str, Any]]:
    """
    Return the heading priors of an orientation topic by stamp, and what was read.

    The topic is sensor_msgs/Imu or geometry_msgs/QuaternionStamped, each message turned into a
    prior as the node does (localization.orientation.message_prior; default_sigma_deg where the
    message gives none). A message without a usable heading is counted and skipped.
    """
    kinds = {msgtype: kind for kind, msgtype in MESSAGE_TYPES.items()}
    samples, bad, reasons, msgtype = [], 0, [], None
    for stamp, msgtype, msg in _orientation_messages(path, topic, 'orientation', list(kinds)):
        prior, reason = message_prior(msg, kinds[msgtype], default_sigma_deg)
        if prior is None:
            bad += 1
            if reason not in reasons and len(reasons) < MAX_LISTED_FAILURES:
                reasons.append(reason)
        else:
            samples.append((stamp, prior))
    buffer = OrientationBuffer(max(1, len(samples)))
    for stamp, prior in samples:
        buffer.add(stamp, prior)
    return buffer, {'topic': topic, 'bag': str(path), 'type': msgtype,
                    'messages': len(samples) + bad, 'bad_messages': bad, 'bad_reasons': reasons}


def bag_with(bag_paths: Sequence[Path], topic: str, what: str) -> Path:
    """Return the first bag that has the topic; InputError listing the first's topics if none."""
    for path in bag_paths:
        if topic in _topics(path):
            return path
    require_topic(bag_paths[0], topic, what)  # raises, listing the topics
    return bag_paths[0]


def heading_truth(bag_paths: Sequence[Path], topic: Optional[str]
                  ) -> Optional[Tuple[np.ndarray, np.ndarray]]:
    """Read the ground-truth heading topic from the first bag that has it (None: no topic)."""
    if not topic:
        return None
    stamps, headings = read_headings(bag_with(bag_paths, topic, 'ground-truth heading'), topic)
    known = np.isfinite(headings)
    return stamps[known], headings[known]


def truth_at(track: bags.GpsTrack, heading: Optional[Tuple[np.ndarray, np.ndarray]],
             stamps_ns, max_gap_s: float) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return (lat, lon, heading) of the ground truth at the stamps (NaN where unknown)."""
    lat, lon, _alt, _valid = track.interpolate_many(stamps_ns, max_gap_s)
    if heading is None:
        hdg = np.full(len(lat), np.nan)
    else:
        hdg = interpolate_headings(heading[0], heading[1], stamps_ns, max_gap_s)
    return lat, lon, hdg


def count_images(topic: str, bag_paths: Sequence[Path], truth: bags.GpsTrack,
                 max_gt_gap_s: float, progress: bool) -> Dict[str, int]:
    """Count the images of a topic (in the first bag that has it) and those with ground truth."""
    from tqdm import tqdm
    for path in bag_paths:
        available = _topics(path)
        if topic in available:
            break
    else:
        require_topic(bag_paths[0], topic, 'image')
    if available[topic] not in (bags.IMAGE_TYPE, bags.COMPRESSED_IMAGE_TYPE):
        raise InputError(f'bag {path}: topic {topic} has type {available[topic]}, not '
                         f'{bags.IMAGE_TYPE} or {bags.COMPRESSED_IMAGE_TYPE}')
    stamps = []
    with tqdm(desc='counting images', unit='img', disable=not progress) as bar:
        for _topic, _type, log_ns, msg in bags.iter_messages(path, [topic]):
            stamps.append(bags.stamp_ns(msg, log_ns))
            bar.update(1)
    _lat, _lon, _alt, valid = truth.interpolate_many(stamps, max_gt_gap_s)
    return {'total': len(stamps), 'with_ground_truth': int(valid.sum()), 'bag': str(path)}


# ---------------------------------------------------------------------------------------------
# VPR dataset folders: positions from the file names, or a CSV


def vpr_fields(path: Path) -> Dict[str, str]:
    """Return the named fields of a VPR file name; InputError naming the file if it is none."""
    parts = path.name.split('@')
    if len(parts) < 8 or parts[0]:
        raise InputError(f'{path}: not a VPR dataset file name ({VPR_NAME}, fields possibly '
                         f'empty); name the files so, or list them with their positions in a '
                         f'CSV (--database-csv / --queries-csv)')
    return dict(zip(VPR_FIELDS, (p.strip() for p in parts[1:-1])))


def _number(fields: Dict[str, str], name: str) -> float:
    """Return a file name field as a number (ValueError saying which field is not one)."""
    text = fields.get(name, '')
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f'{name} {text!r} is not a number') from None
    if not math.isfinite(value):
        raise ValueError(f'{name} {text!r} is not a finite number')
    return value


def _utm_to_latlon(fields: Dict[str, str]) -> Tuple[float, float]:
    """Return (latitude, longitude) of a name's WGS84 UTM fields (hemisphere from the band)."""
    east, north = _number(fields, 'utm_east'), _number(fields, 'utm_north')
    zone, band = fields.get('utm_zone_number', ''), fields.get('utm_zone_letter', '').upper()
    if not (zone.isdigit() and 1 <= int(zone) <= 60):
        raise ValueError(f'utm_zone_number {zone!r} is not a zone 1..60')
    if len(band) != 1 or band not in UTM_BANDS:
        raise ValueError(f'utm_zone_letter {band!r} is not a latitude band C..X')
    epsg = (32600 if band >= 'N' else 32700) + int(zone)
    lon, lat = _utm_transformer(epsg).transform(east, north)
    return float(lat), float(lon)


@functools.lru_cache(maxsize=None)
def _utm_transformer(epsg: int):
    """Return the pyproj transformer of one UTM zone to WGS84 degrees (made once per zone)."""
    from pyproj import Transformer
    return Transformer.from_crs(epsg, 4326, always_xy=True)


def vpr_record(path: Path) -> ImageRecord:
    """Return an image's record from its VPR file name: latitude/longitude, else UTM."""
    from taco_cvgl.mapdb.database import check_coordinates, checked_heading, ImageRecord
    fields = vpr_fields(path)
    try:
        if fields.get('latitude') and fields.get('longitude'):
            lat, lon = _number(fields, 'latitude'), _number(fields, 'longitude')
        else:
            lat, lon = _utm_to_latlon(fields)
        heading = _number(fields, 'heading') if fields.get('heading') else math.nan
    except ValueError as exc:
        raise InputError(f'{path}: {exc} (a VPR file name is {VPR_NAME}, with latitude and '
                         f'longitude or the UTM fields)') from None
    check_coordinates(lat, lon, str(path))
    return ImageRecord(str(path), lat, lon, heading=checked_heading(heading, str(path)))


def dataset_records(folder: Optional[Path], csv_file: Optional[Path], side: str
                    ) -> List[ImageRecord]:
    """
    Return one side's images with their positions: from a CSV, else the folder's file names.

    The CSV is build-db's (image_path,latitude,longitude[,heading][,altitude]; relative paths
    taken from the folder when given, else from the CSV's own folder).
    """
    from taco_cvgl.mapdb.database import iter_image_files, read_csv
    if csv_file is not None:
        return read_csv(csv_file, folder)
    if folder is None:
        raise InputError(f'give the {side} images: --{side}-folder DIR (VPR file names) or '
                         f'--{side}-csv FILE')
    if not folder.is_dir():
        raise InputError(f'--{side}-folder {folder}: no such folder')
    images = list(iter_image_files(folder))
    if not images:
        raise InputError(f'--{side}-folder {folder} holds no image (.jpg, .png, ...)')
    return [vpr_record(p) for p in images]
