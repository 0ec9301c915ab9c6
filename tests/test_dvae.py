"""The dVAE: shapes and errors, the likelihood, the loss, storage, and parity with OpenAI's release."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from dalle_repro.models.dvae import (
    DVAE,
    DVAEArgs,
    logit_laplace_nll,
    map_pixels,
    mean_code_entropy,
    nll_to_bits_per_dim,
    unmap_pixels,
)

SMALL = DVAEArgs(image_size=16, n_hid=16, n_blk_per_group=1, group_count=3, vocab_size=32, n_init=8)
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def model() -> DVAE:
    torch.manual_seed(0)
    return DVAE(SMALL)


def test_shapes(model):
    x = torch.rand(3, 3, 16, 16)
    tokens = model.encode(x)
    assert tokens.shape == (3, 4, 4) and tokens.dtype == torch.long
    assert 0 <= tokens.min() and tokens.max() < 32
    img = model.decode(tokens)
    assert img.shape == (3, 3, 16, 16) and 0 <= img.min() and img.max() <= 1
    out = model(x, tau=1.0, beta=1.0)
    assert out.loss.shape == () and out.logits.shape == (3, 32, 4, 4) and out.recon.shape == x.shape
    # fully convolutional: another multiple of the downsampling works too
    assert model.encode(torch.rand(1, 3, 24, 32)).shape == (1, 6, 8)


@pytest.mark.parametrize(
    "bad, words",
    [
        (torch.rand(3, 16, 16), "(B, 3, H, W)"),
        (torch.rand(1, 1, 16, 16), "shape (1, 1, 16, 16)"),
        (torch.randint(0, 255, (1, 3, 16, 16)), "dtype torch.int64"),
        (torch.rand(1, 3, 16, 16) * 255, "[0, 1]"),
        (torch.rand(1, 3, 18, 16), "multiples of 4"),
    ],
)
def test_encode_rejects_bad_images(model, bad, words):
    with pytest.raises(ValueError) as e:
        model.encode(bad)
    assert words in str(e.value)


def test_decode_rejects_bad_tokens(model):
    with pytest.raises(ValueError, match="LongTensor"):
        model.decode(torch.zeros(1, 4, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"\[0, 32\)"):
        model.decode(torch.full((1, 4, 4), 32))
    with pytest.raises(ValueError, match="shape"):
        model.decode(torch.zeros(4, 4, dtype=torch.long))


def test_args_validation():
    from dalle_repro.core.config import ConfigError

    with pytest.raises(ConfigError, match="n_hid"):
        DVAEArgs(n_hid=18)
    with pytest.raises(ConfigError, match="image_size.*multiple of 8"):
        DVAEArgs(image_size=100)


def test_likelihood_is_the_logit_laplace_density():
    x = torch.rand(1000, dtype=torch.float64) * 0.8 + 0.1
    mu, ln_b = torch.randn(1000, dtype=torch.float64), torch.randn(1000, dtype=torch.float64) * 0.5
    b = ln_b.exp()
    # independent route: a Laplace on logit(x), times the Jacobian of the logit
    laplace = torch.distributions.Laplace(mu, b)
    ref = -(laplace.log_prob(torch.logit(x)) - torch.log(x * (1 - x)))
    assert torch.allclose(logit_laplace_nll(x, mu, ln_b), ref, atol=1e-10)
    # it is a density on (0, 1): it integrates to 1
    grid = torch.linspace(1e-6, 1 - 1e-6, 400_001, dtype=torch.float64)
    dens = torch.exp(-logit_laplace_nll(grid, torch.tensor(0.3, dtype=torch.float64), torch.tensor(-0.7)))
    assert abs(torch.trapezoid(dens, grid).item() - 1) < 1e-3


def test_pixel_map_and_bits():
    x = torch.rand(2, 3, 4, 4)
    assert torch.allclose(unmap_pixels(map_pixels(x)), x, atol=1e-6)
    assert map_pixels(torch.zeros(1)).item() == pytest.approx(0.1)
    assert map_pixels(torch.ones(1)).item() == pytest.approx(0.9)
    assert nll_to_bits_per_dim(0.0) == pytest.approx((math.log(256) - math.log(0.8)) / math.log(2))


def test_loss_parts(model):
    x = torch.rand(2, 3, 16, 16)
    torch.manual_seed(1)  # the same Gumbel noise for both
    out0 = model(x, tau=1.0, beta=0.0)
    torch.manual_seed(1)
    out1 = model(x, tau=1.0, beta=2.0)
    dims = 3 * 16 * 16
    # beta only adds beta * KL (per position, summed over the 16 positions) / dims
    assert torch.allclose(out1.loss - out0.loss, 2.0 * out1.kl * 16 / dims, atol=1e-5)
    # the KL against the uniform prior, straight from the encoder's softmax
    q = torch.softmax(out1.logits, 1)
    kl = (q * (q.log() + math.log(32))).sum(1).mean()
    assert torch.allclose(out1.kl, kl, atol=1e-5)
    assert out1.kl >= 0 and out1.kl <= math.log(32) + 1e-5


def test_usage_term_is_ln_v_minus_the_entropy_of_the_mean_code_distribution(model):
    x = torch.rand(2, 3, 16, 16)
    torch.manual_seed(1)
    paper = model(x, tau=1.0, beta=1.0)
    torch.manual_seed(1)
    assert torch.equal(model(x, tau=1.0, beta=1.0, usage_weight=0.0).loss, paper.loss)  # off: the paper's
    torch.manual_seed(1)
    used = model(x, tau=1.0, beta=1.0, usage_weight=3.0)
    q_bar = torch.softmax(paper.logits, 1).mean((0, 2, 3))
    term = math.log(32) + (q_bar * q_bar.log()).sum()
    assert torch.allclose(used.loss - paper.loss, 3.0 * term * 16 / (3 * 16 * 16), atol=1e-5)
    assert mean_code_entropy(torch.zeros(4, 32)).item() == pytest.approx(math.log(32))  # spread: no penalty
    one_code = torch.full((4, 32), -30.0)
    one_code[:, 5] = 30.0
    assert mean_code_entropy(one_code).item() == pytest.approx(0.0, abs=1e-6)  # every position on one code


def test_usage_term_pushes_a_collapsed_encoder_apart():
    x = torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    codes = {}
    for w in (0.0, 5.0):
        torch.manual_seed(0)
        m = DVAE(SMALL)
        with torch.no_grad():  # every position's logits favour code 0
            m.encoder.blocks.output.conv.b[0] = 4.0
        assert len(m.encode(x).unique()) == 1
        opt = torch.optim.Adam(m.encoder.parameters(), lr=1e-2)
        for _ in range(30):
            out = m(x, tau=1.0, beta=0.0, usage_weight=w)
            opt.zero_grad()
            out.loss.backward()
            opt.step()
        codes[w] = len(m.encode(x).unique())
    assert codes[5.0] >= 6 and codes[5.0] >= 3 * codes[0.0], codes


def test_kl_ignores_the_relaxation_noise(model):
    x = torch.rand(2, 3, 16, 16)
    kls = {round(model(x, tau=t, beta=1.0).kl.item(), 6) for t in (1.0, 0.1)}
    assert len(kls) == 1


@pytest.mark.parametrize("blocks", [1, 2])
def test_decoder_upsampling_moved_past_its_1x1_convs_computes_the_same(blocks):
    """The decoder runs each block that follows an upsampling with its 1x1 convs at the low
    resolution; forward and every gradient equal the release's order (upsample, then the block)."""
    torch.manual_seed(0)
    args = DVAEArgs(image_size=16, n_hid=8, n_blk_per_group=blocks, group_count=3, vocab_size=16, n_init=12)
    dec = DVAE(args).decoder.double()
    z = torch.softmax(torch.randn(2, 16, 4, 4, dtype=torch.float64), 1).requires_grad_()
    target = torch.randn(2, 6, 16, 16, dtype=torch.float64)
    outs, grads = [], []
    for run in (dec, dec.blocks):  # ours, then nn.Sequential's plain order
        out = run(z)
        g = torch.autograd.grad((out * target).sum(), [z, *dec.parameters()])
        outs.append(out)
        grads.append(g)
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-12, atol=1e-12)
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    ups = [m for m in dec.modules() if isinstance(m, torch.nn.Upsample)]
    assert len(ups) == 2  # the release's modules stay where its weights expect them


def test_tiny_training_lowers_the_loss():
    torch.manual_seed(0)
    model = DVAE(SMALL)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x = torch.zeros(8, 3, 16, 16)  # flat colour quadrants: structure a dVAE can learn
    for i in range(8):
        for q in range(4):
            x[i, :, (q // 2) * 8 : (q // 2) * 8 + 8, (q % 2) * 8 : (q % 2) * 8 + 8] = torch.rand(3, 1, 1)
    first = None
    for _ in range(60):
        out = model(x, tau=1.0, beta=0.1)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        first = first if first is not None else out.loss.item()
    assert out.loss.item() < first - 0.5


def test_save_and_load_round_trip(model, tmp_path):
    x = torch.rand(2, 3, 16, 16)
    model.save_pretrained(tmp_path / "m")
    again = DVAE.from_pretrained(tmp_path / "m")
    assert again.args == model.args
    assert torch.equal(again.encode(x), model.encode(x))
    t = model.encode(x)
    assert torch.equal(again.decode(t), model.decode(t))
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.yaml", "model.safetensors"]


def test_loading_a_mismatched_checkpoint_lists_the_tensors(model, tmp_path):
    model.save_pretrained(tmp_path / "m")
    cfg = tmp_path / "m" / "config.yaml"
    cfg.write_text(cfg.read_text().replace("vocab_size: 32", "vocab_size: 64"))
    with pytest.raises(ValueError) as e:
        DVAE.from_pretrained(tmp_path / "m")
    assert "wrong shape" in str(e.value) and "encoder.blocks.output.conv.w" in str(e.value)
    with pytest.raises(FileNotFoundError, match="config.yaml"):
        DVAE.from_pretrained(tmp_path)


def test_a_config_from_elsewhere_allocates_nothing_before_the_weights_are_checked(model, tmp_path, monkeypatch):
    """Issue 18 item 13: config.yaml drove allocation before the weight shapes were compared; now
    the model is built on the meta device first, and the real one only when the file fits."""
    model.save_pretrained(tmp_path / "m")
    cfg = tmp_path / "m" / "config.yaml"
    cfg.write_text(cfg.read_text().replace("n_hid: ", "n_hid: 4").replace("vocab_size: 32", "vocab_size: 65536"))
    built_on: list[str] = []
    real_init = DVAE.__init__

    def init(self, args):
        built_on.append(str(torch.get_default_device()))
        real_init(self, args)

    monkeypatch.setattr(DVAE, "__init__", init)
    with pytest.raises(ValueError, match="does not fit the model"):
        DVAE.from_pretrained(tmp_path / "m")
    assert built_on == ["meta"]


# ------------------------------------------------------------------------------------------
# Parity with OpenAI's own dall_e package


def _openai_small():
    dall_e = pytest.importorskip("dall_e", reason="OpenAI's DALL-E package (tools/setup.sh --dev)")
    torch.manual_seed(0)
    enc = dall_e.Encoder(n_hid=64, n_blk_per_group=1, vocab_size=512, requires_grad=False)
    dec = dall_e.Decoder(n_init=32, n_hid=64, n_blk_per_group=1, vocab_size=512, requires_grad=False)
    for p in list(enc.parameters()) + list(dec.parameters()):  # the release's biases start at 0: move them
        p.data.add_(torch.randn_like(p) * 0.01)
    return dall_e, enc, dec


def test_openai_parity(tmp_path):
    dall_e, enc, dec = _openai_small()
    torch.save(enc, tmp_path / "encoder.pkl")  # whole pickled modules, as OpenAI published them
    torch.save(dec, tmp_path / "decoder.pkl")
    from dalle_repro.cli import convert_openai_dvae

    argv = ["--encoder", str(tmp_path / "encoder.pkl"), "--decoder", str(tmp_path / "decoder.pkl")]
    assert convert_openai_dvae.main([*argv, "--output", str(tmp_path / "x")]) == 2  # no --trust-pickle
    assert not (tmp_path / "x").exists()
    assert (
        convert_openai_dvae.main([*argv, "--output", str(tmp_path / "ours"), "--trust-pickle", "--image-size", "32"])
        == 0
    )
    ours = DVAE.from_pretrained(tmp_path / "ours")
    assert ours.args.vocab_size == 512 and ours.args.n_init == 32 and ours.args.image_size == 32
    torch.manual_seed(1)
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        theirs_logits = enc(dall_e.map_pixels(x))
        theirs_tokens = theirs_logits.argmax(1)
        assert torch.equal(ours.encode(x), theirs_tokens)
        one_hot = torch.nn.functional.one_hot(theirs_tokens, 512).permute(0, 3, 1, 2).float()
        theirs_img = dall_e.unmap_pixels(torch.sigmoid(dec(one_hot)[:, :3]))
        assert torch.allclose(ours.decode(theirs_tokens), theirs_img, atol=1e-5, rtol=0)
        assert torch.allclose(ours.logits(x), theirs_logits, atol=1e-4, rtol=1e-4)


def test_saving_into_a_folder_of_other_files_is_refused(tmp_path):
    """convert_openai_dvae --output (save_pretrained) replaced the whole folder: a user's other files were lost."""
    from dalle_repro.models.dvae import DVAE, DVAEArgs

    model = DVAE(DVAEArgs(image_size=16, n_hid=8, n_blk_per_group=1, group_count=3, vocab_size=32, n_init=8))
    mine = tmp_path / "downloads"
    mine.mkdir()
    (mine / "encoder.pkl").write_bytes(b"the user's")
    with pytest.raises(FileExistsError, match="encoder.pkl"):
        model.save_pretrained(mine)
    assert sorted(p.name for p in mine.iterdir()) == ["encoder.pkl"]
    ours = model.save_pretrained(tmp_path / "dvae")
    model.save_pretrained(ours)  # a folder of ours is replaced, as before
    model.save_pretrained(mine, overwrite=True)
    assert (mine / "model.safetensors").is_file()
