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
                   through shared memory (Fast DDS only; see that file). The camera driver needs
                   the same setting: launch it from here or export the variable.
  log_level        debug, info, warn or error
"""

from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction, SetEnvironmentVariable
from launch.conditions import IfCondition
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
from launch_ros.actions import Node
from launch_ros.substitutions import FindPackageShare

PACKAGE = 'taco_cvgl'


def _node(context):
    """Return the node action, with weights/database overrides only where they were given."""
    overrides = {'use_sim_time': LaunchConfiguration('use_sim_time').perform(context)
                 .strip().lower() in ('true', '1', 'yes')}
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
                                          'config/fastdds_shm.xml (large images over SHM)'),
        DeclareLaunchArgument('log_level', default_value='info',
                              description='Logging level of the node'),
    ]
    profile = SetEnvironmentVariable(
        'FASTDDS_DEFAULT_PROFILES_FILE',
        PathJoinSubstitution([share, 'config', 'fastdds_shm.xml']),
        condition=IfCondition(LaunchConfiguration('use_shm_profile')))
    return LaunchDescription(arguments + [profile, OpaqueFunction(function=_node)])
