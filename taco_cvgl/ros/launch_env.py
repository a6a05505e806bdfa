"""
The launch file's environment decisions, as plain functions (importable without `launch`).

config/fastdds_shm.xml lets full-size camera images cross processes over Fast DDS shared memory.
The launch file sets it only where it applies and takes nothing from the user: not under another
middleware (RMW_IMPLEMENTATION names a non-Fast DDS RMW), and not over a profile the user already
set (FASTDDS_DEFAULT_PROFILES_FILE, or its older name FASTRTPS_DEFAULT_PROFILES_FILE).
"""

from __future__ import annotations

from typing import Mapping, Optional, Tuple

PROFILE_VARIABLE = 'FASTDDS_DEFAULT_PROFILES_FILE'
# Fast DDS 2.x still reads the profile from its former name.
PROFILE_VARIABLES = (PROFILE_VARIABLE, 'FASTRTPS_DEFAULT_PROFILES_FILE')
# The RMW implementations built on Fast DDS; an unset RMW_IMPLEMENTATION means the default one,
# Fast DDS on every ROS 2 distribution since Foxy.
FASTDDS_RMWS = ('rmw_fastrtps_cpp', 'rmw_fastrtps_dynamic_cpp')


def shm_profile(environ: Mapping[str, str], wanted: bool,
                profile_path: str) -> Tuple[Optional[str], str]:
    """
    Return (the profile file to set, or None) and a line saying why, for the launch log.

    environ: the launching environment; wanted: the use_shm_profile launch argument.
    """
    if not wanted:
        return None, 'use_shm_profile is false: Fast DDS profile left as it is'
    rmw = environ.get('RMW_IMPLEMENTATION', '').strip()
    if rmw and rmw not in FASTDDS_RMWS:
        return None, (f'RMW_IMPLEMENTATION is {rmw}, not Fast DDS: '
                      f'{profile_path} does not apply, not set')
    for name in PROFILE_VARIABLES:
        if environ.get(name, '').strip():
            return None, f'{name} is already set ({environ[name]}): kept, {profile_path} not set'
    return profile_path, f'{PROFILE_VARIABLE}={profile_path} (large images over shared memory)'
