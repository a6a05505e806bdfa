"""Shared fixtures: real Landsat-8 imagery and a small map built from it."""

import csv
import random
import types

import cv2
import numpy as np
import pytest
from taco_cvgl.demo.scene import Box, make_tiles, write_tiles
from taco_cvgl.demo.views import Appearance, render_view
from taco_cvgl.localization.localizer import CVGLLocalizer, LocalizerConfig
from taco_cvgl.mapdb.database import build_database, read_csv
from taco_cvgl.model.config import ModelConfig
from taco_cvgl.model.embedder import ImageRetrievalModel
import torch

# Camera-sized crops (height, width) cut from the scene for the map and the node tests.
PLACE_SHAPE = (480, 640)


@pytest.fixture(scope='session')
def scene():
    """Load the Landsat-8 image of the demo, fetched once by `make setup` and cached."""
    from taco_cvgl.demo.scene import load_scene
    return load_scene()


def brute_force_topk(queries, embeddings, k):
    """Return the exact top-k by numpy in float64, the reference (ties: lower index first)."""
    sim = np.asarray(queries, np.float64) @ np.asarray(embeddings, np.float64).T
    order = np.argsort(-sim, axis=1, kind='stable')[:, :k]
    return order, np.take_along_axis(sim, order, axis=1)


def place_centres(scene, count, shape=PLACE_SHAPE, min_apart_px=250, seed=0):
    """Return `count` pixel centres (col, row), min_apart_px apart, whose crop is fully valid."""
    rng = np.random.default_rng(seed)
    h, w = shape
    centres = []
    for _ in range(10000):
        col = int(rng.integers(w // 2, scene.width - w // 2))
        row = int(rng.integers(h // 2, scene.height - h // 2))
        window = scene.valid[row - h // 2:row + h // 2, col - w // 2:col + w // 2]
        if window.all() and all(np.hypot(col - c, row - r) >= min_apart_px
                                for c, r in centres):
            centres.append((col, row))
            if len(centres) == count:
                return centres
    raise RuntimeError(f'the scene has no room for {count} places {min_apart_px} px apart')


@pytest.fixture(scope='session')
def small_map(scene, tmp_path_factory):
    """
    Build a random-init 64 px model and a database of 8 real 640x480 places (PNG + CSV).

    `.places` holds (rgb image, latitude, longitude) per place; each place's own image
    retrieves itself first.
    """
    root = tmp_path_factory.mktemp('small_map')
    torch.manual_seed(0)
    random.seed(0)
    model = ImageRetrievalModel(ModelConfig(input_size=(64, 64))).to_runtime('cpu', 'fp32')
    weights = root / 'weights.safetensors'
    model.save(weights)
    images_dir = root / 'images'
    images_dir.mkdir()
    h, w = PLACE_SHAPE
    places = []
    with open(images_dir / 'places.csv', 'w', newline='') as handle:
        writer = csv.writer(handle)
        writer.writerow(['image_path', 'latitude', 'longitude', 'heading'])
        for i, (col, row) in enumerate(place_centres(scene, 8)):
            rgb = np.ascontiguousarray(scene.rgb[row - h // 2:row + h // 2,
                                                 col - w // 2:col + w // 2])
            lat, lon = scene.pixel_to_latlon(col - 0.5, row - 0.5)
            name = f'place_{i:02d}.png'
            cv2.imwrite(str(images_dir / name), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
            writer.writerow([name, f'{float(lat):.8f}', f'{float(lon):.8f}', '0'])
            places.append((rgb, float(lat), float(lon)))
    from taco_cvgl.cli.build_db import build_db
    db = root / 'map.npz'
    build_db(db, weights, images=images_dir, csv=images_dir / 'places.csv', device='cpu',
             precision='fp32', progress=False)
    return types.SimpleNamespace(weights=weights, db=db, images_dir=images_dir,
                                 csv=images_dir / 'places.csv', places=places)


# Map tiles: 96 scene pixels (30 m) resampled to 256 px.
GSD_M = 96 * 30.0 / 256


@pytest.fixture(scope='session')
def tile_map(scene, tmp_path_factory):
    """Return (random-init 64 px model, database path, tiles) of 5 x 4 real Landsat tiles."""
    root = tmp_path_factory.mktemp('tile_map')
    region = Box(1000, 700, 1000 + 4 * 48 + 96, 700 + 3 * 48 + 96)
    tiles = make_tiles(scene, 96, 48, region, out_px=256)
    csv_path = write_tiles(tiles, root / 'tiles', image_format='jpg')
    torch.manual_seed(0)
    model = ImageRetrievalModel(ModelConfig(input_size=(64, 64))).to_runtime('cpu')
    weights = root / 'w.safetensors'
    model.save(weights)
    model = ImageRetrievalModel.load(weights, device='cpu')
    db = build_database(model, read_csv(csv_path), progress=False)
    db.meta['gsd_m'] = GSD_M
    db.save(root / 'map.npz')
    return model, root / 'map.npz', tiles


def view_of(scene, col, row, heading, seed):
    """Return a simulated 256 px camera view centred at (col, row), image top at heading."""
    return render_view(scene, (col, row), heading, 1.1, (4.0, -3.0), 256,
                       np.random.default_rng(seed), Appearance(strength=0.6), 96)


def localizer_for(tile_map, **config):
    """Return a localizer over the tile map with the given LocalizerConfig fields."""
    model, db_path, tiles = tile_map
    localizer = CVGLLocalizer(model, LocalizerConfig(**config))
    localizer.load_map(db_path)
    return localizer
