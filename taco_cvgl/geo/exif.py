"""Read GPS position and direction from a photo's EXIF tags (GPS IFD, EXIF 2.3)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Optional

from taco_cvgl.errors import InputError

GPS_IFD = 0x8825
# Tag numbers inside the GPS IFD.
LAT_REF, LAT, LON_REF, LON, ALT_REF, ALT = 1, 2, 3, 4, 5, 6
DIRECTION_REF, DIRECTION = 16, 17


@dataclasses.dataclass
class GpsTag:
    """Position (degrees, metres above sea level) and camera direction (deg from north)."""

    latitude: float
    longitude: float
    altitude: float = math.nan
    heading: float = math.nan


def _degrees(dms, ref: str) -> float:
    degrees, minutes, seconds = (float(v) for v in dms)
    value = degrees + minutes / 60.0 + seconds / 3600.0
    return -value if ref.strip().upper() in ('S', 'W') else value


def read_gps(path) -> Optional[GpsTag]:
    """
    Return the GPS tag of an image file, or None where it has none.

    Altitude is negative when GPSAltitudeRef is 1 (below sea level). Heading is GPSImgDirection;
    a magnetic reference ('M') is kept as is, since the declination is not known here.
    """
    from PIL import Image, UnidentifiedImageError
    path = Path(path)
    try:
        with Image.open(path) as image:
            gps = image.getexif().get_ifd(GPS_IFD)
    except (FileNotFoundError, UnidentifiedImageError, OSError) as exc:
        raise InputError(f'cannot read EXIF of {path}: {exc}') from None
    if LAT not in gps or LON not in gps:
        return None
    try:
        lat = _degrees(gps[LAT], gps.get(LAT_REF, 'N'))
        lon = _degrees(gps[LON], gps.get(LON_REF, 'E'))
    except (TypeError, ValueError, ZeroDivisionError) as exc:
        raise InputError(f'{path}: malformed EXIF GPS position: {exc}') from None
    if not (-90 <= lat <= 90 and -180 <= lon <= 180):
        raise InputError(f'{path}: EXIF GPS position out of range ({lat}, {lon})')
    altitude = math.nan
    if ALT in gps:
        altitude = float(gps[ALT])
        ref = gps.get(ALT_REF, 0)
        if (ref[0] if isinstance(ref, bytes) else int(ref)) == 1:
            altitude = -altitude
    heading = float(gps[DIRECTION]) % 360.0 if DIRECTION in gps else math.nan
    return GpsTag(lat, lon, altitude, heading)


def write_gps(image, path, tag: GpsTag, quality: int = 95) -> None:
    """Save a PIL image as JPEG with EXIF GPS tags (used to make test and demo data)."""
    from PIL import Image

    def dms(value: float):
        value = abs(value)
        d = int(value)
        m = int((value - d) * 60)
        s = (value - d - m / 60.0) * 3600.0
        return (d, m, round(s, 4))

    exif = Image.Exif()
    gps = exif.get_ifd(GPS_IFD)
    gps[LAT_REF] = 'N' if tag.latitude >= 0 else 'S'
    gps[LAT] = dms(tag.latitude)
    gps[LON_REF] = 'E' if tag.longitude >= 0 else 'W'
    gps[LON] = dms(tag.longitude)
    if math.isfinite(tag.altitude):
        gps[ALT_REF] = 1 if tag.altitude < 0 else 0
        gps[ALT] = abs(tag.altitude)
    if math.isfinite(tag.heading):
        gps[DIRECTION_REF] = 'T'
        gps[DIRECTION] = tag.heading % 360.0
    image.save(path, format='JPEG', quality=quality, exif=exif)
