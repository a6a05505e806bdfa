"""The built-in demo end to end at a reduced size: data, training, map, flight, node, scores."""

import json
import subprocess
import sys

import numpy as np
import pytest
from taco_cvgl.evaluation.ground_truth import read_headings
from taco_cvgl.files.bags import list_topics, read_navsat
from taco_cvgl.geo.geodesy import angle_difference_deg
from taco_cvgl.mapdb.database import EmbeddingDatabase


@pytest.mark.e2e
def test_demo_pipeline_reduced(tmp_path):
    out = tmp_path / 'demo'
    run = subprocess.run(
        [sys.executable, '-m', 'taco_cvgl.cli.main', 'demo', '--out', str(out),
         '--region-fraction', '0.25', '--train-minutes', '0.25', '--train-epochs', '1',
         '--views-per-place', '1', '--frames', '10', '--calibration-frames', '12', '--rate', '5',
         '--no-progress'], capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    for step in ('1/6', '2/6', '3/6', '4/6', '5/6', '6/6'):
        assert '[demo ' in run.stdout and f'{step} ' in run.stdout
    assert 'Recall@1 within one grid stride' in run.stdout
    assert 'Recall@1 of the image embedding alone' in run.stdout
    # The flight is a real rosbag2 with camera images and ground truth.
    topics = list_topics(out / 'flight')
    assert topics['/camera/image_raw'] == 'sensor_msgs/msg/Image'
    assert topics['/gps/fix'] == 'sensor_msgs/msg/NavSatFix'
    assert len(read_navsat(out / 'flight', '/gps/fix')) == 10
    # Its simulated compass: the true heading, 3 degrees of bias, 2 of noise (4 sigma here).
    assert topics['/imu/data'] == 'sensor_msgs/msg/Imu'
    _, truth = read_headings(out / 'flight', '/gps/heading')
    _, compass = read_headings(out / 'flight', '/imu/data')
    assert len(compass) == 10
    assert (np.abs(angle_difference_deg(compass, truth) - 3.0) < 8.0).all()
    # The weights came from the training command and built the map the node used.
    db = EmbeddingDatabase.load(out / 'map' / 'map.npz')
    assert (out / 'train' / 'weights.safetensors').is_file()
    assert db.meta['gsd_m'] == pytest.approx(96 * 30 / 256)
    # The node ran as its own process and what it published was recorded and scored.
    assert 'ready:' in (out / 'node.log').read_text()
    summary = json.loads((out / 'summary.json').read_text())
    live, offline = summary['live'], summary['offline']
    assert live['complete'] and offline['complete']
    assert offline['frames']['scored'] == 10
    assert live['mode'] == 'recorded' and offline['mode'] == 'localizer'
    assert offline['recall_retrieval_only']['available']
    # Offline with the compass (every frame has its prior) and without it (rotations tried).
    assert offline['heading_prior']['frames_with'] == 10
    no_compass = summary['offline_no_compass']
    assert no_compass['heading_prior']['frames_with'] == 0
    assert 'tta' in no_compass['heading_prior']['localizer_sources']
    assert 'confidence' in offline and 'within_3sigma' in offline['calibration']
    assert not live['recall_retrieval_only']['available']
    # The node answered the frames (publish_no_fix is on; it may skip one it fell behind on).
    assert live['fixes']['count'] + live['frames']['no_fix_messages'] >= 8
    for name in ('track.png', 'error_cdf.png', 'error_along_track.png', 'retrieval_grid.png'):
        assert (out / 'eval_offline' / name).stat().st_size > 10_000
