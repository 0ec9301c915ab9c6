"""The small CLIP's hard negative captions (train/hard_negatives.py) and its contrastive loss."""

from __future__ import annotations

import pytest
import torch

from dalle_repro.data.tar import shard_captions
from dalle_repro.train.clip import contrastive_loss
from dalle_repro.train.hard_negatives import HardNegatives, caption_neighbours

CAPTIONS = [
    "a big red circle on the left",
    "a big blue circle on the left",
    "a small red circle on the left",
    "a big red circle at the top",  # two words differ from the first: not a neighbour
    "a big red circle left of a small blue square",
    "a big blue circle left of a small red square",  # the colours exchanged
    "a big red square left of a small blue circle",  # the shapes exchanged
    "a big red circle left of a small blue square",  # a repeat counts once
]


def test_neighbours_are_one_word_replaced_or_two_exchanged():
    near = caption_neighbours(CAPTIONS)
    assert near["a big red circle on the left"] == ["a big blue circle on the left", "a small red circle on the left"]
    assert near["a big red circle at the top"] == []
    assert near["a big red circle left of a small blue square"] == [
        "a big blue circle left of a small red square",
        "a big red square left of a small blue circle",
    ]
    assert all(c not in v for c, v in near.items())
    assert caption_neighbours(reversed(CAPTIONS)) == near


def test_draw_is_seeded_by_step_and_pads_masked():
    neg = HardNegatives(caption_neighbours(CAPTIONS), k=2, seed=0)
    caps = ["a big red circle on the left", "a big red circle at the top", "a big blue circle on the left"]
    flat, mask = neg.draw(caps, step=5)
    assert mask.tolist() == [[True, True], [False, False], [True, False]]
    assert set(flat[:2]) == {"a big blue circle on the left", "a small red circle on the left"}
    assert flat[2:4] == [caps[1]] * 2 and flat[4:] == ["a big red circle on the left", caps[2]]
    again, again_mask = neg.draw(caps, step=5)  # a resumed run draws what the whole one did
    assert again == flat and (again_mask == mask).all()
    many = CAPTIONS[:1] * 64
    assert neg.draw(many, 1)[0] != neg.draw(many, 2)[0]  # another step, another order


def test_loss_without_negatives_is_clips_own():
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    tower = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=50, max_position_embeddings=8, **tower),
        vision_config=dict(image_size=16, patch_size=8, **tower),
        projection_dim=8,
    )
    model = CLIPModel(cfg).eval()
    ids, pix = torch.randint(0, 50, (4, 8)), torch.randn(4, 3, 16, 16)
    out = model(input_ids=ids, pixel_values=pix, return_loss=True)
    assert torch.allclose(contrastive_loss(out.logits_per_image), out.loss, atol=1e-6)


def test_negatives_enter_only_their_own_images_softmax():
    torch.manual_seed(0)
    b, k = 3, 2
    logits = torch.randn(b, b + b * k)
    plain = contrastive_loss(logits[:, :b])
    off = torch.zeros(b, k, dtype=torch.bool)
    assert torch.allclose(contrastive_loss(logits, off), plain)  # masked out: nothing changes
    on = off.clone()
    on[1, 0] = True
    boosted = logits.clone()
    boosted[1, b + 1 * k + 0] = 20.0  # image 1's own first negative, made very similar
    assert contrastive_loss(boosted, on) > plain + 1
    other = logits.clone()
    other[1, b + 0 * k + 0] = 20.0  # image 0's negative, in image 1's row: not image 1's
    assert torch.allclose(contrastive_loss(other, on), contrastive_loss(logits, on))


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    from dalle_repro.data.shapes import build_shapes_dataset

    out = tmp_path_factory.mktemp("shapes")
    build_shapes_dataset(out, n_train=160, n_heldout=8, image_size=16, shard_size=40)
    return out


def test_shard_captions_reads_the_captions_alone(shapes_dir):
    from dalle_repro.data.shapes import parse_caption
    from dalle_repro.data.sources import expand_shards

    caps = shard_captions(expand_shards(f"{shapes_dir}/train/*.tar"), limit=50)
    assert len(caps) == 50 and all(parse_caption(c) for c in caps)


@pytest.fixture(scope="module")
def shapes_tokenizer(shapes_dir, tmp_path_factory):
    from dalle_repro.data.tokenizer import save_tokenizer, train_bpe

    tok = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    save_tokenizer(train_bpe(shard_captions(sorted(map(str, shapes_dir.glob("train/*.tar"))), 1000), 300), tok)
    return tok


def _clip_config(shapes_dir, tokenizer, run, *extra):
    from helpers import clip_overrides

    from dalle_repro.core.config import load_config
    from dalle_repro.train.clip import ClipTrainConfig

    over = clip_overrides(shapes_dir, tokenizer, run, "data.hard_negatives=3", *extra, text_len=16)
    return load_config(ClipTrainConfig, None, over)


def test_a_run_with_hard_negatives_resumes_exactly(shapes_dir, shapes_tokenizer, tmp_path):
    from safetensors.torch import load_file

    from dalle_repro.train.clip import train_clip

    tok = shapes_tokenizer
    whole = train_clip(_clip_config(shapes_dir, tok, tmp_path / "whole"))
    assert whole["ended"] == "done" and whole["step"] == 4
    part = train_clip(_clip_config(shapes_dir, tok, tmp_path / "split", "run.stop_after=2"))
    assert part["step"] == 2 and part["ended"] == "stop_after"
    train_clip(_clip_config(shapes_dir, tok, tmp_path / "split"), resume_run=True)
    a = load_file(tmp_path / "whole" / "clip" / "model.safetensors")
    b = load_file(tmp_path / "split" / "clip" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_time_plan_times_a_step_with_its_hard_negatives(shapes_dir, shapes_tokenizer, tmp_path, monkeypatch):
    """The demo's plan times the CLIP's step as configured: with K hard negatives the text tower runs
    on (1 + K) captions per image, and the timed step's loss sees them all."""
    import dalle_repro.train.clip as clip_train
    from dalle_repro.demo.plan import clip_step_seconds

    shapes = []
    loss = clip_train.contrastive_loss
    monkeypatch.setattr(clip_train, "contrastive_loss", lambda x, n=None: shapes.append(x.shape) or loss(x, n))

    tok = shapes_tokenizer
    cfg = _clip_config(shapes_dir, tok, tmp_path / "run")
    assert cfg.data.hard_negatives == 3
    assert 0 < clip_step_seconds(cfg, str(tok), warm=0, timed=1) < 60
    assert shapes == [(8, 8 * 4)]  # batch 8 images against 8 captions and 3 negatives each
