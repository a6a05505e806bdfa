"""
cvgl_node's parameters on an rclpy node: the settings table of `taco_cvgl.settings`, declared.

`declare(node)` declares every setting as a read-only parameter (with a ParameterDescriptor
holding its description and range) and returns the validated `NodeParams`;
`python -m taco_cvgl.ros.params > config/cvgl.yaml` writes the table as the params file.
"""

from __future__ import annotations

import dataclasses

from taco_cvgl.errors import InputError
from taco_cvgl.settings import defaults, defaults_yaml, describe_limits  # noqa: F401
from taco_cvgl.settings import NodeParams


def descriptor(field: dataclasses.Field):
    """Return the rcl_interfaces ParameterDescriptor of one NodeParams field."""
    from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor

    meta = field.metadata
    limits = describe_limits(field)
    desc = ParameterDescriptor(name=field.name, description=meta['description'],
                               additional_constraints=limits, read_only=True)
    item = field.default[0] if isinstance(field.default, tuple) else field.default
    if meta['low'] is not None and isinstance(item, float):
        desc.floating_point_range = [FloatingPointRange(
            from_value=float(meta['low']), to_value=float(meta['high']), step=0.0)]
    elif meta['low'] is not None and isinstance(item, int) and not isinstance(item, bool):
        desc.integer_range = [IntegerRange(
            from_value=int(meta['low']), to_value=int(meta['high']), step=1)]
    return desc


def declare(node) -> NodeParams:
    """
    Declare every parameter on an rclpy node and return their validated values.

    Raises InputError naming the parameter when an override has the wrong type or is out of
    range, so the node can refuse to start with one clear line.
    """
    from rclpy.exceptions import InvalidParameterTypeException, ParameterException

    values, all_defaults = {}, defaults()
    for field in dataclasses.fields(NodeParams):
        default = all_defaults[field.name]
        try:
            value = node.declare_parameter(field.name, default, descriptor(field)).value
        except InvalidParameterTypeException as exc:
            hint = ''
            if isinstance(default, float) or (isinstance(default, list)
                                              and isinstance(default[0], float)):
                hint = ' (write floating-point values with a decimal point, e.g. 1.0, not 1)'
            raise InputError(f'parameter {field.name}: wrong type, expected the type of the '
                             f'default {default!r}{hint}: {exc}') from None
        except ParameterException as exc:
            raise InputError(f'parameter {field.name}: not allowed, it must be '
                             f'{describe_limits(field)} ({exc})') from None
        values[field.name] = tuple(value) if isinstance(default, list) else value
    return NodeParams(**values)


if __name__ == '__main__':
    print(defaults_yaml(), end='')
