"""The emoji builder: names, rendering, detection of emoji the font cannot draw, and the shards."""

from __future__ import annotations

import json

import numpy as np
from helpers import needs_emoji

from dalle_repro.data.emoji import EMOJI_TEST_PATH, build_emoji_dataset, read_emoji_names, render_emoji
from dalle_repro.data.samples import decode_image
from dalle_repro.data.tar import iter_shard_samples


@needs_emoji
def test_names_come_from_cldr():
    recs = {r.source: r.caption for r in read_emoji_names()}
    assert len(recs) > 3000
    assert recs["\U0001f34e"] == "red apple"
    assert recs["\U0001f469\U0001f3fd\u200d\U0001f680"] == "woman astronaut: medium skin tone"


@needs_emoji
def test_render_draws_emoji_and_rejects_what_the_font_lacks():
    apple = np.asarray(render_emoji("\U0001f34e", 32))
    assert apple.shape == (32, 32, 3)
    assert (apple[0, 0] == 255).all()  # white background
    red = (apple[..., 0] > 150) & (apple[..., 1] < 80) & (apple[..., 2] < 80)
    assert red.mean() > 0.1  # a red fruit; no other colour dominates
    assert red.mean() > ((apple[..., 2] > 150) & (apple[..., 0] < 80)).mean()
    assert render_emoji("A") is None  # no glyph in the emoji font
    assert render_emoji("\U0001fac8") is None  # Emoji 16, newer than the font
    assert render_emoji("\U0001f34e\u200d\U0001f680") is None  # a ZWJ pair the font does not ligate
    assert render_emoji("\U0001f600\U0001f600") is None  # two glyphs side by side


@needs_emoji
def test_subset_builds_shards_with_captions(emoji_dir):
    summary = json.loads((emoji_dir / "summary.json").read_text())
    assert summary["written"] == 96
    assert summary["splits"]["val"]["written"] > 0 and summary["splits"]["train"]["written"] > 0
    samples = dict(iter_shard_samples(sorted(str(p) for p in emoji_dir.rglob("*.tar"))))
    assert len(samples) == 96
    key, members = next(iter(samples.items()))
    assert key.startswith("emoji_") and members["txt"]
    im, facts = decode_image(members["png"])
    assert im.size == (16, 16) and facts["format"] == "PNG"


@needs_emoji
def test_undrawable_emoji_are_skipped_and_counted(tmp_path):
    names = tmp_path / "emoji-test.txt"
    lines = [ln for ln in open(EMOJI_TEST_PATH, encoding="utf-8") if "; fully-qualified" in ln][:5]
    lines.append("1FAC8 ; fully-qualified # \U0001fac8 E16.0 hairy creature\n")
    lines.append("1F34E 200D 1F680 ; fully-qualified # x E15.0 apple rocket\n")
    names.write_text("".join(lines), encoding="utf-8")
    s = build_emoji_dataset(tmp_path / "out", image_size=16, names_path=str(names), val_fraction=0.2)
    assert s["written"] == 5 and s["skipped"] == {"not_drawable": 2}


@needs_emoji
def test_skin_tone_variants_can_be_left_out(tmp_path):
    names = tmp_path / "emoji-test.txt"
    lines = [ln for ln in open(EMOJI_TEST_PATH, encoding="utf-8") if "; fully-qualified" in ln]
    waving = [ln for ln in lines if " waving hand" in ln]  # the hand and its 5 skin tones
    assert len(waving) == 6
    names.write_text("".join(waving), encoding="utf-8")
    every = build_emoji_dataset(tmp_path / "all", image_size=16, names_path=str(names), val_fraction=0.2)
    plain = build_emoji_dataset(
        tmp_path / "plain", image_size=16, names_path=str(names), val_fraction=0.2, skin_tones=False
    )
    assert every["written"] == 6 and plain["written"] == 1
    captions = [
        m["txt"].decode() for _, m in iter_shard_samples(sorted(str(p) for p in (tmp_path / "plain").rglob("*.tar")))
    ]
    assert captions == ["waving hand"]


@needs_emoji
def test_groups_select_and_unknown_groups_are_named(tmp_path):
    import pytest

    s = build_emoji_dataset(tmp_path / "food", image_size=16, groups=["Food & Drink"], limit=12, val_fraction=0.2)
    captions = [
        m["txt"].decode() for _, m in iter_shard_samples(sorted(str(p) for p in (tmp_path / "food").rglob("*.tar")))
    ]
    assert s["written"] == len(captions) == 12
    food = {r.caption for r in read_emoji_names() if r.meta["group"] == "Food & Drink"}
    assert set(captions) <= food
    with pytest.raises(ValueError, match="unknown emoji group.*Fod"):
        build_emoji_dataset(tmp_path / "x", image_size=16, groups=["Fod"])
