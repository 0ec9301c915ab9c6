"""The prior as a classifier (sample/likelihood.py): the teacher-forced likelihood agrees with the cached
decoder the sampler uses, and the two caption scores are what their docstrings say."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import bench_script

from dalle_repro.data.tokenizer import TextTokenizer
from dalle_repro.models.transformer import Transformer, TransformerArgs
from dalle_repro.sample.likelihood import caption_scores, image_log_likelihood


@pytest.fixture(scope="module")
def model_tok(tokenizer_path: Path) -> tuple[Transformer, TextTokenizer]:
    torch.manual_seed(0)
    tok = TextTokenizer(tokenizer_path, 8)
    args = TransformerArgs(
        dim=32, depth=4, heads=4, text_len=8, text_vocab=tok.vocab_size, grid=4, image_vocab=32, conv_kernel=3
    )
    return Transformer(args).eval(), tok


def cached_log_likelihood(model: Transformer, text: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """The same sum, token by token through the sampler's caches."""
    caches = model.new_caches(text.shape[0])
    logits = model.start_decoding(text, caches)
    total = torch.zeros(text.shape[0])
    for i in range(tokens.shape[1]):
        total += torch.log_softmax(logits.float(), -1).gather(1, tokens[:, i : i + 1]).squeeze(1)
        if i + 1 < tokens.shape[1]:
            logits = model.decode_step(tokens[:, i], i, caches)
    return total


def test_teacher_forced_likelihood_equals_the_cached_decoders(model_tok):
    model, tok = model_tok
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 32, (5, 16), generator=g)
    text = torch.tensor([tok.encode("red heart")] * 5)
    got = image_log_likelihood(model, text, tokens, batch=2)  # batches of 2, 2 and 1
    assert got.shape == (5,)
    torch.testing.assert_close(got, cached_log_likelihood(model, text, tokens), atol=1e-4, rtol=1e-5)
    # one caption row serves every image; a shifted token changes the likelihood
    torch.testing.assert_close(image_log_likelihood(model, text[:1], tokens), got)
    assert not torch.allclose(image_log_likelihood(model, text, tokens.roll(1, 1)), got)


def test_caption_scores_mutual_information_and_softmax_over_alternatives(model_tok):
    model, tok = model_tok
    tokens = torch.randint(0, 32, (3, 4, 4), generator=torch.Generator().manual_seed(2))
    flat = tokens.flatten(1)

    def ll(caption: str) -> torch.Tensor:
        return image_log_likelihood(model, torch.tensor([tok.encode(caption)]), flat)

    pmi = caption_scores(model, tok, "red heart", tokens)
    torch.testing.assert_close(pmi, ll("red heart") - ll(""))
    names = ["red heart", "grinning face", "blue heart"]
    # the caption itself among its alternatives, and a repeated one, count once
    got = caption_scores(model, tok, "red heart", tokens, ["grinning face", "red heart", "blue heart", "blue heart"])
    lls = torch.stack([ll(c) for c in names])
    torch.testing.assert_close(got, lls[0] - torch.logsumexp(lls, 0))
    total = sum(caption_scores(model, tok, c, tokens, names).exp() for c in names)
    torch.testing.assert_close(total, torch.ones(3))  # a distribution over the captions


def test_bad_shapes_are_refused(model_tok):
    model, _ = model_tok
    with pytest.raises(ValueError, match="tokens must be"):
        image_log_likelihood(model, torch.zeros(1, 8, dtype=torch.long), torch.zeros(16, dtype=torch.long))
    with pytest.raises(ValueError, match="text must be"):
        image_log_likelihood(model, torch.zeros(2, 8, dtype=torch.long), torch.zeros(3, 16, dtype=torch.long))


def test_the_benchmarks_picks_add_clips_logit_to_the_priors_score():
    bench = bench_script("prior_rerank")
    clip = torch.tensor([[0.90, 0.80, 0.70], [0.50, 0.60, 0.55]])
    pmi = torch.tensor([[0.0, 0.0, 30.0], [9.0, 0.0, 0.0]])
    near = torch.tensor([[-3.0, 0.0, -1.0], [0.0, -0.1, -9.0]])
    right = torch.tensor([[False, True, False], [False, False, False]])
    got = {k: v.tolist() for k, v in bench.picks(clip, 10.0, pmi, near, right).items()}
    assert got["random"] == [0, 0] and got["clip"] == [0, 1]
    assert got["prior_pmi"] == [2, 0] and got["prior_neighbours"] == [1, 0]
    # 10 x cosine + score: [9, 8, 37] -> 2 and [14, 6, 5.5] -> 0; [6, 8, 6] -> 1 and [5, 5.9, -3.5] -> 1
    assert got["clip+pmi"] == [2, 0] and got["clip+neighbours"] == [1, 1]
    assert got["reader"] == [1, 1]  # a right one where there is one, else CLIP's


class _Cosine:
    """A reranker stand-in: a fixed score per candidate (its mean pixel), no reference captions."""

    def use_reference(self, spec: object) -> None:
        assert spec is None

    def pick_and_cosine(self, images: torch.Tensor, caption: str) -> tuple[torch.Tensor, torch.Tensor]:
        s = images.float().mean((1, 2, 3))
        return s, s


def test_the_evaluations_candidates_keep_the_tokens_their_images_decode_from(model_tok):
    from types import SimpleNamespace

    from dalle_repro.core.images import to_uint8
    from dalle_repro.evaluation.evaluate import sample_candidates
    from dalle_repro.models.dvae import DVAE, DVAEArgs
    from dalle_repro.sample.generate import SampleSettings

    model, tok = model_tok
    dvae = DVAE(DVAEArgs(image_size=16, n_hid=8, n_blk_per_group=1, group_count=3, vocab_size=32, n_init=8)).eval()
    prior = SimpleNamespace(model=model, dvae=dvae, tokenizer=tok)
    caps = ["red heart", "grinning face", "blue heart"]
    cands = sample_candidates(prior, caps, _Cosine(), SampleSettings(candidates=3, keep=1, batch_size=None), rows=6)
    assert cands.tokens is not None and cands.tokens.shape == (3, 3, 16)  # two calls: 2 captions, then 1
    with torch.no_grad():
        again = to_uint8(dvae.decode(cands.tokens.view(-1, 4, 4))).view(3, 3, 3, 16, 16)
    assert torch.equal(again, cands.images)
