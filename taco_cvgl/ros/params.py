"""
cvgl_node's parameters on an rclpy node: the table of `localization.settings`, declared.

`declare(node, argv)` declares every setting as a parameter (with a ParameterDescriptor holding
its description and range) and returns the validated `NodeParams`; the settings the table marks
`runtime` can be changed with `ros2 param set` (`updated` validates the change), the others are
read-only. `python -m taco_cvgl.ros.params > config/cvgl.yaml` writes the table as the params
file.

Before declaring, every value the command line gives the node (`-p name:=value`, the sections of
each `--params-file` that apply to it) is checked against the table by name and type. rcl keeps
one value per type and rclpy takes the first of bool, integer, double, string, arrays, so an
override whose type differs from a value set before it (`--params-file config/cvgl.yaml -p
top_k:=ten`) would be dropped without a word; rcl's own typing of YAML scalars is mirrored here
(rcl_yaml_param_parser, parse.c, get_value).
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from typing import Collection, Iterator, Mapping, Optional, Sequence, Tuple

from taco_cvgl.errors import InputError
from taco_cvgl.localization.settings import defaults, defaults_yaml, describe_limits  # noqa: F401
from taco_cvgl.localization.settings import NodeParams, RUNTIME_NOTE
import yaml

_BOOL_WORDS = {word for stem in ('y', 'yes', 'true', 'on', 'n', 'no', 'false', 'off')
               for word in (stem, stem.capitalize(), stem.upper())}
_INT = re.compile(r'[+-]?(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)')  # strtoll, base 0
_DOUBLE = re.compile(r'[+-]?((\d+\.?\d*|\.\d+)([eE][+-]?\d+)?|inf(inity)?|nan|\.inf|\.nan)',
                     re.IGNORECASE)                                   # strtod and YAML's .inf
_STR_TAG = 'tag:yaml.org,2002:str'
_KINDS = {bool: 'bool', int: 'integer', float: 'double', str: 'string'}
# ROS arguments followed by a value (rcl/src/rcl/arguments.c); the others are flags.
_WITH_VALUE = {'-p', '--param', '--params-file', '-r', '--remap', '-e', '--enclave',
               '--log-level', '--log-file-name', '--log-config-file'}
_FLOAT_HINT = ' (write floating-point values with a decimal point, e.g. 1.0, not 1)'
# parameter name, its YAML value, where it was given, whether a section shared with other nodes
# (`/**`, `/ns/*`) gave it: an unknown name there belongs to another node and only warns
Given = Tuple[str, yaml.Node, str, bool]
STANDARD_PREFIXES = ('qos_overrides.',)  # rclpy's own parameter families
READ_ONLY = 'read only at start: restart the node to change it'


class _RawLoader(yaml.SafeLoader):
    """Compose YAML without typing plain scalars: rcl types them its own way (see _kind)."""

    def resolve(self, kind, value, implicit):
        """Leave untagged nodes untagged (explicit tags such as !!str are kept)."""
        return None


def _compose(text: str):
    """Return the YAML node tree of text (None when empty)."""
    return yaml.compose(text, Loader=_RawLoader)


def _kind(node: yaml.Node) -> str:
    """Return the ROS parameter type rcl gives a YAML value: bool, integer, string array..."""
    if isinstance(node, yaml.MappingNode):
        return 'mapping'
    if isinstance(node, yaml.SequenceNode):  # nested lists flatten, as in rcl
        kinds = {_kind(item).removesuffix(' array') for item in node.value}
        if not kinds:
            return 'empty array'
        return kinds.pop() + ' array' if len(kinds) == 1 else 'mixed array'
    if node.tag == _STR_TAG or node.style in ('"', "'"):
        return 'string'
    if node.value in _BOOL_WORDS:
        return 'bool'
    if _INT.fullmatch(node.value):
        return 'integer'
    return 'double' if _DOUBLE.fullmatch(node.value) else 'string'


def _expected_kind(default) -> str:
    """Return the ROS parameter type of a table default."""
    if isinstance(default, tuple):
        return _KINDS[type(default[0])] + ' array'
    return _KINDS[type(default)]


def _source(node: yaml.Node) -> str:
    """Return a YAML value as it was written."""
    start, end = node.start_mark, node.end_mark
    return start.buffer[start.index:end.index]


def _matches(pattern: str, fqn: str) -> bool:
    """Tell whether a params file's node key (`/**`, `/ns/*`, `cvgl_node`) names this node."""
    regex = ''.join('(/[^/]+)*' if token == '**' else '/[^/]+' if token == '*'
                    else '/' + re.escape(token) for token in pattern.strip('/').split('/'))
    return re.fullmatch(regex, fqn) is not None


def _from_rule(rule: str, node_name: str) -> Iterator[Given]:
    """Yield the value of a `-p [node:]name:=value` rule that applies to this node."""
    left, sep, text = rule.partition(':=')
    prefix, _, name = left.rpartition(':')
    if sep and prefix in ('', node_name):
        try:
            value = _compose(text)
        except yaml.YAMLError:  # rcl took it at init; nothing to judge it by here
            return
        if value is not None:
            yield name, value, f'-p {rule}', False


def _from_tree(node, key: str, fqn: str, where: str) -> Iterator[Given]:
    """Yield the parameters of the `ros__parameters` blocks under key that apply to fqn."""
    if not isinstance(node, yaml.MappingNode):
        return
    for key_node, value in node.value:
        if key_node.value == 'ros__parameters':
            if _matches(key, fqn):
                yield from _parameters(value, '', where, '*' in key)
        else:
            yield from _from_tree(value, key.rstrip('/') + '/' + key_node.value.lstrip('/'),
                                  fqn, where)


def _parameters(node, prefix: str, where: str, shared: bool) -> Iterator[Given]:
    """Yield a `ros__parameters` block's values, nested names joined with dots as rcl does."""
    if not isinstance(node, yaml.MappingNode):
        return
    for key_node, value in node.value:
        name = prefix + key_node.value
        if isinstance(value, yaml.MappingNode):
            yield from _parameters(value, name + '.', where, shared)
        else:
            yield name, value, f'params file {where}, line {value.start_mark.line + 1}', shared


def _from_file(path: str, fqn: str) -> Iterator[Given]:
    """Yield the values a params file gives the node (rcl has read it already at init)."""
    try:
        with open(path, encoding='utf-8') as handle:
            tree = _compose(handle.read())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return
    yield from _from_tree(tree, '', fqn, path)


def split_ros_args(argv: list) -> tuple:
    """
    Split argv into (our arguments, ROS arguments: each --ros-args ... [--] section).

    Only the --ros-args sections go to rclpy, so that our --remap FROM:=TO values are not taken
    for (deprecated) bare ROS remapping rules.
    """
    own, ros, in_ros = [], [], False
    for arg in argv:
        if arg == '--ros-args':
            in_ros = True
            ros.append(arg)
        elif in_ros and arg == '--':
            in_ros = False
            ros.append(arg)
        else:
            (ros if in_ros else own).append(arg)
    return own, ros


def given_values(node, argv: Sequence[str]) -> Iterator[Given]:
    """Yield (name, value, where) of every parameter value argv's ROS arguments give the node."""
    items = iter(split_ros_args(list(argv))[1])
    for flag in items:
        if flag in _WITH_VALUE:
            value = next(items, '')
            if flag in ('-p', '--param'):
                yield from _from_rule(value, node.get_name())
            elif flag == '--params-file':
                yield from _from_file(value, node.get_fully_qualified_name())


def _hint(default, got: str) -> str:
    """Return advice on giving a value of the type of `default` instead of one of type `got`."""
    expected = _expected_kind(default)
    if got == 'empty array':
        return ' (ROS cannot tell the type of an empty list: give at least one item)'
    if expected.startswith('double') and got.startswith('integer'):
        return _FLOAT_HINT
    return ' (quote a value meant as text)' if expected == 'string' else ''


def _unknown(node, name: str, where: str, known, shared: bool = False) -> None:
    """
    Refuse a name neither in the table nor declared by rclpy itself; only warn when shared.

    A robot-wide params file's `/**` section may hold other nodes' settings, so a name there
    that this node lacks is reported, not fatal; a `-p` rule or a section naming this node is.
    """
    if node.has_parameter(name) or name.startswith(STANDARD_PREFIXES):
        return
    close = difflib.get_close_matches(name, known, n=3)
    hint = (f'did you mean {" or ".join(close)}?' if close
            else 'config/cvgl.yaml lists them all')
    message = f'parameter {name} ({where}): {node.get_name()} has no parameter of that name'
    if shared:
        node.get_logger().warning(f'{message}, ignored ({hint})')
        return
    raise InputError(f'{message}; {hint}')


def check_given(node, given) -> None:
    """
    Raise InputError on the first given value of an unknown name or of the wrong type.

    Run before declaring the table: names rclpy declared itself count as known.
    """
    fields = {field.name: field for field in dataclasses.fields(NodeParams)}
    seen = set()
    for name, value, where, shared in given:
        seen.add(name)
        field = fields.get(name)
        if field is None:
            _unknown(node, name, where, fields, shared)
            continue
        expected, got = _expected_kind(field.default), _kind(value)
        if got != expected:
            raise InputError(
                f'parameter {name}: {_source(value)} ({where}) has type {got}, expected '
                f'{expected} like the default {defaults()[name]!r}{_hint(field.default, got)}')
    for name in node._parameter_overrides:  # rcl's view: also overrides given in code
        if name not in fields and name not in seen:
            _unknown(node, name, 'an override', fields)


def check_topics(node, params: NodeParams) -> None:
    """Raise InputError naming the parameter of a topic name that does not resolve."""
    from rclpy.impl.implementation_singleton import rclpy_implementation as _rclpy

    # Examples for the topics that are off by default.
    examples = {'imu_topic': 'cvgl/heading', 'orientation_topic': 'imu/data'}
    for name in ('image_topics', 'fix_topic', 'geopose_topic', 'imu_topic', 'orientation_topic'):
        value = getattr(params, name)
        for topic in value if isinstance(value, tuple) else (value,) if value else ():
            try:
                node.resolve_topic_name(topic)
            except _rclpy.RCLError as exc:
                reason = re.sub(r'^failed to resolve name: |, at \S+:\d+', '', str(exc))
                example = examples.get(name) or defaults()[name]
                raise InputError(
                    f'parameter {name}: {topic!r} is not a valid topic name: {reason} '
                    f'(e.g. {example[0] if isinstance(example, list) else example})') from None


def descriptor(field: dataclasses.Field, note: Optional[str] = None):
    """
    Return the rcl_interfaces ParameterDescriptor of one NodeParams field.

    note: for a setting the table reads at start but the node changes itself (see declare),
    what a change does; the parameter is then writable.
    """
    from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor

    meta = field.metadata
    limits = describe_limits(field)
    writable = meta['runtime'] or note is not None
    limits += ('; ' if limits else '') + (
        note if note is not None else RUNTIME_NOTE.strip() if meta['runtime'] else READ_ONLY)
    desc = ParameterDescriptor(name=field.name, description=meta['description'],
                               additional_constraints=limits, read_only=not writable)
    item = field.default[0] if isinstance(field.default, tuple) else field.default
    if meta['low'] is not None and isinstance(item, float):
        desc.floating_point_range = [FloatingPointRange(
            from_value=float(meta['low']), to_value=float(meta['high']), step=0.0)]
    elif meta['low'] is not None and isinstance(item, int) and not isinstance(item, bool):
        desc.integer_range = [IntegerRange(
            from_value=int(meta['low']), to_value=int(meta['high']), step=1)]
    return desc


def updated(params: NodeParams, parameters, writable: Collection[str] = (),
            read_only: str = READ_ONLY) -> NodeParams:
    """
    Return params with rclpy Parameters set at run time applied, checked as at start.

    Names outside the table (use_sim_time, qos_overrides...) are left to rclpy. Raises
    InputError naming the parameter for a setting read only at start (unless in `writable`:
    ones the node applies itself; `read_only` says why the others are refused), a value the
    table refuses, or a combination the localizer refuses (the motion prior without rerank).
    """
    from taco_cvgl.localization.settings import localizer_config

    fields = {field.name: field for field in dataclasses.fields(NodeParams)}
    changes = {}
    for parameter in parameters:
        field = fields.get(parameter.name)
        if field is None:
            continue
        if not field.metadata['runtime'] and field.name not in writable:
            raise InputError(f'parameter {field.name}: {read_only}')
        value = parameter.value
        changes[field.name] = tuple(value) if isinstance(field.default, tuple) else value
    new = dataclasses.replace(params, **changes)
    localizer_config(new)
    return new


def declare(node, argv: Sequence[str] = (),
            writable: Optional[Mapping[str, str]] = None) -> NodeParams:
    """
    Declare every parameter on an rclpy node and return their validated values.

    argv: the command line rclpy was initialised with (and the node's cli_args), whose values
    are checked first (check_given), as rcl may drop one unseen. writable: {name: note} of the
    settings read at start that this node nevertheless lets change (it applies them itself:
    the map, or every start setting of an unconfigured lifecycle node), the note saying how.
    Raises InputError naming the parameter when a name is unknown, a value has the wrong type
    or is out of range, or a topic name is invalid, so the node can refuse to start with one
    clear line.
    """
    from rclpy.exceptions import InvalidParameterTypeException, ParameterException

    check_given(node, given_values(node, argv))
    values, all_defaults = {}, defaults()
    for field in dataclasses.fields(NodeParams):
        default = all_defaults[field.name]
        try:
            value = node.declare_parameter(
                field.name, default, descriptor(field, (writable or {}).get(field.name))).value
        except InvalidParameterTypeException as exc:
            hint = _FLOAT_HINT if 'double' in _expected_kind(field.default) else ''
            raise InputError(f'parameter {field.name}: wrong type, expected the type of the '
                             f'default {default!r}{hint}: {exc}') from None
        except ParameterException as exc:
            raise InputError(f'parameter {field.name}: not allowed, it must be '
                             f'{describe_limits(field)} ({exc})') from None
        values[field.name] = tuple(value) if isinstance(default, list) else value
    params = NodeParams(**values)
    check_topics(node, params)
    return params


if __name__ == '__main__':
    print(defaults_yaml(), end='')
