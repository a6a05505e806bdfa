"""Where on Earth: WGS84 geodesy, local ENU frames, heading conventions, EXIF GPS."""
