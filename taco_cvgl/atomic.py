"""
Write a file under a temporary name and rename it into place, so no reader sees half a file.

The temporary file never outlives its write: it is deleted when the write fails, when SIGTERM,
SIGHUP (or a SIGINT whose handler is the default) stops the process mid-write, and, where a
writer was killed outright (SIGKILL, out of memory), by the next write of the same file.
"""

import contextlib
import glob
import os
from pathlib import Path
import signal
import threading

# Signals whose default action ends the process without running `finally` blocks.
STOP_SIGNALS = tuple(getattr(signal, name) for name in ('SIGTERM', 'SIGHUP', 'SIGINT')
                     if hasattr(signal, name))

# Temporary files being written by this process, in any thread. Plain set operations (atomic
# under the GIL) and no lock: the signal handler runs in the main thread between bytecodes and
# would deadlock on a lock that thread holds.
_pending = set()


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
    _register(tmp)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        _unregister(tmp)


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


def _register(tmp: Path) -> None:
    """Note a write; from the main thread, catch the stop signals left at their default."""
    _pending.add(tmp)
    if threading.current_thread() is not threading.main_thread():
        return                 # signal handlers can only be set from the main thread
    for signum in STOP_SIGNALS:
        if signal.getsignal(signum) == signal.SIG_DFL:
            signal.signal(signum, _on_stop_signal)


def _unregister(tmp: Path) -> None:
    """Forget a write; once none is left, give the signals their default back."""
    _pending.discard(tmp)
    if _pending or threading.current_thread() is not threading.main_thread():
        return                 # the handler stays, harmless: it acts as the default would
    for signum in STOP_SIGNALS:
        if signal.getsignal(signum) is _on_stop_signal:
            signal.signal(signum, signal.SIG_DFL)


def _on_stop_signal(signum, frame) -> None:
    """Delete the temporary files being written, then stop the process as the default would."""
    for tmp in tuple(_pending):
        with contextlib.suppress(OSError):
            os.unlink(tmp)
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def _forget_pending() -> None:
    """In a forked child: the parent's writes are not the child's to delete."""
    _pending.clear()


if hasattr(os, 'register_at_fork'):
    os.register_at_fork(after_in_child=_forget_pending)
