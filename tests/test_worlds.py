"""data/worlds.py and the evaluation reading either world: the reader a caption's grammar calls for."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dalle_repro.data import shapes, strokes
from dalle_repro.data.worlds import WORLDS, world_name, world_of
from dalle_repro.evaluation.evaluate import CandidateSet, attribute_accuracy, candidate_report, nearest_training
from dalle_repro.evaluation.tasks import read_back


def _renders(world, n: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    rng = np.random.default_rng(seed)
    scenes = [world.random_scene(rng, bool(i % 2)) for i in range(n)]
    images = torch.stack([torch.tensor(np.asarray(world.render(s, 32, seed=i))) for i, s in enumerate(scenes)])
    return images.permute(0, 3, 1, 2), [s.caption() for s in scenes]


def test_a_world_is_found_by_name_module_or_caption():
    assert world_of("shapes") is shapes and world_of("strokes") is strokes and world_of(strokes) is strokes
    assert world_of("a thin orange ring on the left") is strokes
    assert world_of("a big blue triangle left of a small yellow square") is shapes
    assert world_name("a thick red cross above a thin blue line") == "strokes" and world_name(shapes) == "shapes"
    for name in WORLDS:  # every world offers what the evaluation calls
        w = world_of(name)
        assert all(callable(getattr(w, f)) for f in ("parse_caption", "read_scene", "score", "similarity"))
        assert w.ATTRIBUTES == shapes.ATTRIBUTES
    with pytest.raises(ValueError, match="neither a world"):
        world_of("a small thin red circle")
    with pytest.raises(ValueError, match="not a world"):
        world_of(np)


def test_the_evaluation_reads_strokes_with_the_strokes_reader():
    images, captions = _renders(strokes, 30, seed=1)
    right = attribute_accuracy(images, captions, world="strokes")
    assert right["all"] == 1.0 and right["n"] == 30
    wrong = attribute_accuracy(images, captions[1:] + captions[:1], world="strokes")
    assert wrong["all"] < 0.2
    with pytest.raises(ValueError, match="not of the shapes grammar"):  # the default world stays shapes
        read_back(images[:1], captions[:1])
    hits = read_back(images[:4], captions[:4], world=strokes)
    assert all(h["all"] and h["colour_shape_binding"] for h in hits)


def test_the_shapes_reader_stays_the_default_and_unchanged():
    images, captions = _renders(shapes, 20, seed=2)
    assert attribute_accuracy(images, captions) == attribute_accuracy(images, captions, world="shapes")
    assert attribute_accuracy(images, captions)["all"] == 1.0
    with pytest.raises(ValueError, match="not of the strokes grammar"):
        read_back(images[:1], captions[:1], world="strokes")


def test_the_candidate_report_and_the_nearest_caption_take_the_world():
    images, captions = _renders(strokes, 6, seed=3)
    # three prompts, two candidates each: candidate 0 its own render, candidate 1 another prompt's
    cands = CandidateSet(
        captions[:3],
        torch.stack([torch.stack([images[i], images[3 + i]]) for i in range(3)]),
        torch.tensor([[0.1, 0.9], [0.9, 0.1], [0.1, 0.9]]),
    )
    rep = candidate_report(cands, attributes=True, world="strokes")
    assert rep["attributes"]["random_pick"]["all"] == 1.0
    assert rep["attributes"]["reranked"]["all"] == pytest.approx(1 / 3)
    train = ["a thick blue cross above a thin green line", "a thin orange ring on the left"]
    assert nearest_training(["a thin orange ring on the right"], train, world="strokes") == [1]
    assert nearest_training(["a thick blue cross above a thick green line"], train, world="strokes") == [0]
