"""Stage 1: the discrete VAE of DALL-E (SPEC §1), in the architecture OpenAI released.

Module and parameter names follow OpenAI's ``dall_e`` package one to one (``blocks.input.w``,
``blocks.group_1.block_1.res_path.conv_1.w``, ...), so its released weights load without renaming
beyond the ``encoder.``/``decoder.`` prefix (tools/convert_openai_dvae.py).

Differences from the released code, none of which change the function computed:
- ``group_count`` is an option (the release fixes 4); group g has width 2^(g-1) * n_hid in the
  encoder, and the decoder mirrors it. Downsampling is 2^(group_count-1).
- The release runs convolutions in fp16 on CUDA by hand; here precision comes from autocast, with
  the encoder's logit conv and the decoder's codebook conv kept in fp32 as the release keeps them.
- ``decode(tokens)`` applies the decoder's first 1x1 conv to one-hot codes as a lookup of the
  conv's columns (the same numbers, without building a vocab-wide one-hot tensor).
- The decoder's 2x nearest upsampling is moved past the 1x1 convs that read it: a block that
  starts after an upsample applies its id_path and its ReLU + 1x1 conv_1 at the low resolution and
  upsamples their outputs (nearest upsampling commutes with ReLU and with any 1x1 conv: each
  output pixel is the same dot product). The same numbers, a quarter of the pixels: at the bench's
  64x64 shape the last group's 4x-wider upsampled input was half of an fp32 train step.

The likelihood is the logit-Laplace density on (0, 1) with the eps = 0.1 pixel map, and the loss
is (NLL summed over subpixels + beta * KL(q || uniform) summed over positions) / (3 H W), with the
KL taken from the encoder's softmax, not from the relaxed sample (SPEC §1).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from dalle_repro.core.config import ConfigError, arg
from dalle_repro.core.pretrained import build_pretrained, save_pretrained
from dalle_repro.kernels import cpu as cpu_kernels

LOGIT_LAPLACE_EPS = 0.1


@dataclass
class DVAEArgs:
    """Sizes of the dVAE. The defaults are the released model (256x256 -> 32x32 codes of 8192)."""

    image_size: int = arg(256, "Side of the square input image; a multiple of the downsampling factor.", gt=0)
    input_channels: int = arg(3, "Channels of the input image.", gt=0)
    n_hid: int = arg(256, "Width of the first group; group g is 2^(g-1) times wider. A multiple of 4.", ge=4)
    n_blk_per_group: int = arg(2, "Residual blocks per group.", ge=1)
    group_count: int = arg(4, "Groups; the image is downsampled 2^(group_count-1) times.", ge=1)
    vocab_size: int = arg(8192, "Codebook size (image token vocabulary).", ge=2)
    n_init: int = arg(128, "Channels of the decoder's codebook embedding (its first 1x1 conv).", ge=1)

    def __post_init__(self) -> None:
        if self.n_hid % 4:
            raise ConfigError(f"n_hid: got {self.n_hid}; allowed: a multiple of 4")
        if self.image_size % self.downsample:
            raise ConfigError(f"image_size: got {self.image_size}; allowed: a multiple of {self.downsample}")

    @property
    def downsample(self) -> int:
        return 2 ** (self.group_count - 1)

    @property
    def grid(self) -> int:
        """Side of the token grid."""
        return self.image_size // self.downsample


def map_pixels(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] -> [eps, 1 - eps], where the logit-Laplace density is used."""
    return (1 - 2 * LOGIT_LAPLACE_EPS) * x + LOGIT_LAPLACE_EPS


def unmap_pixels(y: torch.Tensor) -> torch.Tensor:
    return torch.clamp((y - LOGIT_LAPLACE_EPS) / (1 - 2 * LOGIT_LAPLACE_EPS), 0, 1)


def logit_laplace_nll(x: torch.Tensor, mu: torch.Tensor, ln_b: torch.Tensor) -> torch.Tensor:
    """-ln f(x | mu, b) per subpixel, for x in (0, 1) (already mapped), mu in logit space.

    f(x | mu, b) = 1 / (2 b x (1 - x)) * exp(-|logit(x) - mu| / b).
    """
    return math.log(2) + ln_b + torch.log(x) + torch.log1p(-x) + (torch.logit(x) - mu).abs() * torch.exp(-ln_b)


def nll_to_bits_per_dim(nll_mapped: torch.Tensor | float) -> torch.Tensor | float:
    """NLL per subpixel of the mapped value -> bits per dim on the usual 0..255 pixel scale.

    Adds the log-Jacobian of the pixel map and of the scaling to 256 levels (a continuous
    approximation of the discretised likelihood), then converts nats to bits.
    """
    return (nll_mapped - math.log(1 - 2 * LOGIT_LAPLACE_EPS) + math.log(256)) / math.log(2)


class Conv2d(nn.Module):
    """A 'same'-padded conv with parameters named ``w`` and ``b``, as in the release.

    ``fp32`` keeps the conv in float32 under autocast (the release's use_float16=False layers).
    """

    def __init__(self, n_in: int, n_out: int, kw: int, fp32: bool = False):
        super().__init__()
        if kw % 2 != 1:
            raise ValueError(f"kernel width must be odd, got {kw}")
        self.kw, self.fp32 = kw, fp32
        self.w = nn.Parameter(torch.randn(n_out, n_in, kw, kw) / math.sqrt(n_in * kw**2))
        self.b = nn.Parameter(torch.zeros(n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fp32 and torch.is_autocast_enabled(x.device.type):
            with torch.autocast(x.device.type, enabled=False):
                return F.conv2d(x.float(), self.w, self.b, padding=(self.kw - 1) // 2)
        return F.conv2d(x, self.w, self.b, padding=(self.kw - 1) // 2)


def _res_block(n_in: int, n_out: int, kernels: tuple[int, int, int, int]) -> nn.Sequential:
    n_mid = n_out // 4
    widths = [(n_in, n_mid), (n_mid, n_mid), (n_mid, n_mid), (n_mid, n_out)]
    layers: list[tuple[str, nn.Module]] = []
    for i, ((a, b), k) in enumerate(zip(widths, kernels, strict=True), start=1):
        # relu_1 reads the block's input, which id_path also reads; the later ones may overwrite
        # the conv output they follow, which nothing else keeps.
        layers += [(f"relu_{i}", nn.ReLU(inplace=i > 1)), (f"conv_{i}", Conv2d(a, b, k))]
    return nn.Sequential(OrderedDict(layers))


class ResBlock(nn.Module):
    """out = id_path(x) + post_gain * res_path(x), post_gain = 1 / n_layers^2."""

    def __init__(self, n_in: int, n_out: int, n_layers: int, kernels: tuple[int, int, int, int]):
        super().__init__()
        if n_out % 4:
            raise ValueError(f"block width must be a multiple of 4, got {n_out}")
        self.post_gain = 1 / n_layers**2
        self.id_path = Conv2d(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        self.res_path = _res_block(n_in, n_out, kernels)

    def forward(self, x: torch.Tensor, upsample: bool = False) -> torch.Tensor:
        """``upsample``: the block of ``upsample_2x(x)``, with its leading 1x1 convs run before the
        upsampling where they commute with it (see the module docstring); the same function."""
        if upsample and not self.commutes_with_upsample():
            x, upsample = upsample_2x(x), False
        if not upsample:
            return torch.add(self.id_path(x), self.res_path(x), alpha=self.post_gain)  # one pass, not mul then add
        layers = list(self.res_path.children())
        h = upsample_2x(layers[1](layers[0](x)))  # relu_1, conv_1 (1x1) at the low resolution
        for layer in layers[2:]:
            h = layer(h)
        return torch.add(upsample_2x(self.id_path(x)), h, alpha=self.post_gain)

    def commutes_with_upsample(self) -> bool:
        """Whether conv_1 and id_path are 1x1 (the decoder's blocks), so that both may run before
        a nearest upsampling of the block's input."""
        conv_1, idp = self.res_path.conv_1, self.id_path
        return conv_1.kw == 1 and (isinstance(idp, nn.Identity) or idp.kw == 1)


def upsample_2x(x: torch.Tensor) -> torch.Tensor:
    """Nearest-neighbour 2x upsampling, as the release's ``nn.Upsample(scale_factor=2)``."""
    return F.interpolate(x, scale_factor=2, mode="nearest")


ENCODER_KERNELS = (3, 3, 3, 1)
DECODER_KERNELS = (1, 3, 3, 3)


class Encoder(nn.Module):
    """Image (B, C, H, W), mapped pixels -> code logits (B, vocab, H/d, W/d)."""

    def __init__(self, a: DVAEArgs):
        super().__init__()
        n_layers = a.group_count * a.n_blk_per_group
        groups: list[tuple[str, nn.Module]] = [("input", Conv2d(a.input_channels, a.n_hid, 7))]
        width = a.n_hid
        for g in range(1, a.group_count + 1):
            out = 2 ** (g - 1) * a.n_hid
            layers: list[tuple[str, nn.Module]] = [
                (f"block_{i + 1}", ResBlock(width if i == 0 else out, out, n_layers, ENCODER_KERNELS))
                for i in range(a.n_blk_per_group)
            ]
            if g < a.group_count:
                layers.append(("pool", nn.MaxPool2d(kernel_size=2)))
            groups.append((f"group_{g}", nn.Sequential(OrderedDict(layers))))
            width = out
        head = OrderedDict([("relu", nn.ReLU()), ("conv", Conv2d(width, a.vocab_size, 1, fp32=True))])
        groups.append(("output", nn.Sequential(head)))
        self.blocks = nn.Sequential(OrderedDict(groups))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class Decoder(nn.Module):
    """Codes (B, vocab, h, w), one-hot or relaxed -> (B, 2C, h*d, w*d): C mu channels, then C ln b."""

    def __init__(self, a: DVAEArgs):
        super().__init__()
        n_layers = a.group_count * a.n_blk_per_group
        groups: list[tuple[str, nn.Module]] = [("input", Conv2d(a.vocab_size, a.n_init, 1, fp32=True))]
        width = a.n_init
        for g in range(1, a.group_count + 1):
            out = 2 ** (a.group_count - g) * a.n_hid
            layers: list[tuple[str, nn.Module]] = [
                (f"block_{i + 1}", ResBlock(width if i == 0 else out, out, n_layers, DECODER_KERNELS))
                for i in range(a.n_blk_per_group)
            ]
            if g < a.group_count:
                layers.append(("upsample", nn.Upsample(scale_factor=2, mode="nearest")))
            groups.append((f"group_{g}", nn.Sequential(OrderedDict(layers))))
            width = out
        head = OrderedDict([("relu", nn.ReLU()), ("conv", Conv2d(width, 2 * a.input_channels, 1))])
        groups.append(("output", nn.Sequential(head)))
        self.blocks = nn.Sequential(OrderedDict(groups))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self._after_input(self.blocks.input(z))

    def from_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """The decoder on one-hot codes, with the first conv as a column lookup."""
        conv = self.blocks.input
        table = conv.w[:, :, 0, 0].t()  # (vocab, n_init)
        h = F.embedding(tokens, table).permute(0, 3, 1, 2) + conv.b[None, :, None, None]  # (B, n_init, h, w)
        return self._after_input(h)

    def _after_input(self, h: torch.Tensor) -> torch.Tensor:
        """Every block after ``input``, each group's upsampling handed to the block that reads it."""
        pending = False  # an upsampling owed to h
        for name, group in self.blocks.named_children():
            if name == "input":
                continue
            for layer in group.children():
                if isinstance(layer, nn.Upsample):
                    pending = True
                elif isinstance(layer, ResBlock):
                    h, pending = layer(h, upsample=pending), False
                else:
                    h, pending = layer(upsample_2x(h) if pending else h), False
        return upsample_2x(h) if pending else h


@dataclass
class DVAELoss:
    """The training objective and its parts, each averaged over the batch."""

    loss: torch.Tensor  # (NLL sum + beta * KL sum) / (3 H W)
    nll: torch.Tensor  # NLL per subpixel (mapped space, nats)
    kl: torch.Tensor  # KL per code position (nats)
    logits: torch.Tensor  # encoder logits (B, vocab, h, w), for code statistics
    mu: torch.Tensor  # the decoder's location, logit space, detached (B, C, H, W)

    @property
    def recon(self) -> torch.Tensor:
        """unmap(sigmoid(mu)), (B, C, H, W); made on demand, as no train step needs it."""
        return unmap_pixels(torch.sigmoid(self.mu))


class _GumbelSoftmaxKL(torch.autograd.Function):
    """``gumbel_softmax_kl`` through the fused CPU kernel (``csrc/gumbel_softmax.cpp``)."""

    @staticmethod
    def forward(ctx, lg, tau, seed, lib):  # type: ignore[override]
        # the kernel trusts its pointers: check what it will read and write before any crosses
        if lg.dtype != torch.float32 or lg.device.type != "cpu" or not lg.is_contiguous() or lg.dim() < 1:
            raise ValueError(
                f"gumbel kernel: logits must be contiguous float32 on the CPU, got {lg.dtype} {tuple(lg.shape)}"
            )
        if lg.shape[-1] < 1 or not (math.isfinite(tau) and tau > 0):
            raise ValueError(
                f"gumbel kernel: needs at least one code and a finite tau > 0, got {tuple(lg.shape)}, tau {tau}"
            )
        v = lg.shape[-1]
        z = torch.empty_like(lg)
        kl = torch.empty(lg.shape[:-1], dtype=lg.dtype)
        ptr = cpu_kernels.pointer
        lib.dr_gumbel_softmax_kl_forward(
            lg.numel() // v, v, ptr(lg), tau, seed, ptr(z), ptr(kl), torch.get_num_threads()
        )
        ctx.save_for_backward(lg, z)
        ctx.tau, ctx.lib = tau, lib
        return z, kl

    @staticmethod
    @once_differentiable
    def backward(ctx, d_z, d_kl):  # type: ignore[override]
        lg, z = ctx.saved_tensors
        d_z = torch.zeros_like(z) if d_z is None else d_z.float().contiguous()
        d_kl = torch.zeros(z.shape[:-1]) if d_kl is None else d_kl.float().contiguous()
        d_lg = torch.empty_like(lg)
        v, ptr = lg.shape[-1], cpu_kernels.pointer
        ctx.lib.dr_gumbel_softmax_kl_backward(
            lg.numel() // v, v, ptr(lg), ptr(z), ptr(d_z), ctx.tau, ptr(d_kl), ptr(d_lg), torch.get_num_threads()
        )
        return d_lg, None, None, None


def codebook_usage(counts: torch.Tensor) -> dict[str, float]:
    """How many codes a count of tokens (one entry per code) uses, and the perplexity of their
    frequencies: exp of the entropy, the number of equally used codes that would give the same
    entropy (0.0 where nothing was counted). The trainer's batch and validation metrics, the
    evaluation and the benchmarks all count with this."""
    p = counts[counts > 0].double() / max(int(counts.sum()), 1)
    return {
        "codes_used": int((counts > 0).sum()),
        "codebook_size": len(counts),
        "perplexity": float(torch.exp(-(p * p.log()).sum())) if len(p) else 0.0,
    }


def mean_code_entropy(lg: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of the code distribution averaged over every position of a (..., V) logits
    tensor: ln V when the positions together spread over every code alike, 0 when they all put
    their mass on one code."""
    q_bar = torch.softmax(lg.float(), dim=-1).reshape(-1, lg.shape[-1]).mean(0)
    return -(q_bar * torch.log(q_bar.clamp_min(1e-30))).sum()


def gumbel_softmax_kl(lg: torch.Tensor, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (..., V) -> the relaxed sample softmax((lg + g) / tau), g ~ Gumbel(0, 1), and the
    KL of softmax(lg) to the uniform prior at each position (...,), both differentiable.

    On CPU this is one fused kernel (``cpu_kernels``): the same functions, with the noise drawn by
    a counter-based generator from a seed that PyTorch's generator supplies, so runs stay
    reproducible under ``torch.manual_seed`` and resume. PyTorch's own ops made about a dozen
    memory-bound passes over the logits: the fused kernel took a ``vae_train`` step from 108.6 to
    92.2 ms. Elsewhere, or without the kernel, those ops run, with the noise from ``torch.rand``.
    """
    lib = cpu_kernels.load() if lg.device.type == "cpu" else None
    if lib is not None:
        seed = int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64).item())
        z, kl = _GumbelSoftmaxKL.apply(lg.float().contiguous(), float(tau), seed, lib)
        return z, kl
    gumbel = torch.rand_like(lg).clamp_(min=1e-20).log_().neg_().log_().neg_()  # -log(-log u), u in [1e-20, 1)
    z = F.softmax((lg + gumbel) / tau, dim=-1)
    log_q = F.log_softmax(lg, dim=-1)
    kl = (log_q.exp() * (log_q + math.log(lg.shape[-1]))).sum(-1)
    return z, kl


class DVAE(nn.Module):
    """Encoder + decoder with the paper's likelihood; see the module docstring."""

    def __init__(self, args: DVAEArgs):
        super().__init__()
        self.args = args
        self.encoder = Encoder(args)
        self.decoder = Decoder(args)

    # -- checks at the public boundary --------------------------------------------------------

    def _check_images(self, images: torch.Tensor, values: bool = True) -> None:
        """Shape and dtype always; the [0, 1] range (a device sync) only when ``values``."""
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
        a = self.args
        if images.dim() != 4 or images.shape[1] != a.input_channels:
            raise ValueError(f"images must be (B, {a.input_channels}, H, W), got shape {tuple(images.shape)}")
        if not images.is_floating_point():
            raise ValueError(f"images must be float in [0, 1], got dtype {images.dtype}")
        h, w = images.shape[-2:]
        if h % a.downsample or w % a.downsample:
            raise ValueError(f"image height and width must be multiples of {a.downsample}, got {h}x{w}")
        if not values:
            return
        lo, hi = images.min().item(), images.max().item()
        if lo < 0 or hi > 1 or math.isnan(lo) or math.isnan(hi):
            raise ValueError(f"images must lie in [0, 1], got values in [{lo:.4g}, {hi:.4g}]")

    def _check_tokens(self, tokens: torch.Tensor) -> None:
        if not isinstance(tokens, torch.Tensor) or tokens.dtype != torch.long:
            raise ValueError(f"tokens must be a LongTensor (B, h, w), got {getattr(tokens, 'dtype', type(tokens))}")
        if tokens.dim() != 3:
            raise ValueError(f"tokens must be (B, h, w), got shape {tuple(tokens.shape)}")
        if tokens.numel() and (tokens.min() < 0 or tokens.max() >= self.args.vocab_size):
            lo, hi = tokens.min().item(), tokens.max().item()
            raise ValueError(f"tokens must lie in [0, {self.args.vocab_size}), got values in [{lo}, {hi}]")

    # -- the model ----------------------------------------------------------------------------

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """Encoder logits (B, vocab, h, w) of images in [0, 1] (the pixel map is applied here)."""
        self._check_images(images)
        return self.encoder(map_pixels(images.float()))

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) float in [0, 1] -> token grid (B, H/d, W/d), the argmax, no noise."""
        return self.logits(images).argmax(dim=1)

    def decode_stats(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu, ln b) of the logit-Laplace for a token grid."""
        self._check_tokens(tokens)
        out = self.decoder.from_tokens(tokens).float()
        c = self.args.input_channels
        return out[:, :c], out[:, c:]

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token grid (B, h, w) -> images (B, C, h*d, w*d) in [0, 1]: unmap(sigmoid(mu))."""
        mu, _ = self.decode_stats(tokens)
        return unmap_pixels(torch.sigmoid(mu))

    def forward(self, images: torch.Tensor, tau: float, beta: float, usage_weight: float = 0.0) -> DVAELoss:
        """The training objective on a batch, with a Gumbel-softmax relaxed sample at ``tau``.

        ``usage_weight`` > 0 adds a term that is not the paper's: ``usage_weight * (ln V - H(q_bar))``
        per code position, where ``q_bar`` is the encoder's code distribution averaged over the batch
        and its positions and ``H`` its entropy. The paper's KL term pulls each position's posterior
        towards uniform and says nothing about whether all positions use the same code; this term is
        zero when the batch spreads over the whole codebook and grows as it falls onto a few codes
        (the same idea as the entropy penalties of lookup-free quantisers). See
        ``train.dvae.LossArgs`` and docs/demo.md for its measured effect.
        """
        if tau <= 0:
            raise ValueError(f"tau must be > 0, got {tau}")
        self._check_images(images, values=False)  # no per-step device sync; the loader yields [0, 1]
        x = map_pixels(images.float())
        logits = self.encoder(x)  # (B, V, h, w), fp32
        # The per-position softmaxes run over the last dim of a (B, h, w, V) view. The encoder's
        # output is channels_last in training, so the view is contiguous and free; softmax over
        # dim 1 of a channels_last tensor instead copied it to NCHW and back, six 1M-element
        # layout copies per step, about 8% of a vae_train step.
        lg = logits.permute(0, 2, 3, 1).contiguous()  # a no-op when channels_last
        z, kl = gumbel_softmax_kl(lg, tau)
        out = self.decoder(z.permute(0, 3, 1, 2)).float()
        c = self.args.input_channels
        mu, ln_b = out[:, :c], out[:, c:]
        nll = logit_laplace_nll(x, mu, ln_b).flatten(1).sum(1)  # (B,)
        kl = kl.flatten(1).sum(1)  # (B,)
        dims = x[0].numel()
        loss = ((nll + beta * kl) / dims).mean()
        positions = logits.shape[2] * logits.shape[3]
        if usage_weight > 0:
            loss = loss + usage_weight * positions * (math.log(lg.shape[-1]) - mean_code_entropy(lg)) / dims
        nll_mean, kl_mean = (nll / dims).mean().detach(), (kl / positions).mean().detach()
        return DVAELoss(loss, nll_mean, kl_mean, logits.detach(), mu.detach())

    # -- storage ------------------------------------------------------------------------------

    def save_pretrained(self, directory: str | Path, overwrite: bool = False) -> Path:
        """Write ``config.yaml`` and ``model.safetensors`` into ``directory`` (atomically)."""
        return save_pretrained(directory, self.args, {"model": self.state_dict()}, overwrite=overwrite)

    @classmethod
    def from_pretrained(cls, directory: str | Path, weights: str = "model", map_location: str = "cpu") -> DVAE:
        """Build from a folder with ``config.yaml`` and ``{weights}.safetensors`` (safetensors only)."""
        return build_pretrained(directory, DVAEArgs, cls, weights).to(map_location)


def args_from_openai(encoder_attrs: dict[str, int], decoder_attrs: dict[str, int], image_size: int = 256) -> DVAEArgs:
    """DVAEArgs for OpenAI's Encoder/Decoder hyper-parameters (their attribute names)."""
    for name in ("n_hid", "n_blk_per_group", "vocab_size"):
        if encoder_attrs[name] != decoder_attrs[name]:
            raise ValueError(f"encoder and decoder disagree on {name}: {encoder_attrs[name]} vs {decoder_attrs[name]}")
    if encoder_attrs["input_channels"] != decoder_attrs["output_channels"]:
        raise ValueError("encoder input_channels and decoder output_channels differ")
    return DVAEArgs(
        image_size=image_size,
        input_channels=encoder_attrs["input_channels"],
        n_hid=encoder_attrs["n_hid"],
        n_blk_per_group=encoder_attrs["n_blk_per_group"],
        group_count=encoder_attrs.get("group_count", 4),
        vocab_size=encoder_attrs["vocab_size"],
        n_init=decoder_attrs["n_init"],
    )


def state_from_openai(encoder_state: dict[str, torch.Tensor], decoder_state: dict[str, torch.Tensor]) -> dict:
    """OpenAI's two state dicts -> ours: the names are the same under ``encoder.`` / ``decoder.``."""
    state = {f"encoder.{k}": v.float() for k, v in encoder_state.items()}
    state.update({f"decoder.{k}": v.float() for k, v in decoder_state.items()})
    return state
