"""The linters ament runs on a ROS 2 Python package, on this repository's code."""

from pathlib import Path
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

ROOT = Path(__file__).resolve().parents[1]
CODE = [str(ROOT / p)
        for p in ('taco_cvgl', 'test', 'launch', 'examples', 'benchmarks', 'setup.py')
        if (ROOT / p).exists()]


@pytest.mark.linter
def test_flake8():
    # In a fresh interpreter: flake8 forks its workers, and a fork of this process, which
    # earlier tests left with DDS and torch threads, can deadlock on a lock one of them held.
    run = subprocess.run([sys.executable, '-c', 'import sys\n'
                          'from ament_flake8.main import main_with_errors\n'
                          'rc, errors = main_with_errors(argv=sys.argv[1:])\n'
                          'print(len(errors), "flake8 errors")\n'
                          'sys.exit(rc)', *CODE], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-20000:] + run.stderr[-5000:]


@pytest.mark.linter
def test_pep257():
    from ament_pep257.main import main
    assert main(argv=CODE) == 0, 'pep257 errors (see output above)'


@pytest.mark.linter
def test_package_xml_is_format_3_and_names_what_is_used():
    root = ET.parse(ROOT / 'package.xml').getroot()
    assert root.tag == 'package' and root.get('format') == '3'
    assert root.findtext('name') == 'taco_cvgl'
    depends = {e.text for e in root.findall('exec_depend')}
    for needed in ('rclpy', 'sensor_msgs', 'geometry_msgs', 'geographic_msgs',
                   'diagnostic_msgs', 'python3-numpy', 'python3-opencv'):
        assert needed in depends
    assert root.find('export/build_type').text == 'ament_python'
