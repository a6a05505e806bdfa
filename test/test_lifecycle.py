"""
cvgl_lifecycle_node driven through its lifecycle, the map swapped at run time, QoS overrides.

Started once for the module on a domain of their own, as test_node.py starts its nodes:
- `lc`: cvgl_lifecycle_node with a weights path that does not exist, driven from this process
  with lifecycle_msgs/srv/ChangeState as a lifecycle manager drives it;
- `q`: cvgl_node given qos_overrides parameters in a params file at start.
Weights are random (conftest.small_map), so the nodes use top_k 1 without verification: a
place's own image retrieves that place. A second map holds the same images, each tagged with
the next place's position, so which map answered shows in where the fix lands.
"""

import dataclasses
import hashlib
import signal
import subprocess
import sys
import threading
import time
import types

from diagnostic_msgs.msg import DiagnosticArray
from lifecycle_msgs.msg import State, Transition
from lifecycle_msgs.srv import ChangeState, GetState
import numpy as np
import pytest
from rcl_interfaces.srv import GetParameters, SetParameters
import rclpy
from rclpy.parameter import Parameter
from rclpy.qos import ReliabilityPolicy
from sensor_msgs.msg import NavSatFix
from std_srvs.srv import Trigger
from taco_cvgl.errors import InputError
from taco_cvgl.mapdb.database import EmbeddingDatabase
from taco_cvgl.ros.node import CVGLNode
from test_node import (assert_at, Camera, CONFIG, diagnostics_of, Listener, log_of, new_domain,
                       process_env, raw_fields, ROOT, start_node, START_TIMEOUT_S, stop,
                       with_stamp)

# Tier (README, "Tests"): node processes over real DDS.
pytestmark = pytest.mark.integration

LC, Q = 'cvgl_lc', 'cvgl_q'
QUIET_S = 1.5  # three diagnostics periods of the node: long enough to see output stop


def make_maps(small_map, root):
    """
    Return (a map of the same images one place on, a map of other weights) for load_map.

    Both from the small map's own embeddings: the first with each entry tagged with the next
    place's position, the second stamped with another model's fingerprint, as a map that other
    weights built is (building one would cost a model).
    """
    db = EmbeddingDatabase.load(small_map.db)
    shifted = dataclasses.replace(db, latitude=np.roll(db.latitude, -1),
                                  longitude=np.roll(db.longitude, -1))
    other = dataclasses.replace(db, model_fingerprint=hashlib.blake2b(
        b'other weights', digest_size=16).hexdigest())
    paths = root / 'shifted.npz', root / 'other.npz'
    for path, part in zip(paths, (shifted, other)):
        part.save(path)
    return paths


@pytest.fixture(scope='module')
def system(small_map, tmp_path_factory):
    """Start the three node processes, the camera driver and the listener; build the maps."""
    work = tmp_path_factory.mktemp('lifecycle')
    domain = new_domain()
    env = process_env(domain)
    common = ['-p', f'database:={small_map.db}', '-p', 'top_k:=1', '-p', 'rerank:=false',
              '-p', 'device:=cpu', '-p', 'diagnostics_period_s:=0.5']
    missing = work / 'missing.safetensors'
    lc_cmd = [*common, '-p', f'weights:={missing}', '-p', 'image_topics:=[/lc/image]',
              '-p', 'fix_topic:=/lc/fix', '-p', 'geopose_topic:=/lc/geopose']
    lc = start_lifecycle_node(LC, lc_cmd, env, work / 'lc.log')
    overrides = work / 'qos.yaml'
    overrides.write_text('/**:\n  ros__parameters:\n    qos_overrides:\n'
                         '      /q/a: {subscription: {reliability: reliable}}\n'
                         '      /q/fix: {publisher: {reliability: best_effort}}\n')
    q_cmd = [*common, '-p', f'weights:={small_map.weights}', '-p', 'image_topics:=[/q/a, /q/b]',
             '-p', 'camera_yaws_deg:=[0.0, 0.0]', '-p', 'fix_topic:=/q/fix',
             '-p', 'geopose_topic:=/q/geopose']
    q = start_node(Q, [*q_cmd, '--params-file', str(overrides)], env, work / 'q.log')
    camera = Camera(env, work)
    listener = Listener(domain)
    listener.listen(NavSatFix, '/lc/fix')
    listener.listen(DiagnosticArray, '/diagnostics')
    try:
        shifted, other = make_maps(small_map, work)
        listener.wait_for(lambda: listener.node.get_publishers_info_by_topic('/q/fix')
                          and lc.poll() is None and q.poll() is None, START_TIMEOUT_S,
                          'cvgl_q to start')
        yield types.SimpleNamespace(lc=lc, q=q, camera=camera, listener=listener,
                                    map=small_map, shifted=shifted, other=other,
                                    missing=missing)
    finally:
        listener.close()
        camera.proc.stdin.close()
        for proc in (camera.proc, lc, q):
            stop(proc)


def start_lifecycle_node(name, ros_args, env, log_path):
    """Start `python -m taco_cvgl.ros.lifecycle_node` as test_node.start_node starts cvgl_node."""
    cmd = [sys.executable, '-m', 'taco_cvgl.ros.lifecycle_node', '--ros-args',
           '-r', f'__node:={name}', '--params-file', str(CONFIG), '-p', "fast_path:='off'",
           *ros_args]
    with open(log_path, 'w') as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    proc.log_path = log_path
    return proc


def call(system, srv_type, name, request, timeout=START_TIMEOUT_S):
    """Call a service of a node process (a configure loads the model: a long timeout)."""
    listener = system.listener
    client = listener.node.create_client(srv_type, name)
    assert client.wait_for_service(timeout_sec=timeout), name
    future = client.call_async(request)
    listener.wait_for(future.done, timeout, f'the reply of {name}')
    listener.node.destroy_client(client)
    return future.result()


def change(system, transition: int) -> bool:
    """Ask the lifecycle node for a transition; return whether it succeeded."""
    return call(system, ChangeState, f'/{LC}/change_state',
                ChangeState.Request(transition=Transition(id=transition))).success


def state(system) -> int:
    """Return the lifecycle node's state id (lifecycle_msgs/msg/State)."""
    return call(system, GetState, f'/{LC}/get_state', GetState.Request()).current_state.id


def set_param(system, node: str, name: str, value):
    """Set one parameter of a node process; return its SetParametersResult."""
    request = SetParameters.Request(parameters=[Parameter(name, value=value).to_parameter_msg()])
    return call(system, SetParameters, f'/{node}/set_parameters', request).results[0]


def get_params(system, node: str, *names):
    """Return the values (rcl_interfaces ParameterValue) of a node's parameters."""
    return call(system, GetParameters, f'/{node}/get_parameters',
                GetParameters.Request(names=list(names))).values


def endpoints(system, topic: str, kind: str) -> list:
    """Return the lifecycle node's subscriptions or publishers on a topic, from the graph."""
    graph = system.listener.node
    found = (graph.get_subscriptions_info_by_topic(topic) if kind == 'sub'
             else graph.get_publishers_info_by_topic(topic))
    return [e for e in found if e.node_name == LC]


def settle(system, predicate, what):
    """Spin until the graph shows predicate() (discovery takes a moment)."""
    system.listener.wait_for(predicate, what=what)


def fix_of_place(system, index: int, tries: int = 10):
    """
    Show the lifecycle node place `index`'s image; return the fix stamped with it.

    Sent again (new stamps) until one arrives: a subscription made at activate may not have
    matched the camera's publisher yet.
    """
    rgb = system.map.places[index][0]
    fixes = system.listener.received['/lc/fix']
    for _ in range(tries):
        stamp, = system.camera.send(('/lc/image', raw_fields(rgb)), repeat=3)
        try:
            system.listener.wait_for(lambda: with_stamp(fixes, stamp), timeout=3.0)
        except AssertionError:
            continue
        return with_stamp(fixes, stamp)[0]
    raise AssertionError(f'no fix for place {index} after {tries} tries:\n{log_of(system.lc)}')


def test_configure_fails_cleanly_then_succeeds_after_the_fix(system):
    """A missing weights file fails configure with one line; fixed, configure loads."""
    assert state(system) == State.PRIMARY_STATE_UNCONFIGURED
    assert not change(system, Transition.TRANSITION_CONFIGURE)
    assert state(system) == State.PRIMARY_STATE_UNCONFIGURED and system.lc.poll() is None
    log = log_of(system.lc)
    assert f'error: configure failed: parameter weights: file not found: {system.missing}' in log
    assert 'Traceback' not in log
    assert not endpoints(system, '/lc/fix', 'pub')  # nothing was left half-made
    # Unconfigured, a start setting can be set; configured, it is read-only until cleanup.
    assert set_param(system, LC, 'weights', str(system.map.weights)).successful
    assert change(system, Transition.TRANSITION_CONFIGURE)
    assert state(system) == State.PRIMARY_STATE_INACTIVE
    refused = set_param(system, LC, 'weights', str(system.missing))
    assert not refused.successful and 'unconfigured' in refused.reason
    settle(system, lambda: endpoints(system, '/lc/fix', 'pub'), 'the fix publisher')
    assert not endpoints(system, '/lc/image', 'sub')  # inactive: not subscribed yet


def test_active_node_publishes_a_fix_for_an_image(system):
    """Activated, the node subscribes and localizes a place's image at that place."""
    assert change(system, Transition.TRANSITION_ACTIVATE)
    assert state(system) == State.PRIMARY_STATE_ACTIVE
    _, lat, lon = system.map.places[0]
    fix = fix_of_place(system, 0)
    assert_at(fix.latitude, fix.longitude, lat, lon)


def test_database_parameter_swaps_the_map_and_refuses_a_bad_one(system):
    """
    `database` swaps the map while localizing; a missing or mismatching map is refused.

    The shifted map tags each image with the next place's position, so a fix there names
    the next place. A refused map leaves the shifted one answering, on both nodes.
    """
    assert set_param(system, LC, 'database', str(system.shifted)).successful
    _, lat1, lon1 = system.map.places[1]
    fix = fix_of_place(system, 0)
    assert_at(fix.latitude, fix.longitude, lat1, lon1)
    missing = set_param(system, LC, 'database', '/no/such/map.npz')
    assert not missing.successful and 'file not found: /no/such/map.npz' in missing.reason
    mismatch = set_param(system, LC, 'database', str(system.other))
    assert not mismatch.successful and 'does not match the weights' in mismatch.reason
    assert get_params(system, LC, 'database')[0].string_value == str(system.shifted)
    _, lat3, lon3 = system.map.places[3]
    fix = fix_of_place(system, 2)
    assert_at(fix.latitude, fix.longitude, lat3, lon3)
    reloaded = call(system, Trigger, f'/{LC}/load_map', Trigger.Request())
    assert reloaded.success and f'{system.shifted} loaded (8 places)' in reloaded.message
    # The plain node has the same service and parameter.
    assert call(system, Trigger, f'/{Q}/load_map', Trigger.Request()).success
    refused = set_param(system, Q, 'database', str(system.other))
    assert not refused.successful and 'does not match the weights' in refused.reason


def test_deactivated_node_stops_all_output(system):
    """Deactivated: unsubscribed, no fix for an image sent, no more diagnostics."""
    assert change(system, Transition.TRANSITION_DEACTIVATE)
    assert state(system) == State.PRIMARY_STATE_INACTIVE
    settle(system, lambda: not endpoints(system, '/lc/image', 'sub'), 'the node to unsubscribe')
    listener = system.listener
    fixes, reports = (len(listener.received[t]) for t in ('/lc/fix', '/diagnostics'))
    rgb = system.map.places[4][0]
    system.camera.send(('/lc/image', raw_fields(rgb)), repeat=3)
    listener.spin_for(QUIET_S)
    assert len(listener.received['/lc/fix']) == fixes
    assert not [m for m in listener.received['/diagnostics'][reports:]
                for s in m.status if s.name == f'{LC}: localization']
    assert diagnostics_of(listener, Q) is not None  # the other node still reports


def test_cleanup_releases_then_configure_again_and_shutdown_from_active(system):
    """Cleanup releases everything; configured again it uses the map set; shutdown ends it."""
    assert change(system, Transition.TRANSITION_CLEANUP)
    assert state(system) == State.PRIMARY_STATE_UNCONFIGURED
    settle(system, lambda: not endpoints(system, '/lc/fix', 'pub'), 'the publishers to go')
    assert 'unconfigured: model and map released' in log_of(system.lc)
    assert change(system, Transition.TRANSITION_CONFIGURE)
    assert change(system, Transition.TRANSITION_ACTIVATE)
    _, lat6, lon6 = system.map.places[6]
    fix = fix_of_place(system, 5)   # the map `database` names now: the shifted one
    assert_at(fix.latitude, fix.longitude, lat6, lon6)
    assert change(system, Transition.TRANSITION_ACTIVE_SHUTDOWN)
    assert state(system) == State.PRIMARY_STATE_FINALIZED
    settle(system, lambda: not endpoints(system, '/lc/image', 'sub')
           and not endpoints(system, '/lc/fix', 'pub'), 'the node to let go of its topics')
    assert stop(system.lc, signal.SIGTERM) == 0
    log = log_of(system.lc)
    assert 'finalized (from active): nothing held' in log and 'Traceback' not in log


def test_qos_overrides_given_at_start_take_effect(system):
    """
    qos_overrides in the params file set the QoS the graph shows; the rest keep the defaults.

    /q/a's subscription is overridden to reliable, /q/b keeps qos_reliability's best_effort;
    /q/fix's publisher is overridden to best_effort, /diagnostics keeps reliable.
    """
    graph = system.listener.node
    deadline = time.monotonic() + START_TIMEOUT_S
    while len(graph.get_subscriptions_info_by_topic('/q/b')) < 1:
        assert time.monotonic() < deadline, 'cvgl_q never subscribed'
        system.listener.spin_for(0.1)

    def reliability(found):
        return {e.qos_profile.reliability for e in found if e.node_name == Q}
    assert reliability(graph.get_subscriptions_info_by_topic('/q/a')) == {
        ReliabilityPolicy.RELIABLE}
    assert reliability(graph.get_subscriptions_info_by_topic('/q/b')) == {
        ReliabilityPolicy.BEST_EFFORT}
    assert reliability(graph.get_publishers_info_by_topic('/q/fix')) == {
        ReliabilityPolicy.BEST_EFFORT}
    assert reliability(graph.get_publishers_info_by_topic('/diagnostics')) == {
        ReliabilityPolicy.RELIABLE}
    values = get_params(system, Q, 'qos_overrides./q/a.subscription.reliability',
                        'qos_overrides./q/b.subscription.reliability')
    assert [v.string_value for v in values] == ['reliable', 'best_effort']


def test_an_override_that_cannot_apply_refuses_the_start(small_map):
    """A depth override that is no number: the node refuses to start, naming the topic."""
    argv = ['cvgl_node', '--ros-args', '-p', f'weights:={small_map.weights}',
            '-p', f'database:={small_map.db}', '-p', 'rerank:=false', '-p', 'device:=cpu',
            '-p', 'qos_overrides./image.subscription.depth:=deep']
    context = rclpy.Context()
    rclpy.init(args=argv, context=context, domain_id=int(new_domain()))
    before = set(threading.enumerate())
    try:
        with pytest.raises(InputError, match='topic /image: a qos_overrides parameter cannot '
                                             'be applied'):
            CVGLNode(argv, context=context)
    finally:
        rclpy.shutdown(context=context)
    # The map loaded before the refusal (fast_path auto, int8 not cached): no int8 compiler
    # was left running in a process that refused to start.
    assert [t.name for t in set(threading.enumerate()) - before] == []
