"""
Start cvgl_node: camera images in, GPS fixes (NavSatFix, GeoPose) and diagnostics out.

    ros2 launch taco_cvgl cvgl.launch.py weights:=/maps/model.safetensors \
        database:=/maps/city.npz image_topic:=/camera/image_raw

Launch arguments (name:=value):
  params_file      parameters file (default: the package's config/cvgl.yaml)
  weights          model weights; overrides the params file when given
  database         embedding database; overrides the params file when given
  namespace        namespace of the node (and of its relative topics)
  image_topic      the camera topic the node's 'image' topic is remapped to (one camera; for
                   several, list them in image_topics in the params file)
  use_sim_time     true when replaying a bag with --clock
  use_shm_profile  true: set FASTDDS_DEFAULT_PROFILES_FILE to config/fastdds_shm.xml for the
                   processes this launch starts, so that full-size images cross processes
                   through shared memory (see that file). Only under Fast DDS (RMW_IMPLEMENTATION
                   unset, rmw_fastrtps_cpp or rmw_fastrtps_dynamic_cpp), and never over a
                   profile already set in the environment (taco_cvgl/ros/launch_env.py). The
                   camera driver needs the same setting: launch it from here or export it.
  log_level        debug, info, warn or error
"""

import os

from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, LogInfo, OpaqueFunction, SetEnvironmentVariable
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
from launch_ros.actions import Node
from launch_ros.substitutions import FindPackageShare
from taco_cvgl.ros.launch_env import PROFILE_VARIABLE, shm_profile

PACKAGE = 'taco_cvgl'


def _true(context, name: str) -> bool:
    """Return whether a launch argument says true."""
    return LaunchConfiguration(name).perform(context).strip().lower() in ('true', '1', 'yes')


def _profile(context):
    """Set the Fast DDS shared-memory profile where it applies (see launch_env.shm_profile)."""
    path = PathJoinSubstitution([FindPackageShare(PACKAGE), 'config', 'fastdds_shm.xml'])
    # The environment launched processes get (an including launch file may have set the
    # profile there); os.environ on launch versions without it.
    environ = getattr(context, 'environment', os.environ)
    profile, why = shm_profile(environ, _true(context, 'use_shm_profile'),
                               path.perform(context))
    actions = [LogInfo(msg=f'taco_cvgl: {why}')]
    if profile is not None:
        actions.append(SetEnvironmentVariable(PROFILE_VARIABLE, profile))
    return actions


def _node(context):
    """Return the node action, with weights/database overrides only where they were given."""
    overrides = {'use_sim_time': _true(context, 'use_sim_time')}
    for name in ('weights', 'database'):
        value = LaunchConfiguration(name).perform(context).strip()
        if value:
            overrides[name] = value
    return [Node(
        package=PACKAGE,
        executable='cvgl_node',
        name='cvgl_node',
        namespace=LaunchConfiguration('namespace'),
        # Later entries win: the command line's weights/database over the params file.
        parameters=[LaunchConfiguration('params_file'), overrides],
        remappings=[('image', LaunchConfiguration('image_topic'))],
        arguments=['--ros-args', '--log-level', LaunchConfiguration('log_level')],
        output='screen',
        emulate_tty=True,
    )]


def generate_launch_description():
    """Declare the arguments, set the Fast DDS profile, start the node."""
    share = FindPackageShare(PACKAGE)
    arguments = [
        DeclareLaunchArgument('params_file',
                              default_value=PathJoinSubstitution([share, 'config', 'cvgl.yaml']),
                              description='Parameters file of cvgl_node'),
        DeclareLaunchArgument('weights', default_value='',
                              description='Model weights (overrides the params file)'),
        DeclareLaunchArgument('database', default_value='',
                              description='Embedding database (overrides the params file)'),
        DeclareLaunchArgument('namespace', default_value='',
                              description='Namespace of the node'),
        DeclareLaunchArgument('image_topic', default_value='image',
                              description="Camera image topic the node's 'image' is remapped to"),
        DeclareLaunchArgument('use_sim_time', default_value='false',
                              description='Use the /clock topic (bag replay)'),
        DeclareLaunchArgument('use_shm_profile', default_value='true',
                              description='Set FASTDDS_DEFAULT_PROFILES_FILE to '
                                          'config/fastdds_shm.xml (large images over SHM) '
                                          'under Fast DDS, unless already set'),
        DeclareLaunchArgument('log_level', default_value='info',
                              description='Logging level of the node'),
    ]
    return LaunchDescription(arguments + [OpaqueFunction(function=_profile),
                                          OpaqueFunction(function=_node)])
