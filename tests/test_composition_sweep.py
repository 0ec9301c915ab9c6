"""bench/composition_sweep.py at tiny sizes: attribute dropout and the swap contrast reach the
prior's training, a contrast scoring guides against the caption without its shape words, and a
trained dVAE folder can stand in for training one."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import bench_script

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sweep():
    return bench_script("composition_sweep")


def test_without_leaves_out_only_the_named_words(sweep):
    from dalle_repro.data import shapes, strokes

    cap = "a big red triangle left of a small blue circle"
    assert sweep.without(cap, shapes.SHAPES) == "a big red left of a small blue"
    assert sweep.without(cap, tuple(shapes.COLOURS)) == "a big triangle left of a small circle"
    assert sweep.without("a thin orange ring on the left", strokes.SHAPES) == "a thin orange on the left"


def test_a_swap_for_the_contrast_never_makes_a_held_out_pair(sweep):
    from dalle_repro.data import shapes

    swap = sweep.swapped_caption
    assert (
        swap("a big red circle left of a small yellow square", shapes)
        == "a big red square left of a small yellow circle"
    )
    assert swap("a big red circle left of a small blue triangle", shapes) is None  # red triangle is held out
    assert swap("a big red circle left of a small yellow circle", shapes) is None  # one shape: nothing to swap
    assert swap("a big red circle on the left", shapes) is None
    for c in [shapes.random_scene(np.random.default_rng(i), False).caption() for i in range(300)]:
        if (w := swap(c, shapes)) is not None:
            assert not shapes.parse_caption(w).pairs() & set(shapes.HELD_OUT)


class _Spy(torch.nn.Module):
    """Stands in for the prior's generate: records the unconditional rows it is given."""

    def __init__(self, grid: int):
        super().__init__()
        self.args = type("A", (), {"grid": grid})()
        self.unconds: list[torch.Tensor] = []

    def generate(self, rows, temperature, uncond, guidance, generator):
        self.unconds.append(uncond)
        return torch.zeros(len(rows), self.args.grid**2, dtype=torch.long)


class _Blank:
    def decode(self, t):
        return torch.ones(len(t), 3, 32, 32)


def test_a_contrast_score_guides_against_the_caption_without_its_shape_words(sweep):
    from dalle_repro.data.tokenizer import TextTokenizer, train_bpe

    caps = ["a big red triangle on the left", "a small blue square above a big green circle"]
    tok = TextTokenizer(train_bpe(caps * 4, 300, 1), 16)
    spy = _Spy(4)
    sweep.score_prior(spy, _Blank(), tok, caps, 2, 0, torch.device("cpu"), guidance=3.0, contrast="shape")
    rows = spy.unconds[0].tolist()
    assert rows[0] == rows[1] == tok.encode("a big red on the left")
    assert rows[2] == tok.encode("a small blue above a big green")
    sweep.score_prior(spy, _Blank(), tok, caps, 2, 0, torch.device("cpu"))
    assert all(r == tok.encode("") for r in spy.unconds[1].tolist())


def test_a_quick_sweep_trains_with_word_dropout_from_a_saved_dvae_and_scores_each_way(sweep, tmp_path):
    from dalle_repro.core.config import load_config
    from dalle_repro.models.dvae import DVAE
    from dalle_repro.train.dvae import DVAETrainConfig

    cfg = load_config(DVAETrainConfig, ROOT / "configs" / "demo" / "dvae.yaml", [])
    DVAE(cfg.model).save_pretrained(tmp_path / "dvae")
    out = tmp_path / "sweep"
    args = ["--out", str(out), "--quick", "--workers", "1", "--dvae-from", f"mine={tmp_path / 'dvae'}"]
    args += ["--prior", "wd:word_drop=0.5,swap_weight=1", "--score", "g2:guidance=2"]
    args += ["--score", "cs3:guidance=3,contrast=shape"]
    assert sweep.main(args) == 0
    result = json.loads((out / "sweep.json").read_text())
    assert list(result["dvae"]) == ["mine"] and result["dvae"]["mine"]["from"] == str(tmp_path / "dvae")
    prior = result["prior"]["wd"]
    assert prior["dvae"] == "mine" and set(prior["scores"]) == {"g2", "cs3"}
    assert prior["seen"] == prior["scores"]["g2"]["seen"]


def test_the_swap_contrast_adds_to_the_loss_only_on_eligible_rows(sweep):
    from dalle_repro.models.transformer import TransformerArgs

    margs = TransformerArgs(dim=32, depth=2, heads=4, text_len=8, text_vocab=40, grid=4, image_vocab=16, conv_kernel=3)
    settings = {
        "optim": {},
        "schedule": {"lr": 1e-3, "lr_end": 1e-4, "warmup_steps": 1},
        "run": {"steps": 1, "caption_dropout": 0.0},
        "data": {"batch_size": 4},
        "ranks": 1,
    }
    g = torch.Generator().manual_seed(0)
    text, image = torch.randint(1, 40, (6, 8), generator=g), torch.randint(0, 16, (6, 16), generator=g)
    other, empty = torch.randint(1, 40, (6, 8), generator=g), torch.zeros(1, 8, dtype=torch.long)

    def last_loss(eligible: bool, weight: float) -> float:
        swap = (other, torch.full((6,), eligible))
        _, info = sweep.train_prior(
            settings, text, image, empty, margs, torch.device("cpu"), 0, swap=swap, swap_weight=weight
        )
        return info["last_loss"]

    plain = last_loss(True, 0.0)
    assert last_loss(False, 1.0) == plain  # no eligible row: the model's own loss
    assert last_loss(True, 1.0) > plain + 0.1  # softplus of a log-likelihood ratio near 0: about log 2
