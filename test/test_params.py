"""
The node's parameter table: config/cvgl.yaml mirrors it, and bad values are refused by name.

These tests declare the parameters on a real rclpy node (in this process) with the overrides a
params file and `-p` arguments give; the running node's parameters are checked in test_node.py.
"""

import ast
import dataclasses
import os
from pathlib import Path
import py_compile
import random

import pytest
import rclpy
from rclpy.node import Node
from taco_cvgl.errors import InputError
from taco_cvgl.ros import params
import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / 'config' / 'cvgl.yaml'


@pytest.fixture(scope='module', autouse=True)
def own_domain():
    """Use a ROS_DOMAIN_ID of this module's own (nodes here talk to no one, but stay apart)."""
    old = os.environ.get('ROS_DOMAIN_ID')
    os.environ['ROS_DOMAIN_ID'] = str(random.SystemRandom().randint(101, 200))
    yield
    if old is None:
        os.environ.pop('ROS_DOMAIN_ID', None)
    else:
        os.environ['ROS_DOMAIN_ID'] = old


def declare_with(*ros_args):
    """Declare the table on a fresh node given --ros-args; return NodeParams or raise."""
    context = rclpy.Context()
    rclpy.init(args=['test', '--ros-args', *ros_args], context=context)
    node = Node('cvgl_node', context=context)
    try:
        return params.declare(node), node.describe_parameters(
            [f.name for f in dataclasses.fields(params.NodeParams)])
    finally:
        node.destroy_node()
        rclpy.shutdown(context=context)


def test_config_file_mirrors_the_table():
    """config/cvgl.yaml holds every parameter with the table's default, and nothing else."""
    loaded = yaml.safe_load(CONFIG.read_text())
    assert list(loaded) == ['/**']
    assert loaded['/**']['ros__parameters'] == params.defaults()
    # The file is the generated one, comments included (regenerate: python -m
    # taco_cvgl.ros.params > config/cvgl.yaml).
    assert CONFIG.read_text() == params.defaults_yaml()


def test_params_file_declares_defaults_with_descriptions_and_ranges():
    """Loaded through --params-file, every parameter gets its default and a full descriptor."""
    values, descriptors = declare_with('--params-file', str(CONFIG))
    assert values == params.NodeParams()
    by_name = {d.name: d for d in descriptors}
    for field in dataclasses.fields(params.NodeParams):
        d = by_name[field.name]
        assert len(d.description) > 20, field.name
        # Read-only exactly where the table says the running node cannot apply a change, and
        # the constraints say which.
        assert d.read_only is not field.metadata['runtime'], field.name
        assert ('restart the node' in d.additional_constraints) is d.read_only, field.name
    # What needs a reload (model, map, topics, device) is read-only; thresholds are not.
    for name in ('weights', 'database', 'device', 'fast_path', 'index', 'rerank',
                 'image_topics', 'fix_topic', 'imu_topic', 'qos_depth'):
        assert by_name[name].read_only, name
    for name in ('min_confidence', 'top_k', 'publish_no_fix', 'max_rate_hz',
                 'rerank_min_inliers', 'prior_radius_m', 'track_accel_sigma_mps2'):
        assert not by_name[name].read_only, name
    assert (by_name['top_k'].integer_range[0].from_value,
            by_name['top_k'].integer_range[0].to_value) == (1, 1000)
    assert by_name['min_confidence'].floating_point_range[0].to_value == 1.0
    assert by_name['max_rate_hz'].floating_point_range[0].from_value == 0.0
    assert 'best_effort' in by_name['qos_reliability'].additional_constraints


def test_overrides_reach_the_values():
    """-p overrides (scalars and arrays) come back typed, floats as floats."""
    values, _ = declare_with('--params-file', str(CONFIG), '-p', 'top_k:=3',
                             '-p', 'image_topics:=[front/image, left/image]',
                             '-p', 'camera_yaws_deg:=[0.0, 90.0]', '-p', 'device:=cuda:1',
                             '-p', 'publish_no_fix:=true', '-p', 'max_rate_hz:=2.5')
    assert values.top_k == 3
    assert values.image_topics == ('front/image', 'left/image')
    assert values.camera_yaws_deg == (0.0, 90.0)
    assert values.device == 'cuda:1' and values.publish_no_fix and values.max_rate_hz == 2.5


@pytest.mark.parametrize('override, named', [
    ('top_k:=0', 'top_k'),                          # below IntegerRange
    ('min_confidence:=1.5', 'min_confidence'),      # above FloatingPointRange
    ('min_confidence:=1', 'min_confidence'),        # an integer for a double
    ('top_k:=many', 'top_k'),                       # a string for an integer
    ('device:=gpu', 'device'),                      # not a device name
    ('precision:=fp8', 'precision'),                # not a choice
    ('image_transport:=theora', 'image_transport'),
    ('qos_reliability:=sometimes', 'qos_reliability'),
    ('camera_yaws_deg:=[0.0, 90.0]', 'camera_yaws_deg'),  # two yaws for one topic
    ('camera_yaws_deg:=[720.0]', 'camera_yaws_deg'),
    ('frame_id:=" "', 'frame_id'),
])
def test_bad_values_are_refused_naming_the_parameter(override, named):
    """
    A wrong type, a value out of range or a broken cross-field rule names the parameter.

    (No params file here: rcl itself ignores a `-p` string given for a parameter that a params
    file already sets to an integer.)
    """
    with pytest.raises(InputError, match=f'parameter {named}:'):
        declare_with('-p', override)


def test_validation_without_ros():
    """Check that NodeParams alone enforces the same rules (for code that builds settings)."""
    assert params.NodeParams(top_k=5, min_confidence=1).min_confidence == 1.0
    with pytest.raises(InputError, match='parameter image_topics: topics repeat'):
        params.NodeParams(image_topics=('a', 'a'), camera_yaws_deg=(0.0, 0.0))
    with pytest.raises(InputError, match='parameter image_topics: give at least one'):
        params.NodeParams(image_topics=(), camera_yaws_deg=())
    with pytest.raises(InputError, match='parameter weights: not set'):
        params.NodeParams().require_files()
    with pytest.raises(InputError, match='parameter max_rate_hz'):
        params.NodeParams(max_rate_hz=float('nan'))


def test_run_time_updates_are_checked_like_start_values():
    """A change keeps the other values; read-only, out-of-range and unsafe ones are refused."""
    from rclpy.parameter import Parameter

    base = params.NodeParams(rerank=False, top_k=3)
    new = params.updated(base, [Parameter('min_confidence', value=0.9),
                                Parameter('camera_yaws_deg', value=[45.0]),
                                Parameter('use_sim_time', value=True)])  # rclpy's own: ignored
    assert (new.min_confidence, new.camera_yaws_deg, new.top_k) == (0.9, (45.0,), 3)
    assert base.min_confidence == 0.5  # the running values are not touched
    refused = [
        (Parameter('weights', value='/other.safetensors'), 'weights: read only at start'),
        (Parameter('min_confidence', value=2.0), r'min_confidence: 2.0 is not allowed'),
        (Parameter('camera_yaws_deg', value=[0.0, 9.0]), 'camera_yaws_deg: 2 value'),
        # The motion prior needs the geometric check, which this node was started without.
        (Parameter('prior_radius_m', value=50.0), 'needs re-ranking'),
    ]
    for parameter, message in refused:
        with pytest.raises(InputError, match=message):
            params.updated(base, [parameter])


@pytest.mark.parametrize('environ, wanted, sets', [
    ({}, True, True),                                              # default RMW: Fast DDS
    ({'RMW_IMPLEMENTATION': 'rmw_fastrtps_cpp'}, True, True),
    ({'RMW_IMPLEMENTATION': 'rmw_fastrtps_dynamic_cpp'}, True, True),
    ({'RMW_IMPLEMENTATION': 'rmw_cyclonedds_cpp'}, True, False),   # another middleware
    ({'RMW_IMPLEMENTATION': 'rmw_zenoh_cpp'}, True, False),
    ({'FASTDDS_DEFAULT_PROFILES_FILE': '/robot/dds.xml'}, True, False),  # the user's own
    ({'FASTRTPS_DEFAULT_PROFILES_FILE': '/robot/dds.xml'}, True, False),  # its former name
    ({}, False, False),                                            # use_shm_profile:=false
])
def test_launch_sets_the_shm_profile_only_where_it_applies(environ, wanted, sets):
    """The launch file's decision: Fast DDS only, and never over a profile already set."""
    from taco_cvgl.ros.launch_env import shm_profile

    profile, why = shm_profile(environ, wanted, '/share/fastdds_shm.xml')
    assert profile == ('/share/fastdds_shm.xml' if sets else None)
    for value in environ.values() if not sets else ():
        assert value in why  # the log line names what kept the profile out


LAUNCH = ROOT / 'launch' / 'cvgl.launch.py'


def launch_calls(name):
    """Return the calls of `name(...)` in the launch file (launch itself is not installable)."""
    tree = ast.parse(LAUNCH.read_text())
    return [n for n in ast.walk(tree) if isinstance(n, ast.Call)
            and getattr(n.func, 'id', getattr(n.func, 'attr', None)) == name]


def test_launch_file_compiles_and_agrees_with_the_package(tmp_path):
    """The launch file compiles, declares its arguments and names files and params that exist."""
    py_compile.compile(str(LAUNCH), doraise=True, cfile=str(tmp_path / 'launch.pyc'))
    declared = {c.args[0].value for c in launch_calls('DeclareLaunchArgument')}
    assert {'params_file', 'weights', 'database', 'namespace', 'image_topic', 'use_sim_time',
            'use_shm_profile', 'log_level'} <= declared
    used = {c.args[0].value for c in launch_calls('LaunchConfiguration')
            if isinstance(c.args[0], ast.Constant)}
    assert used <= declared, f'launch arguments used but not declared: {used - declared}'
    # Files it joins onto the package share exist in config/ (setup.py installs config/*).
    joined = [[e.value for e in c.args[0].elts if isinstance(e, ast.Constant)]
              for c in launch_calls('PathJoinSubstitution')]
    assert ['config', 'cvgl.yaml'] in joined and ['config', 'fastdds_shm.xml'] in joined
    for parts in joined:
        assert ROOT.joinpath(*parts).is_file(), parts
    # The executable is the console script setup.py installs; the overrides are parameters.
    node = launch_calls('Node')[0]
    keywords = {k.arg: k.value for k in node.keywords}
    assert keywords['executable'].value == 'cvgl_node'
    assert "'cvgl_node = taco_cvgl.ros.node:main'" in (ROOT / 'setup.py').read_text()
    for name in ('weights', 'database', 'image'):
        assert name in LAUNCH.read_text()
    assert {'weights', 'database'} <= set(params.defaults())
    assert params.defaults()['image_topics'] == ['image']  # what image_topic remaps
