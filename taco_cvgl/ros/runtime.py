"""
Run-time changes of cvgl_node: parameters (`ros2 param set`), `~/reset_track` and the map.

A mixin of CVGLCore (taco_cvgl/ros/node.py, where the whole behaviour is described): the
parameter callback checks a change against the table and hands it to the worker, which applies
it between batches with a track reset or a new map (`_apply_pending`). A map named by the
`database` parameter, or reloaded by `~/load_map`, is loaded in the call, beside the running
one, and swapped in by the worker.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Collection

from rcl_interfaces.msg import SetParametersResult
from taco_cvgl.errors import InputError, MismatchError, TacoError
from taco_cvgl.localization.settings import localizer_config, NodeParams
from taco_cvgl.ros.params import check_topics, READ_ONLY, updated

# How the descriptor of `database` tells that a change loads a new map.
MAP_NOTE = ('changeable at run time: the node loads the new map (built with the same weights) '
            'and swaps it in between frames; a map that fails to load is refused, the old one '
            'stays')
TABLE = frozenset(field.name for field in dataclasses.fields(NodeParams))


class RuntimeChanges:
    """The services, the parameter callback and the map swap of CVGLCore (a mixin)."""

    def _create_services(self) -> None:
        """Offer ~/reset_track and ~/load_map where std_srvs is installed; else warn."""
        try:
            from std_srvs.srv import Trigger
        except ImportError:
            self.get_logger().warning(
                'std_srvs is not installed: no ~/reset_track and ~/load_map services (install '
                'ros-$ROS_DISTRO-std-srvs)')
            return
        self.create_service(Trigger, '~/reset_track', self._on_reset_track)
        self.create_service(Trigger, '~/load_map', self._on_load_map)

    def _on_reset_track(self, request, response):
        """Ask the worker to forget the motion track before its next batch."""
        with self._cond:
            if self.localizer is None:
                response.success = False
                response.message = 'no map loaded: configure the node first'
                return response
            self._reset_requested = True
            self._cond.notify()
        response.success = True
        response.message = 'motion track reset: the next verified fix starts a new one'
        return response

    def _on_load_map(self, request, response):
        """Reload the map `database` names; the worker swaps it in before its next batch."""
        with self._cond:
            path = (self._pending or self.params).database
        try:
            if self.localizer is None:
                raise InputError('no map loaded: configure the node first (it loads database)')
            candidate = self._loaded_map(path)
        except InputError as exc:
            response.success, response.message = False, str(exc)
            return response
        self._offer_map(candidate)
        response.success = True
        response.message = (f'map {path} loaded ({len(candidate.database)} places): in use '
                            f'from the next frame')
        return response

    def _loaded_map(self, path: str):
        """
        Return a localizer over the map at path, sharing the running one's model and settings.

        Raises InputError with the reason when the file is missing, is no map, or does not
        match the weights; the running localizer is not touched.
        """
        current = self.localizer
        if not Path(path).is_file():
            raise InputError(f'parameter database: file not found: {path}')
        candidate = type(current)(current.model, current.config)
        try:
            candidate.load_map(path)
        except MismatchError as exc:
            raise InputError(f'parameter database: {path} does not match the weights '
                             f'{self.params.weights}: {exc}') from None
        except TacoError as exc:
            raise InputError(f'parameter database: {exc}') from None
        except Exception as exc:  # noqa: B902 - a map that breaks the loader must not end us
            raise InputError(f'parameter database: {path} cannot be loaded: '
                             f'{type(exc).__name__}: {exc}') from None
        return candidate

    def _offer_map(self, candidate) -> None:
        """Hand a loaded map to the worker, which swaps it in before its next batch."""
        with self._cond:
            self._pending_map = candidate
            self._cond.notify()

    def _writable(self) -> Collection[str]:
        """Return the settings read at start that a change may set now: the map."""
        return ('database',)

    def _read_only_reason(self) -> str:
        """Return why a start setting cannot change now."""
        return READ_ONLY

    def _on_set_parameters(self, parameters) -> SetParametersResult:
        """
        Check a run-time change against the table; the worker applies it between batches.

        A new database is loaded here, so that a map that fails is refused with its reason.
        Without a worker (an unconfigured lifecycle node) the values are kept for configure.
        """
        if not any(parameter.name in TABLE for parameter in parameters):
            return SetParametersResult(successful=True)  # rclpy's own: qos_overrides, sim time
        with self._cond:
            base = self._pending or self.params
        try:
            new = updated(base, parameters, self._writable(), self._read_only_reason())
            check_topics(self, new)
            new_map = (self._loaded_map(new.database) if self.localizer is not None
                       and any(p.name == 'database' for p in parameters) else None)
        except InputError as exc:
            return SetParametersResult(successful=False, reason=str(exc))
        with self._cond:
            if self._worker is None:
                self.params = new
            else:
                self._pending = new
                self._pending_map = new_map or self._pending_map
            self._cond.notify()
        return SetParametersResult(successful=True)

    def _apply_pending(self) -> None:
        """
        Apply a new map, checked parameter changes and a track reset (worker, between batches).

        Under the lock, so that a change checked meanwhile builds on these values; a new map is
        warmed up first, outside it.
        """
        new_map = self._warmed_pending_map()
        with self._cond:
            swapped = new_map is not None and new_map is self._pending_map
            if swapped:
                new_map.reconfigure(self.localizer.config)  # changes applied meanwhile
                self.localizer, self._pending_map = new_map, None
            params, self._pending = self._pending, None
            reset, self._reset_requested = self._reset_requested, False
            if params is not None:
                self.localizer.reconfigure(localizer_config(params))
                changed = [f'{name}={value}' for name, value in dataclasses.asdict(params).items()
                           if value != getattr(self.params, name)]
                self.params = params
            if reset:
                self.localizer.track.reset()
        if swapped:
            self.get_logger().info(f'map swapped: {len(new_map.database)} places from '
                                   f'{self.params.database}')
        if params is not None:
            self.get_logger().info(f'parameters changed: {", ".join(changed) or "none"}')
        if reset:
            self.get_logger().info('motion track reset')

    def _warmed_pending_map(self):
        """Return the map waiting to be swapped in, warmed up (None: none, or it failed)."""
        with self._cond:
            new_map = self._pending_map
        if new_map is None:
            return None
        try:
            new_map.warm_up()   # here: the model is used by one thread only
        except Exception as exc:  # noqa: B902 - the old map stays, the node goes on
            with self._cond:
                if self._pending_map is new_map:
                    self._pending_map = None
            self.get_logger().error(f'map not swapped: its warm-up failed: '
                                    f'{type(exc).__name__}: {exc}')
            return None
        return new_map
