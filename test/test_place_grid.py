"""The places' grid answers box queries exactly as a scan over every place would."""

import numpy as np
import pytest
from taco_cvgl.geo.place_grid import PlaceGrid


def scan(enu, low, high):
    """Return the indices inside the box by testing every place (the reference)."""
    return np.flatnonzero(np.all((enu >= low) & (enu <= high), axis=1))


def test_a_box_query_returns_what_a_scan_returns():
    rng = np.random.default_rng(0)
    enu = np.concatenate([rng.uniform(-5000, 5000, (3000, 2)),     # scattered places
                          np.stack(np.meshgrid(np.arange(-500, 500, 50.0),    # a grid map,
                                               np.arange(-500, 500, 50.0)), -1).reshape(-1, 2),
                          [[0.0, 0.0], [0.0, 0.0]]])               # with a repeated place
    grid = PlaceGrid(enu, cell_m=200.0)
    for _ in range(200):
        centre = rng.uniform(-6000, 6000, 2)
        reach = rng.uniform(0, 3000, 2)
        got = grid.within(centre - reach, centre + reach)
        assert np.array_equal(got, scan(enu, centre - reach, centre + reach))
    # Boxes whose sides fall on cell edges and on places themselves (inclusive bounds).
    assert np.array_equal(grid.within([-500, -500], [-450, -450]),
                          scan(enu, [-500, -500], [-450, -450]))
    assert len(grid.within([0, 0], [0, 0])) >= 3       # the grid's (0, 0) and the two copies
    # A box far from every place, an empty box, a non-finite box.
    assert len(grid.within([1e6, 1e6], [1e6 + 10, 1e6 + 10])) == 0
    assert len(grid.within([10, 10], [0, 0])) == 0
    assert len(grid.within([np.nan, 0], [1, 1])) == 0


def test_a_box_wider_than_the_map_is_answered_by_one_scan():
    enu = np.array([[0.0, 0.0], [100.0, 50.0], [-30.0, 900.0]])
    grid = PlaceGrid(enu, cell_m=1.0)                  # millions of cells in the box below
    assert grid.within([-1e5, -1e5], [1e5, 1e5]).tolist() == [0, 1, 2]
    assert grid.within([-40.0, 0.0], [100.0, 50.0]).tolist() == [0, 1]


def test_a_cell_size_must_be_positive():
    with pytest.raises(ValueError, match='cell_m'):
        PlaceGrid(np.zeros((2, 2)), 0.0)
