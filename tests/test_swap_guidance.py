"""bench/swap_guidance.py: the two-negative sampler is the model's own guided sampler when the swapped
caption weighs nothing, and the captions and their swaps follow the grammar."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import bench_script

from dalle_repro.data.shapes import HELD_OUT, parse_caption
from dalle_repro.models.transformer import Transformer, TransformerArgs

ROOT = Path(__file__).resolve().parents[1]


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


def _model() -> Transformer:
    torch.manual_seed(0)
    args = TransformerArgs(dim=32, depth=2, heads=4, text_len=8, text_vocab=50, grid=4, image_vocab=32, conv_kernel=3)
    return Transformer(args).eval()


def test_with_no_weight_on_the_swap_it_draws_what_generate_draws(bench):
    model = _model()
    text = torch.randint(1, 50, (6, 8))
    empty, neg = torch.zeros(1, 8, dtype=torch.long), torch.randint(1, 50, (6, 8))
    ref = model.generate(text, temperature=0.7, uncond=empty, guidance=2.0, generator=torch.Generator().manual_seed(3))
    got = bench.sample_two_negatives(model, text, empty, neg, 2.0, 0.0, 0.7, torch.Generator().manual_seed(3))
    assert torch.equal(got, ref)
    pushed = bench.sample_two_negatives(model, text, empty, neg, 2.0, 4.0, 0.0, torch.Generator().manual_seed(3))
    greedy = model.generate(text, temperature=0.0, uncond=empty, guidance=2.0)
    assert not torch.equal(pushed, greedy)  # the swapped caption's push changes the drawing
