"""evaluation/tasks.py and the candidate report built on it: Wilson intervals, GenEval's tasks on the
shapes grammar, what CLIP's pick adds, and the dVAE's codebook usage."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dalle_repro.data.shapes import Obj, Scene, parse_caption, random_scene, render
from dalle_repro.evaluation.evaluate import CandidateSet, candidate_report
from dalle_repro.evaluation.tasks import TASKS, fmt, read_back, share, summarize, task_hits, wilson
from dalle_repro.models.dvae import codebook_usage


def test_wilson_matches_reference_values_and_stays_in_bounds():
    stats = pytest.importorskip("scipy.stats")
    for k, n in [(5, 10), (0, 10), (10, 10), (48, 96), (17, 96), (1, 3)]:
        ref = stats.binomtest(k, n).proportion_ci(method="wilson")
        assert wilson(k, n) == pytest.approx((ref.low, ref.high), abs=1e-12)
    assert wilson(10, 10)[1] == 1.0 and wilson(0, 10)[0] == 0.0
    assert wilson(0, 0) == (0.0, 1.0)
    lo24, hi24 = wilson(12, 24)
    lo96, hi96 = wilson(48, 96)
    assert hi96 - lo96 < 0.21 < hi24 - lo24  # 96 captions: about +-10 points at 50%; 24: about +-19
    with pytest.raises(ValueError):
        wilson(3, 2)


def test_task_verdicts_follow_the_scene():
    one = parse_caption("a small red circle on the left")
    two = parse_caption("a big blue triangle left of a small yellow square")
    right = {"count": True, "shape": False, "colour": True, "size": True, "place": True, "all": False}
    h1, h2 = task_hits(one, right), task_hits(two, right)
    assert h1["one_object"] is False and h1["two_objects"] is None
    assert h2["two_objects"] is False and h2["one_object"] is None
    assert h1["colour"] and h1["position"] and h1["counting"] and not h1["colour_shape_binding"]
    s = summarize([h1 | right, h2 | right])
    assert s["one_object"]["n"] == 1 and s["two_objects"]["n"] == 1 and s["counting"]["n"] == 2
    assert s["colour"]["rate"] == 1.0 and s["colour_shape_binding"]["rate"] == 0.0
    assert s["overall"] == pytest.approx(np.mean([s[t]["rate"] for t in TASKS]))
    assert fmt(share([True, False])).startswith("50.0% [")


def _renders(scenes):
    ims = [torch.tensor(np.asarray(render(s, 32, seed=i))).permute(2, 0, 1) for i, s in enumerate(scenes)]
    return torch.stack(ims)


def test_candidate_report_reads_each_candidate_and_credits_clip_only_for_its_choice():
    """Two candidates per caption: the right render and another caption's render. When the scores
    prefer the right one, CLIP's pick is all right and its gain over the random pick (candidate 0,
    the wrong one) is the whole share; with the scores reversed the gain is minus that."""
    rng = np.random.default_rng(3)
    scenes = [random_scene(rng, False) for _ in range(12)]
    right, other = _renders(scenes), _renders(scenes[1:] + scenes[:1])
    images = torch.stack([other, right], 1)  # (P, 2, 3, 32, 32): candidate 0 is wrong
    captions = [s.caption() for s in scenes]
    good = candidate_report(CandidateSet(captions, images, torch.tensor([[0.1, 0.9]] * 12)), attributes=True)
    assert good["tasks"]["reranked"]["all"]["rate"] == 1.0
    assert good["tasks"]["random_pick"]["all"]["rate"] < 0.3
    assert good["clip_gain"]["all"] == pytest.approx(1.0 - good["tasks"]["random_pick"]["all"]["rate"])
    assert good["attributes"]["reranked"]["all"] == 1.0 and good["attributes"]["reranked"]["n"] == 12
    assert good["tasks"]["all_candidates"]["all"]["n"] == 24
    lo, hi = good["tasks"]["reranked"]["all"]["ci"]
    assert lo < 1.0 == hi  # 12 of 12: the interval still admits less
    bad = candidate_report(CandidateSet(captions, images, torch.tensor([[0.9, 0.1]] * 12)), attributes=True)
    assert bad["clip_gain"]["all"] == pytest.approx(0.0)
    assert bad["best_of_n"]["2"]["all_attributes_right"] == bad["tasks"]["reranked"]["all"]["rate"]
    # The reader's pick finds the right candidate whatever CLIP scores; with none right it is CLIP's.
    assert good["tasks"]["reader_pick"]["all"]["rate"] == bad["tasks"]["reader_pick"]["all"]["rate"] == 1.0
    none = candidate_report(
        CandidateSet(captions, torch.stack([other, other], 1), torch.tensor([[0.3, 0.7]] * 12)), attributes=True
    )
    assert none["tasks"]["reader_pick"] == none["tasks"]["reranked"]


def test_read_back_gives_attributes_and_tasks_per_image():
    scene = Scene((Obj("triangle", "red", "big"),), "on the right")
    hits = read_back(_renders([scene]), [scene.caption()])
    assert hits[0]["all"] and hits[0]["one_object"] and hits[0]["colour_shape_binding"]
    with pytest.raises(ValueError, match="1 images for 2 captions"):
        read_back(_renders([scene]), [scene.caption()] * 2)


def test_shapes_drawn_swapped_between_two_objects_are_counted_as_the_binding_failure():
    """ "a big red triangle left of a big blue circle" drawn as a red circle and a blue triangle: both
    colours and the relation right, shape wrong, and counted as swapped; drawn right, or with one
    shape wrong, it is not; a caption of two alike shapes cannot be swapped."""
    caption = "a big red triangle left of a big blue circle"
    swapped = Scene((Obj("circle", "red", "big"), Obj("triangle", "blue", "big")), "left of")
    one_wrong = Scene((Obj("square", "red", "big"), Obj("circle", "blue", "big")), "left of")
    same = "a big red circle left of a big blue circle"
    hits = read_back(
        _renders([swapped, parse_caption(caption), one_wrong, parse_caption(same)]), [caption] * 3 + [same]
    )
    assert hits[0]["colour"] and hits[0]["position"] and not hits[0]["shape"] and hits[0]["shapes_swapped"]
    assert hits[1]["all"] and hits[1]["shapes_swapped"] is False
    assert hits[2]["shapes_swapped"] is False and hits[3]["shapes_swapped"] is None
    s = summarize(hits)
    assert s["shapes_swapped"]["k"] == 1 and s["shapes_swapped"]["n"] == 3
    assert s["overall"] == pytest.approx(np.mean([s[t]["rate"] for t in TASKS if s[t]["n"]]))  # not a task


def test_codebook_usage_counts_codes_and_perplexity():
    u = codebook_usage(torch.tensor([5, 5, 0, 0]))
    assert u["codes_used"] == 2 and u["codebook_size"] == 4 and u["perplexity"] == pytest.approx(2.0)
    assert codebook_usage(torch.tensor([7, 0, 0]))["perplexity"] == pytest.approx(1.0)
    assert codebook_usage(torch.zeros(3, dtype=torch.long)) == {"codes_used": 0, "codebook_size": 3, "perplexity": 0.0}


def test_the_report_shows_intervals_tasks_and_the_dvae_ceiling():
    from dalle_repro.demo.report import zero_shot_section

    rng = np.random.default_rng(4)
    scenes = [random_scene(rng, True) for _ in range(6)]
    images = _renders(scenes)[:, None]
    captions = [s.caption() for s in scenes]
    rep = candidate_report(CandidateSet(captions, images, torch.ones(6, 1)), attributes=True)
    reader = summarize(read_back(images[:, 0], captions))
    usage = {"psnr": 25.0, "codes_used": 40, "codebook_size": 512, "perplexity": 21.5}
    rep |= {"ceilings": {"reader": reader, "dvae": reader | usage}, "fd_clip": 0.1}
    md = "\n".join(zero_shot_section({"splits": {"heldout": rep}}))
    assert "100.0% [61.0, 100.0]" in md  # 6 of 6, with its interval
    assert "| colour shape binding | 100.0% [" in md and "(+0.0)" in md
    assert "| a failure: shapes swapped (lower is better) | n/a |" in md  # six lone objects: none applies
    assert "| heldout | 100.0% [61.0, 100.0] | 100.0% [61.0, 100.0] | 25.0 dB | 40 / 512 | 22 |" in md
