"""Write a file under a temporary name and rename it into place, so no reader sees half a file."""

import contextlib
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
    tmp = path.with_name(f'.{path.name}.tmp{os.getpid()}')
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
