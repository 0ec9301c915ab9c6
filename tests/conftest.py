"""Shared fixtures: small data sets made on the spot (no downloads)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from dalle_repro.data.emoji import EMOJI_TEST_PATH, FONT_PATH


@pytest.fixture(scope="session")
def emoji_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small emoji data set: 96 emoji at 16x16, 8 per shard, 20% validation."""
    if not (Path(FONT_PATH).is_file() and Path(EMOJI_TEST_PATH).is_file()):
        pytest.skip("needs Debian's fonts-noto-color-emoji and unicode-data")
    from dalle_repro.data.emoji import build_emoji_dataset

    out = tmp_path_factory.mktemp("emoji")
    build_emoji_dataset(out, image_size=16, shard_size=8, val_fraction=0.2, limit=96)
    return out


@pytest.fixture(scope="session")
def tokenizer_path(emoji_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from dalle_repro.data.tokenizer import save_tokenizer, train_from_shards

    tok, _ = train_from_shards(sorted(str(p) for p in (emoji_dir / "train").glob("*.tar")), 600, progress=False)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    save_tokenizer(tok, path)
    return path


@pytest.fixture
def copy_tree():
    def _copy(src: Path, dst: Path) -> Path:
        shutil.copytree(src, dst)
        return dst

    return _copy


@pytest.fixture(scope="session")
def prior_data(emoji_dir: Path, tokenizer_path: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A random tiny dVAE (16x16 -> 4x4 codes of 32) and the emoji encoded with it."""
    import torch

    from dalle_repro.data.pre_encode import encode_token_shards
    from dalle_repro.models.dvae import DVAE, DVAEArgs

    root = tmp_path_factory.mktemp("prior_data")
    torch.manual_seed(0)
    dvae = DVAE(DVAEArgs(image_size=16, n_hid=8, n_blk_per_group=1, group_count=3, vocab_size=32, n_init=8))
    dvae.save_pretrained(root / "dvae")
    shards = sorted(str(p) for p in emoji_dir.glob("*/*.tar"))
    encode_token_shards(root / "dvae", shards, root / "tokens")
    return {"dvae": root / "dvae", "tokens": root / "tokens", "tokenizer": tokenizer_path}


@pytest.fixture(scope="session")
def clip_dir(emoji_dir: Path, tokenizer_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tools/train_clip.py's library call, a few steps at a tiny size."""
    from helpers import clip_overrides

    from dalle_repro.core.config import load_config
    from dalle_repro.train.clip import ClipTrainConfig, train_clip

    run = tmp_path_factory.mktemp("clip") / "run"
    cfg = load_config(ClipTrainConfig, None, clip_overrides(emoji_dir, tokenizer_path, run))
    metrics = train_clip(cfg)
    assert 0 <= metrics["image_to_text_top1"] <= 1 and metrics["val_pairs"] > 0
    return run / "clip"
