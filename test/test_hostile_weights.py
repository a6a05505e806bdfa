"""
Careless and hostile weights and checkpoints: one clear error naming the file, never a traceback.

Also: a write that is interrupted (an exception, SIGTERM, SIGKILL) leaves no temporary file and
the old file intact, checkpoints included.
"""

import json
import os
from pathlib import Path
import random
import signal
import struct
import subprocess
import sys
import tempfile
import zipfile

import pytest
from safetensors import safe_open
from taco_cvgl.errors import InputError, MismatchError, TacoError
from taco_cvgl.files.atomic import atomic_path
from taco_cvgl.model.config import ModelConfig
from taco_cvgl.model.embedder import ImageRetrievalModel
import torch

CONFIG = ModelConfig(input_size=(64, 64))


def _checkpoint_dict(state, config_json):
    """Return what `taco-cvgl train` saves, as far as the loader reads it."""
    return {'state_dict': {f'model.{k}': v for k, v in state.items()},
            'hyper_parameters': {'model_config': config_json}}


@pytest.fixture(scope='module')
def checkpoint(small_map, tmp_path_factory):
    """Save the small map's model as a .ckpt file holding the fp16 tensors of its weights."""
    with safe_open(str(small_map.weights), framework='pt') as handle:
        state = {k: handle.get_tensor(k) for k in handle.keys()}
        fingerprint = handle.metadata()['fingerprint']
    path = tmp_path_factory.mktemp('ckpt') / 'model.ckpt'
    torch.save(_checkpoint_dict(state, CONFIG.to_json()), path)
    return path, fingerprint


def _load_error(path, kind=InputError):
    """Load path expecting `kind`; return its message, which must be one line naming the file."""
    with pytest.raises(kind) as info:
        ImageRetrievalModel.load(path, 'cpu', 'fp32')
    message = str(info.value)
    assert str(path) in message and '\n' not in message, message
    return message


# ----------------------------------------------------------------------------- careless files
@pytest.mark.parametrize('content, says', [
    ([1, 2], 'needs a state_dict'),
    ({'hyper_parameters': {'model_config': CONFIG.to_json()}}, 'needs a state_dict'),
    ({'state_dict': {}, 'hyper_parameters': 7}, 'model_config'),
    ({'state_dict': {}, 'hyper_parameters': {'model_config': 5}}, 'JSON text, not int'),
    ({'state_dict': {}, 'hyper_parameters': {'model_config': '[1, 2]'}}, 'mapping'),
    ({'state_dict': {'model.x': 'text'}, 'hyper_parameters': {'model_config': CONFIG.to_json()}},
     "'model.x' is a str"),
])
def test_checkpoints_of_the_wrong_structure(tmp_path, content, says):
    path = tmp_path / 'odd.ckpt'
    torch.save(content, path)
    assert says in _load_error(path)


class Payload:
    """A pickle that would delete a file when unpickled, were the loader to run pickle."""

    def __init__(self, victim):
        self.victim = str(victim)

    def __reduce__(self):
        return os.remove, (self.victim,)


def test_a_pickle_that_runs_code_is_refused_without_running_it(tmp_path):
    victim = tmp_path / 'victim.txt'
    victim.write_text('still here')
    path = tmp_path / 'payload.ckpt'
    torch.save({'state_dict': Payload(victim), 'hyper_parameters': {}}, path)
    _load_error(path)
    assert victim.read_text() == 'still here'


def test_files_named_for_the_other_format_load_by_content(small_map, checkpoint, tmp_path):
    ckpt, fingerprint = checkpoint
    as_ckpt = tmp_path / 'weights.ckpt'
    as_ckpt.write_bytes(small_map.weights.read_bytes())
    as_safetensors = tmp_path / 'model.safetensors'
    as_safetensors.write_bytes(ckpt.read_bytes())
    # Both hold the same fp16 tensors: the same model, whichever name each file has.
    assert ImageRetrievalModel.load(as_ckpt, 'cpu', 'fp32').fingerprint() == fingerprint
    assert ImageRetrievalModel.load(as_safetensors, 'cpu', 'fp32').fingerprint() == fingerprint
    text = tmp_path / 'notes.safetensors'
    text.write_text('not weights at all')
    assert 'neither' in _load_error(text)


def test_truncated_files_of_both_kinds(small_map, checkpoint, tmp_path):
    for source in (small_map.weights, checkpoint[0]):
        data = source.read_bytes()
        for size in (0, 5, 9, len(data) // 2, len(data) - 1):
            cut = tmp_path / f'cut{size}{source.suffix}'
            cut.write_bytes(data[:size])
            _load_error(cut)
            cut.unlink()


# ----------------------------------------------------------------------------- hostile files
def test_a_config_asking_for_a_huge_model_is_refused_before_building_it(small_map, checkpoint,
                                                                        tmp_path):
    with safe_open(str(small_map.weights), framework='pt') as handle:
        state = {k: handle.get_tensor(k) for k in handle.keys()}
    huge = {**CONFIG.to_dict(), 'embedding_dim': 10 ** 9}     # a 3 TB head
    path = tmp_path / 'huge.ckpt'
    torch.save(_checkpoint_dict(state, json.dumps(huge)), path)
    assert 'embedding_dim 1000000000' in _load_error(path)
    # Within the bounds but not what the file holds: refused on the shapes, before building.
    wide = {**CONFIG.to_dict(), 'embedding_dim': 16384, 'head_hidden_dim': 16384}
    torch.save(_checkpoint_dict(state, json.dumps(wide)), path)
    assert 'head.0.bias has shape [768], the config makes [16384]' in \
        _load_error(path, MismatchError)


def test_declared_sizes_beyond_the_file_are_refused(tmp_path):
    # safetensors: a header declaring a 3 GB tensor over 16 bytes of data.
    header = json.dumps({'__metadata__': {'config': CONFIG.to_json()},
                         'w': {'dtype': 'F32', 'shape': [10 ** 6, 768],
                               'data_offsets': [0, 16]}}).encode()
    path = tmp_path / 'liar.safetensors'
    path.write_bytes(struct.pack('<Q', len(header)) + header + bytes(16))
    _load_error(path)
    # A checkpoint whose zip member inflates to 50 MB from a file of a few KB: not inflated.
    bomb = tmp_path / 'bomb.ckpt'
    with zipfile.ZipFile(bomb, 'w', compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr('archive/data.pkl', bytes(50_000_000))
    assert 'declares 50000000 bytes' in _load_error(bomb)


def test_model_config_ranges_and_types_name_the_field():
    for field, value in (('embedding_dim', 10 ** 9), ('head_hidden_dim', 0),
                         ('embedding_dim', '512'), ('embedding_dim', True),
                         ('input_size', (64, 10 ** 6)), ('input_size', 64),
                         ('std', (0.2, 0.0, 0.2)), ('mean', (0.5, float('nan'), 0.5)),
                         ('gem_p', float('inf')), ('dropout', 1.0)):
        with pytest.raises(InputError, match=f'model config: {field}'):
            ModelConfig(**{field: value})
    for text in ('5', '[' * 100_000, '{"embedding_dim": 512, "input_size": {}}'):
        with pytest.raises(InputError, match='model config'):
            ModelConfig.from_json(text)


def test_fuzzed_files_load_or_raise_a_taco_error(small_map, checkpoint, tmp_path):
    """Truncations and bit flips of both formats, aimed at the parsed parts; fixed seed."""
    rng = random.Random(0)
    outcomes = {}
    for source in (small_map.weights, checkpoint[0]):
        data = source.read_bytes()
        for n in range(15):
            variant = bytearray(data)
            if n < 6:
                del variant[rng.randrange(len(data)):]
            else:
                variant[rng.choice(_structure(source, data))] ^= 1 << rng.randrange(8)
            path = tmp_path / f'variant{source.suffix}'
            path.write_bytes(variant)
            try:
                ImageRetrievalModel.load(path, 'cpu', 'fp32')
                outcome = 'loaded'
            except TacoError as exc:
                outcome = type(exc).__name__
            assert n >= 6 or outcome == 'InputError', f'a truncation {outcome}'
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
    assert outcomes.get('InputError', 0) >= 12, outcomes


def _structure(path: Path, data: bytes) -> range:
    """Return the byte positions a parser reads: safetensors' header, a zip's directories."""
    if path.suffix == '.safetensors':
        return range(8 + struct.unpack('<Q', data[:8])[0])
    with zipfile.ZipFile(path) as archive:
        members = archive.infolist()
    first_data = min(m.header_offset for m in members if '/data/' in m.filename)
    tail = len(data) - 4096 * 4
    return list(range(first_data)) + list(range(tail, len(data)))


# ----------------------------------------------------------------------------- the commands
def test_a_bad_weights_file_is_one_line_from_build_db(small_map, checkpoint, tmp_path, capsys):
    from taco_cvgl.cli.build_db import main
    cut = tmp_path / 'cut.ckpt'
    cut.write_bytes(checkpoint[0].read_bytes()[:100_000])
    out = tmp_path / 'map.npz'
    assert main(['--images', str(small_map.images_dir), '--csv', str(small_map.csv),
                 '--weights', str(cut), '--out', str(out), '--device', 'cpu',
                 '--no-progress']) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith('taco-cvgl: error: ') and '\n' not in err and str(cut) in err, err
    assert not out.exists()


def test_resume_from_a_truncated_last_checkpoint_is_refused_untouched(checkpoint, tmp_path,
                                                                      capsys):
    from taco_cvgl.cli.train import main
    out = tmp_path / 'run'
    (out / 'checkpoints').mkdir(parents=True)
    # What these options make: the defaults at 64 px.
    model_json = ModelConfig(input_size=(64, 64)).to_json()
    (out / 'run.json').write_text(json.dumps({'model_config': model_json}))
    last = out / 'checkpoints' / 'last.ckpt'
    last.write_bytes(checkpoint[0].read_bytes()[:200_000])
    before = {p: p.read_bytes() for p in out.rglob('*') if p.is_file()}
    argv = ['--out', str(out), '--train-dir', str(tmp_path), '--train-csv', 'places.csv',
            '--input-size', '64', '--backbone-weights', 'none', '--accelerator', 'cpu',
            '--resume']
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith('taco-cvgl: error: cannot resume') and str(last) in err, err
    assert '\n' not in err and 'move last.ckpt out of' in err
    # A checkpoint of weights alone (no optimiser state) cannot resume a run either.
    torch.save(_checkpoint_dict({}, model_json), last)
    before[last] = last.read_bytes()
    assert main(argv) == 2
    assert 'optimizer_states' in capsys.readouterr().err
    assert {p: p.read_bytes() for p in out.rglob('*') if p.is_file()} == before


# ----------------------------------------------------------------------------- interrupted
CHILD = """
import os, signal, sys
from taco_cvgl.cli.common import reports_errors
from taco_cvgl.files.atomic import atomic_path
signum = getattr(signal, sys.argv[2])
if signum != signal.SIGKILL:   # Python's own defaults, whatever the parent left (nohup, &)
    signal.signal(signum, signal.default_int_handler if sys.argv[2] == 'SIGINT'
                  else signal.SIG_DFL)


@reports_errors
def main(argv):
    with atomic_path(sys.argv[1]) as tmp:
        with open(tmp, 'wb') as handle:
            handle.write(b'partial')
            handle.flush()
            os.kill(os.getpid(), signum)
        raise SystemExit('the signal did not stop the write')


sys.exit(main(None))
"""


def _write_killed(target: Path, signame: str) -> int:
    """Run a torch-free command writing target that signals itself mid-write; return its status."""
    return subprocess.run([sys.executable, '-c', CHILD, str(target), signame],
                          capture_output=True, timeout=60).returncode


@pytest.mark.parametrize('signame, status', [('SIGTERM', 128 + 15), ('SIGHUP', 128 + 1),
                                             ('SIGINT', 130)])
def test_a_command_stopped_mid_write_removes_the_temporary_file(tmp_path, signame, status):
    target = tmp_path / 'map.npz'
    target.write_bytes(b'old')
    # The command stops with the shell's status for the signal, after removing its temp file.
    assert _write_killed(target, signame) == status
    assert sorted(p.name for p in tmp_path.iterdir()) == ['map.npz']
    assert target.read_bytes() == b'old'


def test_a_killed_writers_file_is_removed_by_the_next_write(tmp_path):
    target = tmp_path / 'map.npz'
    target.write_bytes(b'old')
    assert _write_killed(target, 'SIGKILL') == -signal.SIGKILL   # no chance to clean up
    left = [p.name for p in tmp_path.iterdir() if p.name != 'map.npz']
    assert len(left) == 1 and left[0].startswith('.map.npz.tmp'), left
    alive = tmp_path / f'.map.npz.tmp{os.getppid()}'     # a running writer's: kept
    alive.write_bytes(b'in progress')
    with atomic_path(target) as tmp:
        tmp.write_bytes(b'new')
    assert sorted(p.name for p in tmp_path.iterdir()) == [alive.name, 'map.npz']
    assert target.read_bytes() == b'new'


def test_signal_handlers_are_left_as_they_were(tmp_path):
    """A write never replaces a handler (rclpy's live in C); a command puts its own back."""
    from taco_cvgl.cli.common import reports_errors
    previous = signal.getsignal(signal.SIGTERM)
    try:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        with atomic_path(tmp_path / 'out.txt') as tmp:
            assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
            tmp.write_text('complete')
        seen = []
        reports_errors(lambda argv: seen.append(signal.getsignal(signal.SIGTERM)))()
        assert seen and seen[0] != signal.SIG_DFL
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_checkpoints_are_written_beside_their_target(tmp_path, monkeypatch):
    from taco_cvgl.training.module import AtomicCheckpointIO
    system_tmp = tmp_path / 'system-tmp'
    system_tmp.mkdir()
    monkeypatch.setattr(tempfile, 'tempdir', str(system_tmp))
    folder = tmp_path / 'checkpoints'
    folder.mkdir()
    (folder / 'last.ckpt').write_bytes(b'old')
    seen = []

    class Interrupt:
        """Pickled while the checkpoint is being written: look around, then fail."""

        def __reduce__(self):
            seen.append(sorted(os.listdir(folder)) + sorted(os.listdir(system_tmp)))
            raise RuntimeError('interrupted')

    with pytest.raises(RuntimeError, match='interrupted'):
        AtomicCheckpointIO().save_checkpoint({'epoch': 1, 'x': Interrupt()},
                                             folder / 'last.ckpt')
    assert seen == [[f'.last.ckpt.tmp{os.getpid()}', 'last.ckpt']]
    assert os.listdir(folder) == ['last.ckpt'] and not os.listdir(system_tmp)
    assert (folder / 'last.ckpt').read_bytes() == b'old'
    AtomicCheckpointIO().save_checkpoint({'epoch': 2}, folder / 'last.ckpt')
    assert torch.load(folder / 'last.ckpt', weights_only=True) == {'epoch': 2}
