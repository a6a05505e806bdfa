"""
Files written whole and checked whole.

`atomic_path` writes a file under a temporary name and renames it into place, so no reader sees
half a file; `sha256_of` digests a file in blocks, for checks of what was written or shipped.

The temporary file never outlives its write: it is deleted when the write fails (in the
`taco-cvgl` commands SIGTERM and SIGHUP raise SystemExit, see cli.common.reports_errors, so a
stopped command cleans up too) and, where a writer was killed outright (SIGKILL, out of memory), by
the next write of the same file. Signal handlers are not touched here: a library cannot see the
handlers C code installed (rclpy's), and replacing them would break that code's shutdown.
"""

import contextlib
import glob
import hashlib
import os
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path):
    """
    Yield a temporary path beside `path`; on success rename it to `path`, else delete it.

    The rename is atomic on POSIX file systems: a reader (or a later run) finds the old file or
    the complete new one, never a partial write, even when the writer is killed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(path)
    tmp = path.with_name(f'{_tmp_prefix(path)}{os.getpid()}')
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _tmp_prefix(path: Path) -> str:
    return f'.{path.name}.tmp'


def _remove_stale(path: Path) -> None:
    """Delete temporary files of `path` left by writers of this machine that no longer run."""
    prefix = _tmp_prefix(path)
    for other in path.parent.glob(glob.escape(prefix) + '*'):
        pid = other.name[len(prefix):]
        if pid.isdigit() and int(pid) != os.getpid() and not _running(int(pid)):
            with contextlib.suppress(OSError):
                other.unlink()


def _running(pid: int) -> bool:
    """Return whether process `pid` exists (True where that cannot be known)."""
    if os.name != 'posix':     # os.kill(pid, 0) would terminate it on Windows
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:            # EPERM: it runs, as another user
        return True
    return True


def sha256_of(path) -> str:
    """Return the hex sha256 of a file, read in 1 MiB blocks (no copy of a large file)."""
    digest = hashlib.sha256()
    with open(path, 'rb') as handle:
        for block in iter(lambda: handle.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()
