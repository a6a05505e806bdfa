"""
One settings table for every entry point: the node's params file read by the node and the CLIs.

The node side runs real rclpy (parameters declared from a `--params-file`), the CLI side parses
the same file through `taco-cvgl evaluate`'s own argument parser; both must give equal settings
and so equal localizer configurations. The defaults publish only verified fixes.
"""

import json
import subprocess
import sys

import cv2
import numpy as np
import pytest
import rclpy
from rclpy.node import Node
from taco_cvgl.cli.evaluate import build_parser
from taco_cvgl.errors import InputError
from taco_cvgl.localization import settings
from taco_cvgl.ros.params import declare

# A params file that changes settings of every kind: int, float, bool, string, arrays.
CUSTOM = """\
/**:
  ros__parameters:
    top_k: 7
    min_confidence: 0.25
    rerank: false
    index: exact
    image_topics: [/front/image, /left/image]
    camera_yaws_deg: [0.0, 90.0]
    altitude_fallback_m: 12.5
cvgl_node:
  ros__parameters:
    top_k: 4
"""


def _node_settings(params_file):
    """Return what cvgl_node's parameter declaration reads from a params file (real rclpy)."""
    context = rclpy.Context()
    rclpy.init(args=['--ros-args', '--params-file', str(params_file)], context=context)
    try:
        node = Node('cvgl_node', context=context)
        try:
            return declare(node)
        finally:
            node.destroy_node()
    finally:
        rclpy.shutdown(context=context)


def test_node_and_evaluate_read_the_shipped_params_file_alike(tmp_path):
    from test_params import CONFIG
    args = build_parser().parse_args(['--bag', 'b', '--gt-topic', '/gps', '--out', 'o',
                                      '--params-file', str(CONFIG)])
    from taco_cvgl.cli.common import settings_from_args
    cli = settings_from_args(args, None, None)
    node = _node_settings(CONFIG)
    assert cli == node == settings.NodeParams()
    assert settings.localizer_config(cli) == settings.localizer_config(node)
    assert cli.rerank is True and settings.localizer_config(cli).rerank is not None


def test_a_custom_params_file_gives_equal_settings_and_flags_override_it(tmp_path):
    from taco_cvgl.cli.common import settings_from_args
    path = tmp_path / 'custom.yaml'
    path.write_text(CUSTOM)
    node = _node_settings(path)
    base = ['--bag', 'b', '--gt-topic', '/gps', '--out', 'o', '--params-file', str(path)]
    cli = settings_from_args(build_parser().parse_args(base), None, None)
    assert cli == node
    # By hand from CUSTOM: the node's own section overrides the wildcard one.
    assert (cli.top_k, cli.min_confidence, cli.rerank, cli.index) == (4, 0.25, False, 'exact')
    assert cli.image_topics == ('/front/image', '/left/image')
    assert cli.camera_yaws_deg == (0.0, 90.0)
    config = settings.localizer_config(cli)
    assert config.rerank is None and config.top_k == 4
    assert config.estimator.altitude_fallback_m == 12.5
    flagged = settings_from_args(build_parser().parse_args(
        base + ['--top-k', '2', '--rerank', '--device', 'cpu']), 'w.safetensors', 'm.npz')
    assert (flagged.top_k, flagged.rerank, flagged.device) == (2, True, 'cpu')
    assert (flagged.weights, flagged.database) == ('w.safetensors', 'm.npz')
    assert flagged.min_confidence == 0.25                      # not given: the file's value


@pytest.mark.parametrize('text, words', [
    ('/**:\n  ros__parameters:\n    top_k: ten\n', ['parameter top_k', 'expected int']),
    ('/**:\n  ros__parameters:\n    topk: 3\n', ['unknown setting', 'topk']),
    ('other_node:\n  ros__parameters:\n    top_k: 3\n', ['no section for cvgl_node']),
    ('/**:\n  top_k: 3\n', ["no 'ros__parameters'"]),
    ('- just\n- a list\n', ['expected a mapping']),
    ('/**: [unclosed\n', ['cannot read it']),
])
def test_bad_params_files_are_one_clear_error(tmp_path, text, words):
    path = tmp_path / 'bad.yaml'
    path.write_text(text)
    with pytest.raises(InputError) as err:
        settings.settings(path)
    assert str(path) in str(err.value) or 'parameter top_k' in str(err.value)
    for word in words:
        assert word in str(err.value)


def _unrelated_place(scene, map_places, half=128):
    """Return the first valid 256x256 crop (row by row) that overlaps none of the map's places."""
    taken = [scene.latlon_to_pixel(lat, lon) for _, lat, lon in map_places]
    for row in range(half, scene.height - half, 20):
        for col in range(half, scene.width - half, 20):
            window = (slice(row - half, row + half), slice(col - half, col + half))
            if scene.valid[window].all() and all(
                    abs(col - c) >= 320 + half or abs(row - r) >= 240 + half for c, r in taken):
                return np.ascontiguousarray(scene.rgb[window])
    raise AssertionError('no unrelated place found')


def test_the_default_configuration_withholds_the_fix_for_an_unrelated_place(
        scene, small_map, tmp_path):
    query = tmp_path / 'elsewhere.png'
    cv2.imwrite(str(query), cv2.cvtColor(_unrelated_place(scene, small_map.places),
                                         cv2.COLOR_RGB2BGR))
    own = small_map.images_dir / 'place_02.png'
    run = subprocess.run([sys.executable, '-m', 'taco_cvgl.cli.main', 'localize', '--db',
                          str(small_map.db), '--weights', str(small_map.weights), '--json',
                          '--device', 'cpu', str(query), str(own)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    elsewhere, itself = [json.loads(line) for line in run.stdout.splitlines()]
    # Eight places, top_k 10: retrieval alone always names a place; verification refuses it.
    assert elsewhere['verified'] is False and elsewhere['fix'] is False
    assert itself['verified'] is True and itself['fix'] is True
    assert itself['top_k'][0]['image_id'].endswith('place_02.png')


def test_settings_written_as_a_params_file_read_back_equal(tmp_path):
    from taco_cvgl.demo.pipeline import demo_settings
    demo = demo_settings('w.safetensors', 'm.npz')
    path = tmp_path / 'demo.yaml'
    path.write_text(settings.defaults_yaml(demo))
    assert settings.settings(path) == demo == _node_settings(path)
    # By hand: the demo checks the 20 best retrieved places until the first lock, with 20
    # inliers, never the whole map.
    rerank = settings.localizer_config(demo).rerank
    assert (rerank.acquisition_candidates, rerank.acquisition_min_inliers) == (20, 20)
