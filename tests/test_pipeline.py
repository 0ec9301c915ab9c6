"""Stages 1 and 2 joined: emoji shards -> dVAE -> token shards -> loader with tokenizer -> the prior learns."""

from __future__ import annotations

import torch

from dalle_repro.core.precision import PrecisionArgs
from dalle_repro.data.loader import DataArgs, Loader
from dalle_repro.data.pre_encode import encode_token_shards
from dalle_repro.data.tokenizer import TextTokenizer
from dalle_repro.models.dvae import DVAE, DVAEArgs
from dalle_repro.models.transformer import Transformer, TransformerArgs


def test_token_shards_feed_the_prior(emoji_dir, tokenizer_path, tmp_path):
    torch.manual_seed(0)
    dvae = DVAE(DVAEArgs(image_size=16, n_hid=8, n_blk_per_group=1, group_count=3, vocab_size=32, n_init=8))
    dvae.save_pretrained(tmp_path / "dvae")
    shards = sorted(str(p) for p in emoji_dir.rglob("*.tar"))
    summary = encode_token_shards(tmp_path / "dvae", shards, tmp_path / "tokens", batch_size=16)
    assert summary["written"] == 96 and summary["grid"] == 4
    tok = TextTokenizer(tokenizer_path, text_len=12)
    loader = Loader(
        str(tmp_path / "tokens" / "train" / "*.tar"),
        DataArgs(kind="tokens", batch_size=8, num_workers=0, seed=1),
        tok,
        text_dropout=0.1,
    )
    args = TransformerArgs(
        dim=32, depth=4, heads=4, text_len=12, text_vocab=tok.vocab_size, grid=4, image_vocab=32, conv_kernel=3
    )
    model = Transformer(args)
    scaler = model.enable_precision(PrecisionArgs(dtype="bf16"))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for step, batch in enumerate(loader, start=1):
        assert batch["text"].shape == (8, 12) and batch["image_tokens"].shape == (8, 4, 4)
        out = model.loss(batch["text"], batch["image_tokens"].flatten(1))
        opt.zero_grad()
        out.loss.backward()
        assert scaler.end_step(model.branch_params(), step) == ([], False)
        opt.step()
        losses.append(out.loss.item())
        if step == 40:
            break
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5
    model.eval()
    text = tok.encode_batch(["red apple", "grinning face"])
    images = dvae.decode(model.generate(text, temperature=1.0, top_k=8).view(2, 4, 4))
    assert images.shape == (2, 3, 16, 16) and 0 <= images.min() and images.max() <= 1
