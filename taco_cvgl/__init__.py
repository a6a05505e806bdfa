"""
taco_cvgl: cross-view geo-localization of camera images for ROS 2.

The core (model, database, search, pose estimate, geodesy, image decoding) never imports rclpy;
the ROS node, the bag tools and the command line are thin adapters over it.
"""

__version__ = '0.1.0'
