"""
cvgl_lifecycle_node: cvgl_node as a managed (lifecycle) node, for a launch that orders its nodes.

The same node (taco_cvgl.ros.node.CVGLCore: parameters, frames, worker, outputs, diagnostics,
~/reset_track and ~/load_map), started in the unconfigured state with its parameters declared:
- configure: checks the topics, loads weights and map, creates the (lifecycle) publishers and
  starts the worker. A bad setting or file fails the transition with one logged line
  (`error: parameter weights: file not found: ...`); the node stays unconfigured and running,
  so the parameter can be fixed and configure tried again;
- activate: subscribes to the cameras (and orientation_topic), enables the publishers and
  starts /diagnostics;
- deactivate: unsubscribes, forgets frames not yet taken, stops /diagnostics; a batch in flight
  finishes but its fix is not published;
- cleanup: stops the worker and releases the model and the map (back to unconfigured);
- shutdown, from any of those states: releases whatever is held; the node is finalized and the
  process ends on SIGINT/SIGTERM as any node does.

While unconfigured, every setting read at start (weights, database, device, topics, QoS...)
can be set (`ros2 param set`), checked as at start; once configured they are read-only until
cleanup, except `database`, which swaps the map as in cvgl_node. A value the table refuses
(unknown name, wrong type, out of range) still refuses the start with one line, as in
cvgl_node. An error during a transition that the node cannot name (a bug) fails it too, logged
with its type.

Run: ros2 run taco_cvgl cvgl_lifecycle_node --ros-args --params-file config/cvgl.yaml
-p weights:=W -p database:=D, then `ros2 lifecycle set /cvgl_node configure` and `activate`
(or python -m taco_cvgl.ros.lifecycle_node ...).
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Callable, Collection, List, Optional

from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from taco_cvgl.errors import TacoError
from taco_cvgl.localization.settings import NodeParams
from taco_cvgl.ros.node import command_line, CVGLCore, MAP_NOTE, NODE_NAME, run

CONFIGURE_NOTE = 'read at configure: changeable while the node is unconfigured'
CONFIGURED = 'read at configure: clean the node up (unconfigured) to change it'
# Settings read at start: changeable while unconfigured (the map always).
START_SETTINGS = {field.name: MAP_NOTE if field.name == 'database' else CONFIGURE_NOTE
                  for field in dataclasses.fields(NodeParams) if not field.metadata['runtime']}


class CVGLLifecycleNode(CVGLCore, LifecycleNode):
    """cvgl_node with the lifecycle of a managed node: loads at configure, works when active."""

    def __init__(self, argv: Optional[List[str]] = None, **kwargs):
        """Declare the parameters and offer the services; the node starts unconfigured."""
        super().__init__(NODE_NAME, **kwargs)
        try:
            self._init_core(command_line(argv, kwargs), START_SETTINGS)
        except BaseException:
            self.destroy_node()  # as CVGLNode: never leave a half-built node to the collector
            raise
        self.get_logger().info('unconfigured: configure loads the weights and the map')

    def _writable(self) -> Collection[str]:
        """Return the start settings a change may set: all of them while unconfigured."""
        return START_SETTINGS if self.localizer is None else ('database',)

    def _read_only_reason(self) -> str:
        """Return why a start setting cannot change now (the node is configured)."""
        return CONFIGURED

    def _transition(self, name: str, step, state: LifecycleState,
                    done: Callable[[], str]) -> TransitionCallbackReturn:
        """
        Run a transition's step, then the lifecycle publishers' part; log done() on success.

        An error fails the transition with one logged line (step undoes its own part).
        """
        try:
            step()
        except Exception as exc:  # noqa: B902 - a transition fails, the node lives on
            reason = str(exc) if isinstance(exc, TacoError) else f'{type(exc).__name__}: {exc}'
            self.get_logger().error(f'error: {name} failed: {reason}')
            return TransitionCallbackReturn.FAILURE
        result = getattr(super(), f'on_{name}')(state)
        if result == TransitionCallbackReturn.SUCCESS:
            self.get_logger().info(done())
        return result

    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Load weights and map, create the publishers, start the worker."""
        return self._transition('configure', self._configure, state,
                                lambda: self._ready_line('configured'))

    def _configure(self) -> None:
        """Load, open the outputs, start the worker; on an error undo what was done."""
        try:
            self._load()
            self._open_outputs(self.create_lifecycle_publisher)
        except BaseException:
            self._unload()
            raise
        self._start_worker()

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Subscribe to the cameras and start the diagnostics; the publishers are enabled."""
        def activate():
            try:
                self._start_receiving()
            except BaseException:
                self._stop_receiving()
                raise
        return self._transition('activate', activate, state,
                                lambda: f'active: localizing {self._topics}')

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Unsubscribe and stop the diagnostics; the publishers are disabled."""
        return self._transition('deactivate', self._stop_receiving, state,
                                lambda: 'inactive: not subscribed')

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Stop the worker, destroy the publishers, release model and map."""
        return self._transition('cleanup', self._unload, state,
                                lambda: 'unconfigured: model and map released')

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Release whatever the node holds in the state it leaves."""
        return self._transition('shutdown', self._unload_all, state,
                                lambda: f'finalized (from {state.label}): nothing held')

    def on_error(self, state: LifecycleState) -> TransitionCallbackReturn:
        """After an error the node holds nothing: back to unconfigured."""
        self._unload_all()
        return super().on_error(state)

    def _unload(self) -> None:
        """Stop the worker, destroy the publishers, release the localizer."""
        self.stop()
        self._close_outputs(self.destroy_lifecycle_publisher)
        self._release()

    def _unload_all(self) -> None:
        """Undo activate and configure, as far as they were done."""
        self._stop_receiving()
        self._unload()


def main(args=None) -> int:
    """Run cvgl_lifecycle_node (see taco_cvgl.ros.node.run)."""
    return run(CVGLLifecycleNode, NODE_NAME, args)


if __name__ == '__main__':
    sys.exit(main())
