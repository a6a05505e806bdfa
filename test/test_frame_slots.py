"""The node's frame slots: the newest frame of each camera, a dropped frame counted once."""

import threading
import time

from taco_cvgl.ros.slots import FrameSlots


def test_a_newer_frame_replaces_the_waiting_one_and_counts_as_a_drop():
    slots = FrameSlots(3)
    assert slots.put(0, 'a0') is False and slots.put(2, 'c0') is False
    assert slots.put(0, 'a1') is True            # a0 never reached the worker
    with slots.cond:
        assert slots.waiting()
    taken = slots.take()
    assert [(camera, frame) for camera, (frame, _) in taken] == [(0, 'a1'), (2, 'c0')]
    assert slots.take() == []
    with slots.cond:
        assert not slots.waiting()


def test_arrival_times_are_monotonic_clock_times():
    slots = FrameSlots(1)
    before = time.monotonic()
    slots.put(0, 'x')
    (_, (_, arrived)), = slots.take()
    assert before <= arrived <= time.monotonic()


def test_reset_empties_and_resizes():
    slots = FrameSlots(2)
    slots.put(1, 'b')
    slots.reset()
    assert slots.take() == []
    slots.reset(4)
    slots.put(3, 'd')
    assert [camera for camera, _ in slots.take()] == [3]


def test_every_frame_is_either_taken_or_dropped_under_threads():
    slots, cameras, per_camera = FrameSlots(4), 4, 500
    stats = {'dropped': 0, 'taken': 0}
    done = threading.Event()

    def worker():
        while True:
            with slots.cond:
                slots.cond.wait_for(lambda: slots.waiting() or done.is_set(), 0.01)
            taken = slots.take()
            stats['taken'] += len(taken)
            if not taken and done.is_set():
                return

    thread = threading.Thread(target=worker)
    thread.start()
    for k in range(per_camera):
        for camera in range(cameras):
            stats['dropped'] += int(slots.put(camera, (camera, k)))
    done.set()
    thread.join(timeout=10)
    assert stats['taken'] + stats['dropped'] == cameras * per_camera
