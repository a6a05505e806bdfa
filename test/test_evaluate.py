"""taco-cvgl evaluate: metrics against hand-computed answers on small synthetic bags."""

import json
import math

import numpy as np
from PIL import Image
import pytest
from taco_cvgl.cli import evaluate
from taco_cvgl.errors import InputError, MismatchError
from taco_cvgl.evaluation import runs
from taco_cvgl.evaluation.scoring import (FrameResult, GAUSSIAN_2D_WITHIN_1SIGMA,
                                          GAUSSIAN_2D_WITHIN_2SIGMA, interpolate_headings,
                                          summarize)
from taco_cvgl.files import bags
from taco_cvgl.geo.geodesy import distance_m, from_enu, heading_to_enu_yaw, yaw_to_quaternion
from taco_cvgl.localization.estimate import EstimatorConfig
from taco_cvgl.localization.localizer import CVGLLocalizer, LocalizerConfig
from taco_cvgl.mapdb.database import EmbeddingDatabase

T0 = 1_700_000_000_000_000_000  # ns since the epoch
SECOND = 1_000_000_000
GT = '/gps/fix'
CAMERA = '/camera/image_raw'
HEADING = '/imu/heading'
FIX = '/cvgl/fix'


def at(seconds):
    """Return the stamp (ns) `seconds` after T0."""
    return T0 + int(round(seconds * SECOND))


def offset(lat, lon, east, north):
    """Return (lat, lon) of the point `east`, `north` metres from (lat, lon)."""
    new_lat, new_lon = from_enu(lat, lon, east, north)
    return float(new_lat), float(new_lon)


def quaternion_stamped(stamp, heading_deg):
    """Return a geometry_msgs/QuaternionStamped for a compass heading (ENU orientation)."""
    types = bags.typestore().types
    x, y, z, w = yaw_to_quaternion(heading_to_enu_yaw(heading_deg))
    sec, nanosec = divmod(stamp, SECOND)
    header = types['std_msgs/msg/Header'](
        stamp=types['builtin_interfaces/msg/Time'](sec=sec, nanosec=nanosec), frame_id='enu')
    return types['geometry_msgs/msg/QuaternionStamped'](
        header=header, quaternion=types['geometry_msgs/msg/Quaternion'](x=x, y=y, z=z, w=w))


@pytest.fixture(scope='module')
def localizer(small_map):
    """Return the small map's localizer, temperature tiny: each estimate is its top-1 place."""
    config = LocalizerConfig(top_k=10, estimator=EstimatorConfig(temperature=1e-4))
    return CVGLLocalizer.from_files(small_map.weights, small_map.db, 'cpu', 'fp32', config)


def camera_bag(path, storage, small_map, second_of_2):
    """
    Write the camera bag of the hand-computed case; return the expected per-frame truths.

    Time line (s after T0): images at 0 (before the ground truth: none), 2, 4, 6, 8, 11 (in a
    3 s ground-truth gap: none) and 12.75. Ground truth interpolates to: place 0 + 10 m north,
    place 1 + 30 m east, place B + 5 m north where B is place 2's second match, place 3, and
    place 6 + 20 m north.
    """
    places = small_map.places
    p0, p1, p2, p3, p6 = [(places[i][1], places[i][2]) for i in (0, 1, 2, 3, 6)]
    pb = (places[second_of_2][1], places[second_of_2][2])
    compressed = None if storage == 'mcap' else 'png'  # raw and lossless compressed images
    with bags.BagWriter(path, storage=storage) as writer:
        for seconds, place in ((0.0, 4), (2.0, 0), (4.0, 1), (6.0, 2), (8.0, 3), (11.0, 5),
                               (12.75, 6)):
            writer.write_image(CAMERA, at(seconds), places[place][0], compressed=compressed)
        gt = [(1.5, p0, 0.0, 0.0), (2.5, p0, 0.0, 20.0),      # frame at 2: 10 m north
              (3.75, p1, 20.0, 0.0), (4.75, p1, 60.0, 0.0),   # at 4: frac 0.25 -> 30 m east
              (6.0, pb, 0.0, 5.0),                            # at 6: exact stamp
              (8.0, p3, 0.0, 0.0),                            # at 8: exact stamp
              (12.5, p6, 0.0, 0.0), (13.0, p6, 0.0, 40.0)]    # at 12.75: 20 m north
        for seconds, (lat, lon), east, north in gt:
            writer.write_navsat(GT, at(seconds), *offset(lat, lon, east, north), 100.0)
        # Heading truth: 20 -> 40 deg around t=2 (30 there), 350 -> 10 deg around t=4 (0 there,
        # across north); none near the later frames.
        for seconds, heading in ((1.0, 20.0), (3.0, 40.0), (3.5, 350.0), (4.5, 10.0)):
            writer.write_msg(HEADING, at(seconds), quaternion_stamped(at(seconds), heading))
    return [offset(*p0, 0.0, 10.0), offset(*p1, 30.0, 0.0), offset(*pb, 0.0, 5.0), p3,
            offset(*p6, 0.0, 20.0)], [p0, p1, p2, p3, p6]


@pytest.fixture(scope='module')
def second_of_2(small_map, localizer):
    """Return the index of the place that place 2's image retrieves second."""
    return localizer.localize(small_map.places[2][0]).matches[1].index


@pytest.mark.parametrize('storage', ['mcap', 'sqlite3'])
def test_camera_bag_metrics_match_hand_computed(tmp_path, small_map, localizer, second_of_2,
                                                storage):
    bag = tmp_path / 'drive'
    truths, places = camera_bag(bag, storage, small_map, second_of_2)
    draw = storage == 'mcap'  # the pictures take seconds: drawn once
    result = runs.evaluate_bag(bag, CAMERA, GT, small_map.db, small_map.weights,
                               tmp_path / 'out', gt_heading_topic=HEADING,
                               threshold_m=25.0, localizer=localizer, progress=False,
                               plots=draw)
    m = result.metrics
    assert m['complete'] is True and m['stopped'] is None and m['mode'] == 'localizer'
    assert m['frames']['total'] == 7 and m['frames']['scored'] == 5
    assert m['frames']['no_ground_truth'] == 2 and m['frames']['failed'] == 0

    # Each estimate is its place (temperature 1e-4); errors are place -> interpolated truth.
    errors = [float(distance_m(*t, *p)) for t, p in zip(truths, places)]
    np.testing.assert_allclose(errors[:2] + errors[3:], [10.0, 30.0, 0.0, 20.0], atol=0.01)
    stats = m['position_error_m']['all']
    assert stats['count'] == 5
    assert stats['median'] == pytest.approx(20.0, abs=0.01)
    assert stats['max'] == pytest.approx(errors[2], rel=1e-6)  # place 2 -> its 2nd match (km)
    # p90 of [0, 10, 20, 30, D]: 30 + 0.6 (D - 30)
    assert stats['p90'] == pytest.approx(30.0 + 0.6 * (errors[2] - 30.0), rel=1e-6)
    assert m['position_error_m']['fixes'] == stats  # every frame gets a fix (confidence 1)

    recall = m['recall']
    assert recall['available'] and recall['retrieved_per_frame'] == 8
    assert recall['at_1'] == pytest.approx(3 / 5)  # frames at 2, 8 and 12.75
    assert recall['at_5'] == pytest.approx(4 / 5)  # + the frame at 6 (truth at its rank 2)
    assert recall['at_10'] == pytest.approx(4 / 5)  # all 8 entries retrieved
    assert any('all retrieved' in note for note in recall['notes'])
    # Without verification or a motion prior the localizer ranks as the embedding does.
    assert m['recall_retrieval_only'] == recall

    fixes = m['fixes']
    assert fixes['count'] == 5 and fixes['share'] == 1.0
    assert fixes['precision'] == pytest.approx(3 / 5)  # 0, 10, 20 m <= 25 m; 30 m and km not

    # Covariance: floor (half the grid spacing)^2 on east and north, nothing else.
    floor = 0.5 * EmbeddingDatabase.load(small_map.db).grid_spacing_m
    d = np.array(errors) / floor
    cal = m['calibration']
    assert cal['count'] == 5
    assert cal['within_1sigma'] == pytest.approx(np.mean(d <= 1))
    assert cal['within_2sigma'] == pytest.approx(np.mean(d <= 2))
    assert cal['scale_for_95pct_within_2sigma'] == pytest.approx(
        np.quantile(d ** 2, 0.95) / 4, rel=1e-4)
    assert cal['expected_gaussian_within_2sigma'] == pytest.approx(0.8647, abs=1e-4)

    # Heading: the database's headings are 0; truth 30 deg at t=2 and 0 deg at t=4.
    heading = m['heading_error_deg']
    assert heading['available'] and heading['count'] == 2
    assert heading['max'] == pytest.approx(30.0, abs=1e-6)
    assert heading['median'] == pytest.approx(15.0, abs=1e-6)

    assert m['latency_s']['available'] and m['latency_s']['count'] == 5
    assert m['latency_s']['median'] > 0
    assert set(m['definitions']) >= {'recall_at_k', 'calibration', 'fix_precision'}

    on_disk = json.loads((tmp_path / 'out' / 'metrics.json').read_text())
    assert on_disk['recall'] == recall and on_disk['complete'] is True
    rows = (tmp_path / 'out' / 'frames.csv').read_text().splitlines()
    assert len(rows) == 8 and sum(',no_ground_truth,' in r for r in rows) == 2
    pictures = ('track.png', 'error_along_track.png', 'error_cdf.png', 'retrieval_grid.png')
    if not draw:
        assert not any((tmp_path / 'out' / name).exists() for name in pictures)
        assert set(on_disk['outputs']) == {'frames_csv', 'metrics'}
        return
    assert len(on_disk['outputs']) == 6
    for name in pictures:
        with Image.open(tmp_path / 'out' / name) as image:
            image.verify()
        with Image.open(tmp_path / 'out' / name) as image:
            assert image.format == 'PNG' and min(image.size) >= 300


def test_interrupted_run_is_reported_incomplete(tmp_path, small_map, localizer):
    bag = tmp_path / 'drive'
    camera_bag(bag, 'mcap', small_map, 3)
    seen = []

    def stop_at_third(frame):
        seen.append(frame)
        if len(seen) == 3:
            raise KeyboardInterrupt

    result = runs.evaluate_bag(bag, CAMERA, GT, None, None, tmp_path / 'out',
                               localizer=localizer, progress=False, on_frame=stop_at_third,
                               plots=False)
    on_disk = json.loads((tmp_path / 'out' / 'metrics.json').read_text())
    for m in (result.metrics, on_disk):
        assert m['complete'] is False and m['stopped'].startswith('interrupted')
        assert m['frames']['total'] == 3 and m['frames']['scored'] == 2
        assert m['frames']['in_bag'] == 7


def test_max_frames_marks_the_result_incomplete(tmp_path, small_map, localizer):
    bag = tmp_path / 'drive'
    camera_bag(bag, 'mcap', small_map, 3)
    result = runs.evaluate_bag(bag, CAMERA, GT, None, None, tmp_path / 'out', max_frames=2,
                               localizer=localizer, progress=False, plots=False)
    assert not result.complete and 'max_frames=2' in result.metrics['stopped']
    assert result.metrics['frames']['total'] == 2


def test_undecodable_image_makes_the_result_incomplete(tmp_path, small_map, localizer):
    bag = tmp_path / 'drive'
    rgb, lat, lon = small_map.places[0]
    types = bags.typestore().types
    with bags.BagWriter(bag, storage='mcap') as writer:
        writer.write_image(CAMERA, at(1), rgb, compressed='jpeg')
        junk = types['sensor_msgs/msg/CompressedImage'](
            header=quaternion_stamped(at(2), 0.0).header, format='jpeg',
            data=np.frombuffer(b'not a jpeg', dtype=np.uint8))
        writer.write_msg(CAMERA, at(2), junk)
        for seconds in (0.5, 1.5):  # ground truth around the good image only
            writer.write_navsat(GT, at(seconds), lat, lon, 0.0)
    m = runs.evaluate_bag(bag, CAMERA, GT, None, None, tmp_path / 'out',
                          localizer=localizer, progress=False, plots=False).metrics
    assert m['complete'] is False and m['stopped'] is None
    assert m['frames']['undecodable'] == 1 and m['frames']['scored'] == 1
    assert len(m['frames']['decode_errors']) == 1


def test_database_of_another_model_is_refused(tmp_path, small_map):
    db = EmbeddingDatabase.load(small_map.db)
    db.model_fingerprint = 'another-model'
    other = db.save(tmp_path / 'other.npz')
    bag = tmp_path / 'drive'
    camera_bag(bag, 'mcap', small_map, 3)
    with pytest.raises(MismatchError, match='rebuild the database'):
        runs.evaluate_bag(bag, CAMERA, GT, other, small_map.weights, tmp_path / 'out',
                          device='cpu', precision='fp32', progress=False)
    assert not (tmp_path / 'out').exists()


# ---------------------------------------------------------------------------------------------
# Recorded bags: the node's estimates beside the ground truth

LAT0, LON0 = 45.0, 7.0
# (east, north) error of each estimate (m), its 2x2 ENU covariance (None: unknown), and d^2.
RECORDED = [
    ((3.0, 4.0), np.diag([36.0, 36.0]), 25.0 / 36.0),        # 5 m, inside 1 sigma
    ((0.0, 12.0), np.diag([16.0, 64.0]), 144.0 / 64.0),      # 1.5 sigma
    ((6.0, 0.0), np.diag([4.0, 36.0]), 9.0),                 # 3 sigma (1 if axes were swapped)
    ((0.0, -30.0), np.diag([100.0, 400.0]), 2.25),           # 30 m: beyond the 25 m threshold
    ((1.0, 1.0), None, None),                                # covariance unknown
    ((4.0, 4.0), np.array([[8.0, 6.0], [6.0, 8.0]]), 64.0 / 28.0),  # correlated
]


def truth_at(seconds):
    """Return the ground truth at `seconds`: 10 m/s due north from (LAT0, LON0) from t=0."""
    return offset(LAT0, LON0, 0.0, 10.0 * seconds)


def recorded_bags(tmp_path, storage, split):
    """Write the recorded estimates (+ ground truth and images, in a second bag when split)."""
    run = tmp_path / 'run'
    gt_bag = tmp_path / 'gt' if split else run
    with bags.BagWriter(run, storage=storage) as writer:
        for k, ((east, north), cov, _) in enumerate(RECORDED):
            cov3 = None
            if cov is not None:
                cov3 = np.eye(3) * 25.0
                cov3[:2, :2] = cov
            writer.write_navsat(FIX, at(k + 0.5), *offset(*truth_at(k + 0.5), east, north),
                                100.0, cov=cov3, status=0)
        writer.write_navsat(FIX, at(6.5), math.nan, math.nan, math.nan, status=-1)  # NO_FIX
        writer.write_navsat(FIX, at(20.0), *truth_at(20.0), 100.0, cov=np.eye(3))  # beyond GT
        gt_writer = bags.BagWriter(gt_bag, storage=storage) if split else writer
        for k in range(11):
            gt_writer.write_navsat(GT, at(k), *truth_at(k), 100.0, cov=np.eye(3))
        for k in range(8):
            gt_writer.write_image(CAMERA, at(k + 0.5), np.zeros((8, 8, 3), np.uint8))
        if split:
            gt_writer.close()
    return run, (gt_bag if split else None)


@pytest.mark.parametrize('storage,split', [('mcap', False), ('sqlite3', True)])
def test_recorded_bag_metrics_match_hand_computed(tmp_path, storage, split):
    run, gt_bag = recorded_bags(tmp_path, storage, split)
    result = runs.evaluate_recorded(run, FIX, GT, tmp_path / 'out', gt_bag=gt_bag,
                                    image_topic=CAMERA, progress=False)
    m = result.metrics
    assert m['complete'] is True and m['mode'] == 'recorded'
    assert m['frames']['total'] == 7 and m['frames']['scored'] == 6
    assert m['frames']['no_ground_truth'] == 1 and m['frames']['no_fix_messages'] == 1
    assert m['recall']['available'] is False and 'Recall@k' in m['recall']['reason']
    assert m['recall_retrieval_only'] == m['recall']
    assert m['latency_s']['available'] is False

    errors = [math.hypot(*e) for e, _, _ in RECORDED]
    stats = m['position_error_m']['fixes']
    assert stats['count'] == 6
    assert stats['median'] == pytest.approx(np.median(errors), abs=1e-3)
    assert stats['max'] == pytest.approx(30.0, abs=1e-3)

    assert m['images'] == {'total': 8, 'with_ground_truth': 8, 'bag': str(gt_bag or run)}
    assert m['fixes']['share'] == pytest.approx(6 / 8)
    assert m['fixes']['precision'] == pytest.approx(5 / 6)

    d2 = np.array([x for _, _, x in RECORDED if x is not None])
    cal = m['calibration']
    assert cal['count'] == 5 and cal['excluded_no_covariance'] == 1
    assert cal['within_1sigma'] == pytest.approx(1 / 5)
    assert cal['within_2sigma'] == pytest.approx(4 / 5)
    assert cal['scale_for_95pct_within_2sigma'] == pytest.approx(
        np.quantile(d2, 0.95) / 4, rel=1e-4)
    assert m['heading_error_deg']['available'] is False

    for name in ('track.png', 'error_along_track.png', 'error_cdf.png'):
        with Image.open(tmp_path / 'out' / name) as image:
            assert image.format == 'PNG' and min(image.size) >= 300
    assert not (tmp_path / 'out' / 'retrieval_grid.png').exists()


def imu(stamp, heading_deg):
    """Return a sensor_msgs/Imu whose orientation (ENU) has the given compass heading."""
    types = bags.typestore().types
    vector = types['geometry_msgs/msg/Vector3'](x=0.0, y=0.0, z=0.0)
    return types['sensor_msgs/msg/Imu'](
        header=quaternion_stamped(stamp, 0.0).header,
        orientation=quaternion_stamped(stamp, heading_deg).quaternion,
        orientation_covariance=np.full(9, 0.01), angular_velocity=vector,
        angular_velocity_covariance=np.zeros(9), linear_acceleration=vector,
        linear_acceleration_covariance=np.zeros(9))


def test_recorded_geopose_headings(tmp_path):
    run = tmp_path / 'run'
    unknown = np.zeros((6, 6))
    # GeoPose orders position as (lat, lon, alt): north sigma 20 m, east sigma 10 m.
    unknown[:2, :2] = np.diag([400.0, 100.0])
    unknown[5, 5] = 1.0e6  # the node's marker of an unknown yaw
    known = unknown.copy()
    known[5, 5] = 0.01
    with bags.BagWriter(run, storage='mcap') as writer:
        for k in range(4):
            writer.write_navsat(GT, at(k), *truth_at(k), 0.0)
        for seconds, cov in ((1.0, known), (2.0, unknown)):
            q = yaw_to_quaternion(heading_to_enu_yaw(100.0))
            writer.write_geopose(FIX, at(seconds), *offset(*truth_at(seconds), 0.0, 25.0), 0.0,
                                 cov=cov, orientation=q)
        for seconds in (0.5, 1.5, 2.5):
            writer.write_msg(HEADING, at(seconds), imu(at(seconds), 80.0))
    m = runs.evaluate_recorded(run, FIX, GT, tmp_path / 'out', gt_heading_topic=HEADING,
                               progress=False, plots=False).metrics
    assert m['heading_error_deg']['count'] == 1  # the second estimate has no heading
    assert m['heading_error_deg']['median'] == pytest.approx(20.0, abs=1e-6)
    assert m['position_error_m']['fixes']['median'] == pytest.approx(25.0, abs=1e-3)
    assert m['calibration']['count'] == 2
    # 25 m north with a north sigma of 20 m: 1.25 sigma (2.5 sigma if read as east, north).
    assert m['calibration']['within_1sigma'] == 0.0
    assert m['calibration']['within_2sigma'] == 1.0
    assert m['fixes']['share'] is None and 'image' in m['fixes']['share_unavailable']


# ---------------------------------------------------------------------------------------------
# Bad input


def test_missing_topic_lists_the_bags_topics(tmp_path, capsys):
    run, _ = recorded_bags(tmp_path, 'mcap', False)
    with pytest.raises(InputError, match=r'no ground-truth topic /odom.*/gps/fix'):
        runs.evaluate_recorded(run, FIX, '/odom', tmp_path / 'out', progress=False)
    with pytest.raises(InputError, match=r'no topic /camera/left.*/camera/image_raw'):
        runs.evaluate_bag(run, '/camera/left', GT, None, None, tmp_path / 'out')
    rc = evaluate.main(['--bag', str(run), '--estimate-topic', '/nope', '--gt-topic', GT,
                        '--out', str(tmp_path / 'out')])
    err = capsys.readouterr().err
    assert rc == 2 and 'no estimate topic /nope' in err and '/cvgl/fix' in err
    assert not (tmp_path / 'out').exists()


def test_unreadable_bag_is_a_clear_error(tmp_path):
    broken = tmp_path / 'broken.mcap'
    broken.write_bytes(b'this is not an MCAP file')
    with pytest.raises(InputError, match='broken.mcap'):
        runs.evaluate_recorded(broken, FIX, GT, tmp_path / 'out', progress=False)
    with pytest.raises(InputError, match='bag not found'):
        runs.evaluate_recorded(tmp_path / 'absent', FIX, GT, tmp_path / 'out')


def test_command_line_scores_a_recorded_bag(tmp_path, capsys):
    run, _ = recorded_bags(tmp_path, 'mcap', False)
    rc = evaluate.main(['--bag', str(run), '--estimate-topic', FIX, '--gt-topic', GT,
                        '--image-topic', CAMERA, '--out', str(tmp_path / 'out'),
                        '--no-progress', '--no-plots'])
    out = capsys.readouterr().out
    assert rc == 0
    assert 'Recall@k' in out and 'not available' in out and 'share 75.0 %' in out
    assert json.loads((tmp_path / 'out' / 'metrics.json').read_text())['complete'] is True


def test_camera_mode_needs_db_and_weights(tmp_path, capsys):
    rc = evaluate.main(['--bag', str(tmp_path), '--image-topic', CAMERA, '--gt-topic', GT,
                        '--out', str(tmp_path / 'out')])
    assert rc == 2 and '--db, --weights' in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Pure functions


def test_summarize_counts_failed_and_unscored_frames():
    truth = truth_at(0.0)
    frames = [
        FrameResult(0, at(0), *truth, est_lat=truth[0], est_lon=truth[1], fix=True,
                    covariance_en=np.eye(2)),
        FrameResult(1, at(1), *truth, failure='RuntimeError: bad frame'),
        FrameResult(2, at(2)),  # no ground truth
        FrameResult(3, at(3), *truth, est_lat=offset(*truth, 0.0, 50.0)[0], est_lon=truth[1]),
    ]
    m = summarize(frames, threshold_m=25.0, fix_threshold_m=60.0)
    assert m['frames'] == {'total': 4, 'scored': 2, 'no_ground_truth': 1, 'failed': 1}
    assert m['fixes']['share'] == 0.5 and m['fixes']['precision'] == 1.0
    assert m['position_error_m']['all']['max'] == pytest.approx(50.0, abs=1e-3)
    assert m['position_error_m']['fixes']['max'] == pytest.approx(0.0, abs=1e-6)
    assert m['calibration']['within_1sigma'] == 1.0
    assert m['calibration']['expected_gaussian_within_1sigma'] == GAUSSIAN_2D_WITHIN_1SIGMA
    assert GAUSSIAN_2D_WITHIN_2SIGMA == pytest.approx(0.865, abs=1e-3)


def test_summary_counts_verified_places_and_no_fix_reasons():
    truth = truth_at(0.0)
    frames = [
        FrameResult(0, at(0), *truth, est_lat=truth[0], est_lon=truth[1], fix=True,
                    covariance_en=np.eye(2), checked=4),
        FrameResult(1, at(1), *truth, est_lat=truth[0], est_lon=truth[1], checked=10,
                    no_fix_reason='no candidate verified'),
        FrameResult(2, at(2), *truth, est_lat=truth[0], est_lon=truth[1], checked=1,
                    no_fix_reason='no candidate verified'),
        FrameResult(3, at(3), *truth, est_lat=truth[0], est_lon=truth[1],
                    no_fix_reason='retrieval confidence below min_confidence'),
        FrameResult(4, at(4), checked=50, no_fix_reason='no candidate verified'),  # no truth
    ]
    m = summarize(frames, threshold_m=25.0)
    # Over the scored frames 0-3; frame 3 was not verified at all.
    assert m['verification'] == {'frames': 3, 'candidates_per_frame_mean': 5.0,
                                 'candidates_per_frame_max': 10}
    assert m['fixes']['no_fix_reasons'] == {
        'no candidate verified': 2, 'retrieval confidence below min_confidence': 1}
    assert 'no fix' in format_summary_of(m)


def format_summary_of(metrics):
    from taco_cvgl.evaluation.report import format_summary
    return format_summary({**metrics, 'complete': True})


def test_interpolate_headings_takes_the_short_way_round():
    stamps = [at(0), at(1), at(3)]
    values = interpolate_headings(stamps, [350.0, 10.0, 90.0],
                                  [at(0.5), at(1), at(2), at(-1), at(5)], max_gap_s=1.5)
    np.testing.assert_allclose(values[:3], [0.0, 10.0, 50.0], atol=1e-9)
    assert np.isnan(values[3:]).all()
