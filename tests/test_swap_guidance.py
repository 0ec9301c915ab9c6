"""bench/swap_guidance.py: the captions and their swaps follow the grammar (its sampler, generate's
``negatives``, is tested in test_sampling.py)."""

from __future__ import annotations

import pytest
from helpers import bench_script

from dalle_repro.data.shapes import HELD_OUT, parse_caption


@pytest.fixture(scope="module")
def bench():
    return bench_script("swap_guidance")


def test_captions_have_two_shapes_two_colours_and_swap_their_shapes(bench):
    held = bench.two_shape_captions("shapes", True, 12, 0)
    assert len(set(held)) == 12
    for c in held:
        a, b = parse_caption(c).objects
        assert a.shape != b.shape and a.colour != b.colour
        assert {(a.colour, a.shape), (b.colour, b.shape)} & set(HELD_OUT)
    s = parse_caption("a big red triangle left of a small blue circle").shapes_swapped()
    assert s.caption() == "a big red circle left of a small blue triangle"
    assert parse_caption("a big red triangle left of a small red circle").shapes_swapped() is None
