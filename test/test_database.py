"""The embedding database: building, storage, loading checks and bad input."""

import math
import os

import numpy as np
from PIL import Image
import pytest
from taco_cvgl.errors import InputError, MismatchError
from taco_cvgl.geo.exif import GpsTag, read_gps, write_gps
from taco_cvgl.geo.geodesy import from_enu
from taco_cvgl.localization.localizer import CVGLLocalizer
from taco_cvgl.mapdb.database import (build_database, EmbeddingDatabase, read_csv,
                                      records_from_exif, typical_spacing_m)
from taco_cvgl.model.config import ModelConfig
from taco_cvgl.model.embedder import ImageRetrievalModel
import torch


def test_round_trip_keeps_everything(small_map, tmp_path):
    db = EmbeddingDatabase.load(small_map.db)
    assert len(db) == len(small_map.places) and db.dim == 512
    assert db.embeddings.dtype == np.float16
    for (_, lat, lon), dlat, dlon in zip(small_map.places, db.latitude, db.longitude):
        assert (dlat, dlon) == pytest.approx((lat, lon), abs=1e-8)
    assert all(h == 0.0 for h in db.heading) and np.isnan(db.altitude).all()
    assert db.image_ids[0].endswith('place_00.png')
    copy = tmp_path / 'copy.npz'
    db.save(copy, dtype='fp32')
    again = EmbeddingDatabase.load(copy)
    assert again.embeddings.dtype == np.float32
    assert np.array_equal(again.embeddings, db.embeddings.astype(np.float32))
    assert again.model_fingerprint == db.model_fingerprint
    assert again.model_config == db.model_config
    assert again.grid_spacing_m == pytest.approx(db.grid_spacing_m)


def test_model_database_mismatch_is_refused(small_map, tmp_path):
    torch.manual_seed(5)
    other = ImageRetrievalModel(ModelConfig(input_size=(64, 64)))
    other.save(tmp_path / 'other.safetensors')
    with pytest.raises(MismatchError, match='rebuild the database'):
        CVGLLocalizer.from_files(tmp_path / 'other.safetensors', small_map.db, device='cpu')
    smaller = ImageRetrievalModel(ModelConfig(input_size=(64, 64), embedding_dim=128))
    smaller.save(tmp_path / 'small.safetensors')
    with pytest.raises(MismatchError, match='512-D'):
        CVGLLocalizer.from_files(tmp_path / 'small.safetensors', small_map.db, device='cpu')


def test_truncated_empty_and_foreign_files_are_clear_errors(small_map, tmp_path):
    cut = tmp_path / 'cut.npz'
    cut.write_bytes(small_map.db.read_bytes()[:3000])
    with pytest.raises(InputError, match='cut.npz'):
        EmbeddingDatabase.load(cut)
    foreign = tmp_path / 'foreign.npz'
    np.savez(foreign, x=np.zeros(3))
    with pytest.raises(InputError, match='not a taco_cvgl database'):
        EmbeddingDatabase.load(foreign)
    db = EmbeddingDatabase.load(small_map.db)
    empty = EmbeddingDatabase(db.embeddings[:0], db.latitude[:0], db.longitude[:0],
                              db.altitude[:0], db.heading[:0], db.image_ids[:0],
                              db.model_config, db.model_fingerprint)
    empty.save(tmp_path / 'empty.npz')
    with pytest.raises(InputError, match='empty'):
        EmbeddingDatabase.load(tmp_path / 'empty.npz')


def test_failed_write_keeps_the_previous_database(small_map, tmp_path, monkeypatch):
    target = tmp_path / 'map.npz'
    db = EmbeddingDatabase.load(small_map.db)
    db.save(target)
    before = target.read_bytes()

    def disk_full(fd):
        raise OSError(28, 'No space left on device')
    monkeypatch.setattr(os, 'fsync', disk_full)
    with pytest.raises(OSError):
        db.save(target, dtype='fp32')
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ['map.npz']


def test_csv_errors_name_file_and_line(tmp_path):
    bad_columns = tmp_path / 'a.csv'
    bad_columns.write_text('path,lat,lon\nx.png,1,2\n')
    with pytest.raises(InputError, match=r'a.csv.*missing column'):
        read_csv(bad_columns)
    nan = tmp_path / 'b.csv'
    nan.write_text('image_path,latitude,longitude,heading\nx.png,1,2,0\ny.png,nan,2,0\n')
    with pytest.raises(InputError, match=r'b.csv:3'):
        read_csv(nan)
    out_of_range = tmp_path / 'c.csv'
    out_of_range.write_text('image_path,latitude,longitude\nx.png,95,2\n')
    with pytest.raises(InputError, match=r'c.csv:2.*out of range'):
        read_csv(out_of_range)
    good = tmp_path / 'd.csv'
    good.write_text('image_path,latitude,longitude,altitude\nsub/x.png,1.5,-2.25,12\n')
    (record,) = read_csv(good)
    assert record.path == str(tmp_path / 'sub' / 'x.png')
    assert (record.latitude, record.longitude, record.altitude) == (1.5, -2.25, 12.0)
    assert math.isnan(record.heading)


def test_missing_and_unreadable_images(small_map, tmp_path):
    model = ImageRetrievalModel.load(small_map.weights, device='cpu')
    records = read_csv(small_map.csv)
    gone = records[:2] + [type(records[0])(str(tmp_path / 'gone.png'), 1.0, 2.0)]
    with pytest.raises(InputError, match='gone.png'):
        build_database(model, gone, progress=False)
    broken = tmp_path / 'broken.png'
    broken.write_bytes(b'\x89PNG not really')
    bad = records[:2] + [type(records[0])(str(broken), 1.0, 2.0)]
    with pytest.raises(InputError, match='broken.png'):
        build_database(model, bad, progress=False)
    skipped = []
    db = build_database(model, bad, progress=False, skip_bad=True,
                        on_skip=lambda p, why: skipped.append(p))
    assert len(db) == 2 and skipped == [str(broken)] and db.meta['skipped'] == 1


def test_device_pipeline_builds_the_same_database(small_map, tmp_path):
    """
    The pipeline CUDA takes (threaded reads, batched decode, preprocessing on the device).

    Here on the CPU it decodes on the CPU but runs the same code: same records and order,
    embeddings within the fast path's cosine bar of the host pipeline, bad files alike.
    """
    model = ImageRetrievalModel.load(small_map.weights, device='cpu')
    records = read_csv(small_map.csv)
    broken = tmp_path / 'broken.jpg'
    broken.write_bytes(b'\xff\xd8\xff not really a JPEG')
    mixed = records[:3] + [type(records[0])(str(broken), 1.0, 2.0)] + records[3:]
    built, skipped = {}, {}
    for pipeline in ('host', 'device'):
        with pytest.raises(InputError, match='broken.jpg'):
            build_database(model, mixed, batch_size=3, progress=False, pipeline=pipeline)
        skipped[pipeline] = []
        built[pipeline] = build_database(model, mixed, batch_size=3, progress=False,
                                         pipeline=pipeline, skip_bad=True,
                                         on_skip=lambda p, why, k=pipeline: skipped[k].append(p))
    host, device = built['host'], built['device']
    assert list(device.image_ids) == list(host.image_ids) == [r.path for r in records]
    assert skipped['device'] == skipped['host'] == [str(broken)]
    assert device.meta['skipped'] == host.meta['skipped'] == 1
    np.testing.assert_array_equal(device.latitude, host.latitude)
    cosine = (device.embeddings * host.embeddings).sum(axis=1)
    assert cosine.min() > 0.999, cosine
    with pytest.raises(InputError, match='pipeline'):
        build_database(model, records, progress=False, pipeline='gpu')


def test_exif_gps_database(small_map, tmp_path):
    folder = tmp_path / 'photos'
    folder.mkdir()
    tags = [GpsTag(-25.41, -54.59, 210.0, 45.0), GpsTag(48.8584, 2.2945, -3.5, 300.0)]
    for i, tag in enumerate(tags):
        rgb = small_map.places[i][0]
        write_gps(Image.fromarray(rgb), folder / f'p{i}.jpg', tag)
    (folder / 'no_gps.jpg').write_bytes((folder / 'p0.jpg').read_bytes()[:2] + b'')
    Image.fromarray(small_map.places[2][0]).save(folder / 'no_gps.jpg')
    read = read_gps(folder / 'p1.jpg')
    assert read.latitude == pytest.approx(48.8584, abs=1e-6)
    assert read.longitude == pytest.approx(2.2945, abs=1e-6)
    assert read.altitude == pytest.approx(-3.5) and read.heading == pytest.approx(300.0)
    records = records_from_exif(folder)
    assert [os.path.basename(r.path) for r in records] == ['p0.jpg', 'p1.jpg']
    assert records[0].latitude == pytest.approx(-25.41, abs=1e-6)
    with pytest.raises(InputError, match='EXIF'):
        records_from_exif(small_map.images_dir)


def test_typical_spacing_is_the_grid_stride():
    east, north = np.meshgrid(np.arange(10) * 30.0, np.arange(8) * 30.0)
    lat, lon = from_enu(-25.3, -54.5, east.ravel(), north.ravel())
    # Two entries per place (e.g. two headings) must not make the spacing zero.
    spacing = typical_spacing_m(np.repeat(lat, 2), np.repeat(lon, 2))
    assert spacing == pytest.approx(30.0, rel=1e-3)
