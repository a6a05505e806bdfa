"""The command line's habits: clear names, instant --help, --version, flags as documented."""

import ast
from pathlib import Path
import re
import subprocess
import sys

import pytest
from taco_cvgl.cli import build_db, evaluate, main as cli, train
from taco_cvgl.cli.common import settings_from_args

ROOT = Path(__file__).resolve().parents[1]
# One interpreter asks every command for --help and checks, after each, that torch stayed out.
HELP_WITHOUT_TORCH = """
import contextlib, io, sys
from taco_cvgl.cli import main as cli
for command in sys.argv[1:]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            cli.main([command, '--help'])
        except SystemExit as exc:
            assert exc.code == 0, (command, exc.code)
    assert out.getvalue().startswith('usage: taco-cvgl ' + command), command
    assert 'torch' not in sys.modules, command + ' --help imported torch'
print('ok')
"""


def test_help_is_parsed_without_importing_torch():
    commands = ['build-db', 'localize', 'evaluate', 'train']
    run = subprocess.run([sys.executable, '-c', HELP_WITHOUT_TORCH, *commands],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == 'ok', run.stderr


def test_version_is_the_package_release(capsys):
    release = re.search(r'<version>\s*([^<\s]+)\s*</version>',
                        (ROOT / 'package.xml').read_text()).group(1)
    assert cli.main(['--version']) == 0
    assert capsys.readouterr().out == f'taco-cvgl {release}\n'


def test_only_clearly_named_commands_are_installed():
    tree = ast.parse((ROOT / 'setup.py').read_text())
    scripts = next(node for node in ast.walk(tree) if isinstance(node, ast.Dict)
                   and any(isinstance(k, ast.Constant) and k.value == 'console_scripts'
                           for k in node.keys))
    entries = [ast.literal_eval(v) for k, v in zip(scripts.keys, scripts.values)
               if k.value == 'console_scripts'][0]
    assert sorted(e.split('=')[0].strip() for e in entries) == [
        'cvgl_lifecycle_node', 'cvgl_node', 'taco-cvgl']


EVALUATE_BAG = ['--bag', 'b', '--gt-topic', '/gps', '--out', 'o']


def test_device_takes_cuda_n_as_the_node_does(capsys):
    assert build_db.build_parser().parse_args(
        ['--out', 'm.npz', '--weights', 'w', '--device', 'cuda:1']).device == 'cuda:1'
    args = evaluate.build_parser().parse_args(EVALUATE_BAG + ['--device', 'cuda:2'])
    assert settings_from_args(args, None, None).device == 'cuda:2'
    for parser, base in ((build_db.build_parser(), ['--out', 'm.npz', '--weights', 'w']),
                         (evaluate.build_parser(), EVALUATE_BAG)):
        with pytest.raises(SystemExit) as exc:
            parser.parse_args(base + ['--device', 'gpu0'])
        assert exc.value.code == 2
        assert "must be auto, cpu, cuda or cuda:N, got 'gpu0'" in capsys.readouterr().err


@pytest.mark.parametrize('given, meant', [('16-mixed', 'fp16'), ('bf16-mixed', 'bf16'),
                                          ('32-true', 'fp32'), ('bf16', 'bf16')])
def test_precision_takes_the_lightning_names(given, meant):
    assert build_db.build_parser().parse_args(
        ['--out', 'm.npz', '--weights', 'w', '--precision', given]).precision == meant
    args = evaluate.build_parser().parse_args(EVALUATE_BAG + ['--precision', given])
    assert settings_from_args(args, None, None).precision == meant
    assert train.build_parser().parse_args(['--precision', given]).precision == meant


def test_an_unknown_precision_lists_every_name(capsys):
    with pytest.raises(SystemExit) as exc:
        train.build_parser().parse_args(['--precision', 'fp8'])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "got 'fp8'" in err and all(n in err for n in ('fp16', '16-mixed', 'bf16-mixed'))


def test_train_takes_the_design_flag_names():
    args = train.build_parser().parse_args(
        ['--train-data-dir', 'D', '--train-triplets', 't.csv', '--val-data-dir', 'V',
         '--val-triplets', 'v.csv', '--output-dir', 'O', '--gpus', '2'])
    assert (args.train_dir, args.train_triplets, args.val_dir, args.val_triplets,
            args.out_dir, args.gpus) == ('D', 't.csv', 'V', 'v.csv', 'O', 2)
