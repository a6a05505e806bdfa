"""The map: database, verification features, calibration, search indexes, building in shards."""
