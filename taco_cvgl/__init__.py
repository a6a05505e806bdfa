"""
taco_cvgl: cross-view geo-localization of camera images for ROS 2.

One folder per stage: geo/, files/, model/, inference/, mapdb/, localization/, evaluation/,
training/, cli/, demo/ never import rclpy; ros/ holds the node and the other rclpy adapters.
The two classes of the Python API are reachable from here without importing torch up front:
`taco_cvgl.ImageRetrievalModel` and `taco_cvgl.CVGLLocalizer`.
"""

import importlib

__version__ = '0.1.0'

_API = {'ImageRetrievalModel': 'taco_cvgl.model.embedder',
        'CVGLLocalizer': 'taco_cvgl.localization.localizer'}


def __getattr__(name):
    """Import the API's classes on first use (torch loads slowly)."""
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
