"""Files and rosbag2 without ROS: atomic writes, image encode/decode, bag read/write."""
