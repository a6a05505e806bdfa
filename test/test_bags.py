"""rosbag2 reading and writing (MCAP and sqlite3) through taco_cvgl.files.bags."""

import math
import os

import numpy as np
import pytest
from taco_cvgl.errors import InputError
from taco_cvgl.files import bags, image_codec

T0 = 1_700_000_000_000_000_000  # ns since the epoch (November 2023)
SECOND = 1_000_000_000


def frame(index, height=48, width=64):
    """Return a distinct, smooth RGB image for frame `index`."""
    rows, cols = np.mgrid[0:height, 0:width]
    rgb = np.stack([(cols * 3 + index * 10) % 256, (rows * 4) % 256,
                    np.full_like(rows, 255 - index * 7)], axis=-1)
    return np.ascontiguousarray(rgb.astype(np.uint8))


def write_sample_bag(path, storage):
    """Write 5 raw images, 5 JPEG images and 5 GPS fixes at 10 Hz."""
    with bags.BagWriter(path, storage=storage) as writer:
        for i in range(5):
            stamp = T0 + i * SECOND // 10
            writer.write_image('/camera/image_raw', stamp, frame(i), frame_id='camera')
            writer.write_image('/camera/image_raw/compressed', stamp, frame(i), compressed='jpeg')
            writer.write_navsat('/gps/fix', stamp + 1000, 45.0 + i * 1e-4, 7.0, 300.0 + i,
                                cov=np.diag([4.0, 4.0, 9.0]))
    return path


@pytest.mark.parametrize('storage', ['mcap', 'sqlite3'])
def test_write_and_read_back(tmp_path, storage):
    path = write_sample_bag(tmp_path / 'bag', storage)
    suffix = '.mcap' if storage == 'mcap' else '.db3'
    assert sorted(os.listdir(path)) == sorted(['metadata.yaml', f'bag{suffix}'])
    assert bags.list_topics(path) == {
        '/camera/image_raw': 'sensor_msgs/msg/Image',
        '/camera/image_raw/compressed': 'sensor_msgs/msg/CompressedImage',
        '/gps/fix': 'sensor_msgs/msg/NavSatFix',
    }
    raw = list(bags.iter_images(path, '/camera/image_raw'))
    assert [stamp for stamp, _ in raw] == [T0 + i * SECOND // 10 for i in range(5)]
    for i, (_, rgb) in enumerate(raw):
        np.testing.assert_array_equal(rgb, frame(i))
    compressed = list(bags.iter_images(path, '/camera/image_raw/compressed'))
    assert len(compressed) == 5
    for i, (_, rgb) in enumerate(compressed):
        assert np.abs(rgb.astype(int) - frame(i)).mean() < 4  # JPEG at quality 90

    track = bags.read_navsat(path, '/gps/fix')
    assert len(track) == 5 and track.dropped == 0
    np.testing.assert_array_equal(track.stamps_ns, [T0 + i * SECOND // 10 + 1000
                                                    for i in range(5)])
    np.testing.assert_allclose(track.lat, 45.0 + np.arange(5) * 1e-4)
    np.testing.assert_allclose(track.alt, 300.0 + np.arange(5))
    np.testing.assert_allclose(track.covariance[2], np.diag([4.0, 4.0, 9.0]))
    assert track.covariance_axes == 'east,north,up'

    # The storage file alone (without metadata.yaml) is readable too.
    assert '/gps/fix' in bags.list_topics(path / f'bag{suffix}')


def test_iter_messages_in_log_time_order(tmp_path):
    path = write_sample_bag(tmp_path / 'bag', 'mcap')
    seen = list(bags.iter_messages(path, ['/gps/fix', '/camera/image_raw']))
    assert len(seen) == 10
    assert [t for _, _, t, _ in seen] == sorted(t for _, _, t, _ in seen)
    topic, msgtype, log_ns, msg = seen[1]
    assert (topic, msgtype, log_ns) == ('/gps/fix', 'sensor_msgs/msg/NavSatFix', T0 + 1000)
    assert msg.latitude == pytest.approx(45.0) and msg.header.frame_id == 'gps'
    raw = list(bags.iter_raw(path, ['/gps/fix']))
    assert len(raw) == 5 and isinstance(raw[0][3], bytes)
    assert bags.typestore().deserialize_cdr(raw[0][3], raw[0][1]).latitude == pytest.approx(45)


def test_missing_topic_lists_the_bags_topics(tmp_path):
    path = write_sample_bag(tmp_path / 'bag', 'sqlite3')
    with pytest.raises(InputError) as info:
        bags.iter_images(path, '/camera/wrong')
    text = str(info.value)
    assert '/camera/wrong' in text and '/camera/image_raw (sensor_msgs/msg/Image)' in text
    assert '/gps/fix (sensor_msgs/msg/NavSatFix)' in text
    with pytest.raises(InputError, match='no topic /nope'):
        list(bags.iter_messages(path, ['/nope']))
    with pytest.raises(InputError, match='/gps/fix has type sensor_msgs/msg/NavSatFix, not'):
        bags.iter_images(path, '/gps/fix')
    with pytest.raises(InputError, match='expected one of'):
        bags.read_navsat(path, '/camera/image_raw')


def test_missing_or_broken_bag_raises_input_error(tmp_path):
    with pytest.raises(InputError, match='bag not found: .*nothing'):
        bags.list_topics(tmp_path / 'nothing')
    broken = tmp_path / 'broken'
    broken.mkdir()
    (broken / 'metadata.yaml').write_text('rosbag2_bagfile_information: [1, 2')
    with pytest.raises(InputError, match='cannot read bag .*broken'):
        bags.list_topics(broken)
    with pytest.raises(InputError, match='cannot read bag'):
        bags.iter_images(broken, '/camera/image_raw')
    not_a_bag = tmp_path / 'x.mcap'
    not_a_bag.write_bytes(b'not an mcap file at all')
    with pytest.raises(InputError, match='cannot read bag .*x.mcap'):
        bags.list_topics(not_a_bag)


def test_zero_stamp_falls_back_to_log_time_and_bad_messages_are_skipped(tmp_path):
    types = bags.typestore().types
    path = tmp_path / 'bag'
    good = image_codec.encode_raw(frame(1), 'rgb8')
    with bags.BagWriter(path) as writer:
        for i, (stamp, data) in enumerate([(0, good[4]), (T0, good[4][:100]), (T0, good[4])]):
            header = types['std_msgs/msg/Header'](
                stamp=types['builtin_interfaces/msg/Time'](
                    sec=stamp // SECOND, nanosec=stamp % SECOND), frame_id='camera')
            msg = types['sensor_msgs/msg/Image'](
                header=header, height=good[1], width=good[2], encoding='rgb8', is_bigendian=0,
                step=good[3], data=np.frombuffer(data, dtype=np.uint8))
            writer.write_msg('/cam', T0 + 5 * SECOND + i, msg)
    stream = bags.iter_images(path, '/cam')
    images = list(stream)
    assert [stamp for stamp, _ in images] == [T0 + 5 * SECOND, T0]  # log time, header stamp
    assert stream.skipped == 1 and stream.message_count == 3
    assert 'expected at least' in stream.errors[0]
    np.testing.assert_array_equal(images[1][1], frame(1))
    with pytest.raises(StopIteration):
        next(stream)  # an iterator, exhausted after the loop
    assert next(iter(stream))[0] == T0 + 5 * SECOND  # iter() restarts from the first image
    assert next(stream)[0] == T0
    stream.close()


def make_track():
    """Return a track with fixes at 0, 1, 2 s and then 4 s (a 2 s gap); no altitude at 2 s."""
    return bags.GpsTrack(
        stamps_ns=[T0 + 4 * SECOND, T0, T0 + SECOND, T0 + 2 * SECOND],  # unsorted on purpose
        lat=[20.0, 10.0, 11.0, 13.0], lon=[4.0, 1.0, 2.0, 3.0],
        alt=[40.0, 100.0, 110.0, math.nan], status=[0, 0, 0, 0])


def test_gps_interpolation_known_answers():
    track = make_track()
    assert track.interpolate(T0 + SECOND // 2) == pytest.approx((10.5, 1.5, 105.0))
    assert track.interpolate(T0 + SECOND + SECOND // 4) == pytest.approx(
        (11.5, 2.25, math.nan), nan_ok=True)
    assert track.interpolate(T0) == (10.0, 1.0, 100.0)
    lat, lon, alt = track.interpolate(T0 + 2 * SECOND)  # exact, valid despite the gap after it
    assert (lat, lon) == (13.0, 3.0) and math.isnan(alt)
    assert track.interpolate(T0 + 4 * SECOND) == (20.0, 4.0, 40.0)


def test_gps_interpolation_outside_or_in_a_gap_is_none():
    track = make_track()
    assert track.interpolate(T0 - 1) is None
    assert track.interpolate(T0 + 4 * SECOND + 1) is None
    # 3 s lies exactly 1 s from both fixes around it: valid with a 1 s limit, not below.
    assert track.interpolate(T0 + 3 * SECOND, max_gap_s=0.99) is None
    assert track.interpolate(T0 + 3 * SECOND, max_gap_s=1.0) == pytest.approx(
        (16.5, 3.5, math.nan), nan_ok=True)
    assert track.interpolate(T0 + 2 * SECOND + SECOND // 2) is None  # 1.5 s to the next fix
    assert track.interpolate(T0 + 2 * SECOND + SECOND // 2, max_gap_s=2.0) == pytest.approx(
        (14.75, 3.25, math.nan), nan_ok=True)
    lat, lon, alt, valid = track.interpolate_many(
        [T0 - 1, T0 + SECOND // 2, T0 + 3 * SECOND], max_gap_s=0.9)
    assert valid.tolist() == [False, True, False]
    assert math.isnan(lat[0]) and lat[1] == pytest.approx(10.5)
    empty = bags.GpsTrack([], [], [], [], [])
    assert empty.interpolate(T0) is None


def test_gps_interpolation_across_the_antimeridian():
    track = bags.GpsTrack([T0, T0 + SECOND], [0.0, 0.0], [179.9, -179.9], [0.0, 0.0], [0, 0])
    lat, lon, _ = track.interpolate(T0 + SECOND // 4)
    assert lon == pytest.approx(179.95)
    _, lon, _ = track.interpolate(T0 + SECOND // 2)
    assert abs(lon) == pytest.approx(180.0)
    _, lon, _ = track.interpolate(T0 + 3 * SECOND // 4)
    assert lon == pytest.approx(-179.95)


def test_read_navsat_drops_no_fix_and_nan(tmp_path):
    path = tmp_path / 'bag'
    with bags.BagWriter(path, storage='sqlite3') as writer:
        writer.write_navsat('/fix', T0, 1.0, 2.0, 3.0)
        writer.write_navsat('/fix', T0 + SECOND, 1.5, 2.0, 3.0, status=-1)  # STATUS_NO_FIX
        writer.write_navsat('/fix', T0 + 2 * SECOND, math.nan, 2.0, 3.0)
        writer.write_navsat('/fix', T0 + 3 * SECOND, 2.0, 2.0, 3.0, status=2)
    track = bags.read_navsat(path, '/fix')
    assert track.lat.tolist() == [1.0, 2.0] and track.status.tolist() == [0, 2]
    assert track.dropped == 2 and track.covariance is None


def test_read_geopose_estimates(tmp_path):
    path = tmp_path / 'bag'
    cov = np.diag([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    with bags.BagWriter(path) as writer:
        for i in range(3):
            writer.write_geopose('/cvgl/geopose', T0 + i * SECOND, 48.0 + i, 11.0, 500.0, cov=cov)
    assert bags.list_topics(path) == {
        '/cvgl/geopose': 'geographic_msgs/msg/GeoPoseWithCovarianceStamped'}
    track = bags.read_navsat(path, '/cvgl/geopose')
    assert track.lat.tolist() == [48.0, 49.0, 50.0]
    np.testing.assert_array_equal(track.covariance[0], np.diag([1.0, 2.0, 3.0]))
    assert track.covariance_axes == 'latitude,longitude,altitude'


def test_geographic_types_match_the_real_package():
    # RIHS01 hashes of geographic_msgs (ros-geographic-info), as rosidl computes them.
    expected = {
        'GeoPoint': '602c647cf87bbe95a0231b459b5ac30051875d07c0c740b31ad7a8c4662b971e',
        'GeoPose': '8052786d7663e225e38926f7d05716046c931572c25e557d4f70dca55b972626',
        'GeoPoseWithCovariance':
            'e5a071a4c061688377f825b777166e80c3e380aa9e41e1fac0695f54415ee474',
        'GeoPoseWithCovarianceStamped':
            'e8e87d7bc02d092be564be3b6a2ca2302ff6997a82b996e4c6a9052b88e09aac',
    }
    for name, digest in expected.items():
        assert bags.typestore().hash_rihs01(f'geographic_msgs/msg/{name}') == f'RIHS01_{digest}'


def test_writer_is_atomic_on_exception(tmp_path):
    path = tmp_path / 'out'
    with pytest.raises(RuntimeError, match='boom'):
        with bags.BagWriter(path) as writer:
            writer.write_image('/cam', T0, frame(0))
            raise RuntimeError('boom')
    assert os.listdir(tmp_path) == []  # neither the bag nor a temporary directory


def test_unfinished_writer_leaves_nothing_at_the_path(tmp_path):
    path = tmp_path / 'out'
    writer = bags.BagWriter(path, storage='sqlite3')
    writer.write_navsat('/fix', T0, 1.0, 2.0, 3.0)
    assert not path.exists()  # as after a crash before close()
    writer.close()
    writer.close()  # a second close does nothing
    assert bags.read_navsat(path, '/fix').lat.tolist() == [1.0]
    assert os.listdir(tmp_path) == ['out']


def test_writer_refuses_existing_path(tmp_path):
    existing_dir = tmp_path / 'dir'
    existing_dir.mkdir()
    existing_file = tmp_path / 'file'
    existing_file.write_text('keep me')
    for path in (existing_dir, existing_file):
        with pytest.raises(InputError, match='already exists; refusing to overwrite'):
            bags.BagWriter(path)
    assert existing_file.read_text() == 'keep me' and os.listdir(existing_dir) == []
    with pytest.raises(InputError, match='unknown bag storage'):
        bags.BagWriter(tmp_path / 'new', storage='rosbag1')
    with bags.BagWriter(tmp_path / 'new') as writer:
        with pytest.raises(InputError, match='message type foo_msgs/msg/Bar is unknown'):
            writer.write_raw('/x', 'foo_msgs/msg/Bar', T0, b'')


@pytest.mark.parametrize('drop', ['all', 'sensor_msgs/msg/NavSatFix'])
def test_bag_without_embedded_definitions_reads_with_kilted_types(tmp_path, drop):
    # Older recorders (Humble's sqlite3 plugin) store no message definitions.
    import sqlite3

    path = tmp_path / 'old'
    with bags.BagWriter(path, storage='sqlite3') as writer:
        writer.write_navsat('/fix', T0, 1.0, 2.0, 3.0)
        writer.write_image('/cam', T0, frame(2))
    db = sqlite3.connect(path / 'old.db3')
    if drop == 'all':
        db.execute('DELETE FROM message_definitions')
    else:
        db.execute('DELETE FROM message_definitions WHERE topic_type = ?', (drop,))
    db.commit()
    db.close()
    assert bags.read_navsat(path, '/fix').lat.tolist() == [1.0]
    np.testing.assert_array_equal(next(iter(bags.iter_images(path, '/cam')))[1], frame(2))
