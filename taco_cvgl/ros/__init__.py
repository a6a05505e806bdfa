"""ROS 2 adapters of taco_cvgl: the only part of the package that imports rclpy and messages."""
