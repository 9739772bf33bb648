import itertools

import pytest

from lib.core.sharding import all_ranges, compress_indices, contiguous_range


@pytest.mark.parametrize("n,parts", [(0, 1), (1, 1), (10, 3), (7755, 4), (5, 5), (1000003, 64)])
def test_ranges_tile_exactly(n, parts):
    ranges = all_ranges(n, parts)
    assert ranges[0][0] == 0 and ranges[-1][1] == n
    for (_, a_stop), (b_start, _) in itertools.pairwise(ranges):
        assert a_stop == b_start
    sizes = [b - a for a, b in ranges]
    assert max(sizes) - min(sizes) <= 1


def test_range_is_deterministic_and_checked():
    assert contiguous_range(10, 0, 3) == (0, 4)
    assert contiguous_range(10, 2, 3) == (7, 10)
    with pytest.raises(ValueError, match="outside"):
        contiguous_range(10, 3, 3)
    with pytest.raises(ValueError, match=">= 1"):
        contiguous_range(10, 0, 0)


def test_compress_indices():
    assert compress_indices([0, 1, 2, 3, 7, 9, 10, 11, 12]) == "0-3,7,9-12"
    assert compress_indices({5}) == "5"
    assert compress_indices([3, 1, 2, 2]) == "1-3"
    assert compress_indices([]) == ""
