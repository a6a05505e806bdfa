"""
Parameters the node cannot apply stop it with one line, instead of being dropped without a word.

rcl keeps one value per type for each parameter and rclpy takes the first of bool, integer,
double, string, arrays: after `--params-file config/cvgl.yaml` sets top_k to 10, `-p top_k:=ten`
(a string) or `-p top_k:=1.5` (a double) are silently lost and the node runs with 10. The node
checks what its command line gives it against the table first. Node processes show the whole
path (they stop before the model loads, in well under a second each); the rest runs on real
rclpy nodes in this process.
"""

import pytest
import rclpy
from rclpy.node import Node
from taco_cvgl.errors import InputError
from taco_cvgl.ros import params
from test_node import refused_starts
from test_params import CONFIG, own_domain  # noqa: F401 - own_domain: this module's domain

EXIT_TIMEOUT_S = 60.0


def declare_given(*ros_args, namespace=None):
    """Declare the table on a fresh node as cvgl_node does, checking the argv given to rcl."""
    argv = ['cvgl_node', '--ros-args', *ros_args]
    context = rclpy.Context()
    rclpy.init(args=argv, context=context)
    node = Node('cvgl_node', context=context, namespace=namespace)
    try:
        return params.declare(node, argv)
    finally:
        node.destroy_node()
        rclpy.shutdown(context=context)


@pytest.mark.integration
def test_node_process_refuses_what_rcl_would_drop(tmp_path):
    """Started as documented, each bad override ends the node: exit 1, one line naming it."""
    later = tmp_path / 'later.yaml'
    later.write_text('/**:\n  ros__parameters:\n    top_k: "ten"\n')
    cases = {
        'string_for_int': (['-p', 'top_k:=ten'], ['parameter top_k', 'ten', 'integer']),
        'empty_list': (['-p', 'image_topics:=[]'],
                       ['parameter image_topics', '[]', 'string array']),
        'second_file': (['--params-file', str(later)],
                        ['parameter top_k', '"ten"', f'{later}, line 3', 'integer']),
        'typo': (['-p', 'top_kk:=5'], ['parameter top_kk', 'did you mean top_k?']),
        'fix_topic': (['-p', 'fix_topic:=bad topic!'],
                      ['parameter fix_topic', "'bad topic!'", 'not a valid topic name']),
    }
    for name, (code, log) in refused_starts('cvgl_hostile', cases, tmp_path,
                                            EXIT_TIMEOUT_S).items():
        expected = cases[name][1]
        errors = [line for line in log.splitlines() if 'error: ' in line]
        assert code == 1, f'{name}: exit code {code}\n{log}'
        assert len(errors) == 1 and 'Traceback' not in log, f'{name}:\n{log}'
        for text in expected:
            assert text in errors[0], f'{name}: {text!r} not in {errors[0]!r}'


@pytest.mark.parametrize('ros_args, message', [
    # Values of another type than the file's: rcl keeps both and rclpy shows the file's.
    (['--params-file', str(CONFIG), '-p', 'top_k:=1.5'],
     r'top_k: 1.5 .* double, expected integer'),
    (['--params-file', str(CONFIG), '-p', 'rerank:=maybe'],
     r'rerank: maybe .* string, expected bool'),
    (['--params-file', str(CONFIG), '-p', 'camera_yaws_deg:=[1, 2]'],
     r'camera_yaws_deg: \[1, 2\] .* integer array, expected double array .* decimal point'),
    (['-p', 'min_confidence:=1', '-p', 'min_confidence:=0.7'],  # the integer would win
     r'min_confidence: 1 \(-p min_confidence:=1\) has type integer, expected double'),
    (['-p', 'frame_id:=123'], r'frame_id: 123 .* expected string .*quote'),
    (['-p', 'cvgl_node:top_k:=ten'], r'top_k: ten \(-p cvgl_node:top_k:=ten\)'),
    (['-p', 'rerank_candidate:=3'], r'did you mean rerank_candidates'),
    (['-p', 'zzz:=3'], r'parameter zzz .* no parameter of that name; config/cvgl.yaml lists'),
    (['-p', 'image_topics:=[/cam/image, 9bad]', '-p', 'camera_yaws_deg:=[0.0, 90.0]'],
     r"image_topics: '9bad' is not a valid topic name: .* must not start with a number"),
    (['-p', 'geopose_topic:=/a//b'], r"geopose_topic: '/a//b' .* repeated '/'"),
    (['-p', 'orientation_topic:=imu//data'],
     r"orientation_topic: 'imu//data' .* repeated '/'.*\(e\.g\. imu/data\)"),
], ids=['double_for_int', 'word_for_bool', 'ints_for_doubles', 'int_before_double',
        'number_for_string', 'node_prefix', 'typo', 'unknown', 'image_topic', 'geopose_topic',
        'orientation_topic'])
def test_bad_given_values_are_refused(ros_args, message):
    """Values rcl drops or keeps unseen, unknown names and bad topics name the parameter."""
    with pytest.raises(InputError, match=message):
        declare_given(*ros_args)


def test_params_file_sections_of_other_nodes_are_not_checked(tmp_path):
    """Only the sections that apply to this node count: another node's names are its own."""
    path = tmp_path / 'robot.yaml'
    path.write_text('other_node:\n  ros__parameters:\n    top_k: "ten"\n    gain: 2.0\n'
                    '/robot/*:\n  ros__parameters:\n    top_k: 3\n')
    assert declare_given('--params-file', str(path), namespace='/robot').top_k == 3
    bad = tmp_path / 'bad.yaml'
    bad.write_text('/robot:\n  cvgl_node:\n    ros__parameters:\n      top_k: 2.5\n')
    with pytest.raises(InputError, match=rf'top_k: 2.5 \(params file {bad}, line 4\)'):
        declare_given('--params-file', str(bad), namespace='/robot')
    assert declare_given('--params-file', str(bad)).top_k == 10  # not /robot: not this node


def test_unknown_names_in_a_shared_section_only_warn(tmp_path):
    """A robot-wide `/**` section may hold other nodes' names; this node's section may not."""
    shared = tmp_path / 'robot.yaml'
    shared.write_text('/**:\n  ros__parameters:\n    gain: 2.0\n    top_k: 4\n'
                      '    qos_overrides./cvgl/fix.publisher.depth: 5\n')
    assert declare_given('--params-file', str(shared)).top_k == 4
    own = tmp_path / 'own.yaml'
    own.write_text('cvgl_node:\n  ros__parameters:\n    gain: 2.0\n')
    with pytest.raises(InputError, match=r'parameter gain \(params file .*line 3\)'):
        declare_given('--params-file', str(own))


def test_good_values_still_apply_over_the_params_file():
    """Every way of writing a right value passes the check and reaches the node."""
    values = declare_given(
        '--params-file', str(CONFIG), '-p', 'top_k:=0x10', '-p', 'rerank:=off',
        '-p', 'min_confidence:=1e-1', '-p', 'weights:=!!str 123', '-p', 'fix_topic:=~/fix',
        '-p', 'use_sim_time:=true', '-p', 'other_node:top_k:=ten',
        '-p', 'image_topics:=[/front/image, left/image]', '-p', 'camera_yaws_deg:=[0.0, 90.0]')
    assert (values.top_k, values.rerank, values.min_confidence) == (16, False, 0.1)
    assert (values.weights, values.fix_topic) == ('123', '~/fix')
    assert values.image_topics == ('/front/image', 'left/image')


# What rcl makes of `-p name:=TEXT` (observed with the Kilted wheels; its parse.c, get_value).
RCL_TYPES = {
    'ten': 'string', '1.5': 'double', '1e3': 'double', '.inf': 'double', 'inf': 'double',
    '10': 'integer', '0x10': 'integer', '010': 'integer', '-3': 'integer', '1_000': 'string',
    'maybe': 'string', 'yes': 'bool', 'Off': 'bool', 'TRUE': 'bool', '"5"': 'string',
    '!!str 5': 'string', '[]': 'empty array', '[a, b]': 'string array', '[1, 2]':
    'integer array', '[1.0]': 'double array', '[[1]]': 'integer array', '[true]': 'bool array',
}


def test_value_types_are_rcls():
    """The check types each value as rcl does: what a real node receives agrees with it."""
    names = {f'v{i}': text for i, text in enumerate(RCL_TYPES)}
    argv = ['x', '--ros-args', *[a for n, t in names.items() for a in ('-p', f'{n}:={t}')]]
    context = rclpy.Context()
    rclpy.init(args=argv, context=context)
    node = Node('probe', context=context)
    try:
        got = {text: node._parameter_overrides[name].type_.name for name, text in names.items()}
        checked = {text: params._kind(params._compose(text)) for text in RCL_TYPES}
    finally:
        node.destroy_node()
        rclpy.shutdown(context=context)
    words = {'NOT_SET': 'empty array'}
    assert {t: words.get(k, k.lower().replace('_', ' ')) for t, k in got.items()} == RCL_TYPES
    assert checked == RCL_TYPES
