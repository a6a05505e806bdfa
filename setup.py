"""Install taco_cvgl as an ament_python package (colcon build) or with pip."""

from glob import glob
import os

from setuptools import find_packages, setup

PACKAGE = 'taco_cvgl'

setup(
    name=PACKAGE,
    version='0.1.0',
    packages=find_packages(exclude=['test', 'test.*']),
    data_files=[
        ('share/ament_index/resource_index/packages', [f'resource/{PACKAGE}']),
        (f'share/{PACKAGE}', ['package.xml', 'LICENSE', 'CHANGELOG.rst']),
        (f'share/{PACKAGE}/launch', glob('launch/*.launch.py')),
        (f'share/{PACKAGE}/config', glob('config/*.yaml') + glob('config/*.xml')),
    ] + [(os.path.join(f'share/{PACKAGE}', os.path.dirname(p)), [p])
         for p in glob('examples/*.py')],
    install_requires=['setuptools'],
    zip_safe=True,
    maintainer='taco_cvgl developers',
    maintainer_email='taco-cvgl@example.com',
    description='Cross-view geo-localization of camera images for ROS 2.',
    license='Apache-2.0',
    extras_require={'test': ['pytest']},
    entry_points={
        'console_scripts': [
            'taco-cvgl = taco_cvgl.cli.main:main',
            'cvgl_node = taco_cvgl.ros.node:main',
            'cvgl_lifecycle_node = taco_cvgl.ros.lifecycle_node:main',
        ],
    },
)
