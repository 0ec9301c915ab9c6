"""Stage 2: DALL-E's decoder-only sparse transformer over text and image tokens (SPEC §2).

Sequence: ``text_len`` text tokens, then ``grid * grid`` image tokens in raster order, one
stream. The output at position p predicts the token at p + 1: the last text position predicts
the first image token, and the first text token is not predicted. [?] The paper leaves the
start-of-text / start-of-image slots open; this layout needs neither, because the text is padded
to a fixed length with one learned pad id per position (data/tokenizer.py), so the first image token
always follows position ``text_len - 1``.

Embeddings: text token + text position; image token + row + column. Pre-LN blocks with the
layer's mask (attention.layer_kind), a GELU MLP of width 4d, a final LayerNorm, and separate text
and image heads computed in fp32. Loss: cross-entropy over text targets and over image targets,
each averaged over its own tokens, mixed 1/8 text + 7/8 image (options).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from dalle_repro.core.config import ConfigError, arg
from dalle_repro.core.precision import PrecisionArgs, pick_precision
from dalle_repro.models.attention import BACKENDS, FLEX_BLOCK, attend, pick_backend
from dalle_repro.models.block_scaling import BlockScaler
from dalle_repro.models.kv_cache import LayerCache
from dalle_repro.models.masks import MaskSpec, layer_kind

SIZE_KEYS = ("text_len", "text_vocab", "grid", "image_vocab")


@dataclass
class TransformerArgs:
    """Sizes and options of the prior. The paper: 64 layers, 62 heads x 64, 256 text + 32x32 image."""

    dim: int = arg(512, "Model width d.", gt=0)
    depth: int = arg(8, "Layers (resblocks).", gt=0)
    heads: int = arg(8, "Attention heads; dim must be a multiple.", gt=0)
    text_len: int | None = arg(None, "Text positions; null: text.text_len (state it there, once).", gt=0)
    text_vocab: int | None = arg(
        None, "Text ids, BPE vocabulary + text_len pads; null: read off text.path (TextTokenizer.vocab_size).", gt=0
    )
    grid: int | None = arg(
        None, "Side of the image token grid; null: the dVAE's (dvae=), else the token shards' summary.json.", gt=0
    )
    image_vocab: int | None = arg(
        None, "Image codes; null: the dVAE's vocab_size (dvae=), else the token shards' summary.json.", gt=0
    )
    mlp_ratio: int = arg(4, "MLP width as a multiple of dim.", gt=0)
    conv_kernel: int = arg(11, "Conv mask kernel (odd).", gt=0)
    conv_wrap: bool = arg(False, "[?] Wrap the conv window around the left/right edges (the paper is silent).")
    attention: str = arg("auto", "Attention backend: auto, dense, local (CPU training) or flex.")
    flex_block: int = arg(
        FLEX_BLOCK,
        "The flex backend's block side in tokens (a multiple of 16): smaller blocks follow the masks more closely "
        "(at text 256 + grid 32 the paper's stack visits 0.59 of causal's key blocks at 128, 0.48 at 64, 0.43 at 32), "
        "with smaller CUDA tiles.",
        ge=16,
    )
    text_loss_weight: float = arg(1 / 8, "Weight of the text loss.", ge=0)
    image_loss_weight: float = arg(7 / 8, "Weight of the image loss.", ge=0)
    dropout: float = arg(0.0, "Dropout on attention and MLP outputs.", ge=0, lt=1)
    sandwich_ln: bool = arg(False, "CogView's sandwich LayerNorm: x + LN(branch(LN(x))). Off in the paper.")
    checkpoint: bool = arg(False, "Recompute each resblock branch in the backward pass (activation checkpointing).")
    pb_relax: float | None = arg(
        None,
        "CogView's PB-relax attention with this alpha (CogView: 32); null: off, as in the paper. The flex "
        "backend ignores it: its scores are fp32, which is what PB-relax protects.",
        gt=0,
    )

    def __post_init__(self) -> None:
        if self.dim % self.heads:
            raise ConfigError(f"dim: {self.dim} is not a multiple of heads ({self.heads})")
        if self.conv_kernel % 2 == 0:
            raise ConfigError(f"conv_kernel: got {self.conv_kernel}; allowed: odd")
        if self.flex_block % 16:
            raise ConfigError(f"flex_block: got {self.flex_block}; allowed: a multiple of 16 (flex's smallest tile)")
        if self.attention not in ("auto", *BACKENDS):
            raise ConfigError(f"attention: got {self.attention!r}; allowed: auto, {', '.join(BACKENDS)}")
        if self.text_vocab is not None and self.text_len is not None and self.text_vocab < self.text_len:
            raise ConfigError(f"text_vocab ({self.text_vocab}) must hold at least the {self.text_len} pad ids")

    def unresolved(self) -> list[str]:
        """The sizes still null: train_prior.resolve_sizes derives them from the tokenizer, the dVAE or
        the token shards; a model cannot be built before."""
        return [k for k in SIZE_KEYS if getattr(self, k) is None]

    @property
    def n_image(self) -> int:
        return self.grid * self.grid

    @property
    def seq_len(self) -> int:
        return self.text_len + self.n_image


class Attention(nn.Module):
    def __init__(self, a: TransformerArgs, spec: MaskSpec):
        super().__init__()
        self.heads, self.spec, self.backend, self.pb_relax = a.heads, spec, a.attention, a.pb_relax
        self.flex_block = a.flex_block
        self.qkv = nn.Linear(a.dim, 3 * a.dim)
        self.proj = nn.Linear(a.dim, a.dim)

    def forward(self, x: torch.Tensor, cache: LayerCache | None = None, start: int = 0) -> torch.Tensor:
        """Whole sequences (``cache`` None), or positions ``start..start+T-1`` against the cache:
        the whole text at once, or one image token."""
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)  # (B, nh, T, hs)
        if cache is None:
            backend = pick_backend(self.backend, x.device, torch.is_grad_enabled())
            y = attend(q, k, v, self.spec, backend, self.pb_relax, self.flex_block)
        elif start == 0 and n == self.spec.text_len:
            y = cache.text(q, k, v)
        elif n == 1 and start >= self.spec.text_len:
            y = cache.image(q, k, v, start - self.spec.text_len)
        else:
            raise ValueError(f"cached decoding takes the whole text, then one image token; got {n} at {start}")
        return self.proj(y.transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
    """Pre-LN layer of two resblock branches: x + attn(ln(x)), then x + mlp(ln(x)).

    With a :class:`BlockScaler` attached, each branch runs in half precision with its own gradient
    scale and filter (core/precision.py); the residual stream stays fp32 either way.
    """

    def __init__(self, a: TransformerArgs, spec: MaskSpec, index: int):
        super().__init__()
        self.kind, self.index, self.checkpoint = spec.kind, index, a.checkpoint
        self.ln_1 = nn.LayerNorm(a.dim)
        self.attn = Attention(a, spec)
        self.post_1 = nn.LayerNorm(a.dim) if a.sandwich_ln else nn.Identity()
        self.ln_2 = nn.LayerNorm(a.dim)
        self.mlp = nn.Sequential(
            nn.Linear(a.dim, a.mlp_ratio * a.dim), nn.GELU(), nn.Linear(a.mlp_ratio * a.dim, a.dim)
        )
        self.post_2 = nn.LayerNorm(a.dim) if a.sandwich_ln else nn.Identity()
        self.drop = nn.Dropout(a.dropout)
        self.scaler: BlockScaler | None = None  # set by Transformer.enable_precision

    def _residual(self, j: int, x: torch.Tensor, branch: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        if self.checkpoint and torch.is_grad_enabled():
            inner = branch
            branch = lambda t: torch.utils.checkpoint.checkpoint(inner, t, use_reentrant=False)  # noqa: E731
        if self.scaler is not None:
            return self.scaler.residual(j, x, branch)
        return x + branch(x)

    def forward(self, x: torch.Tensor, cache: LayerCache | None = None, start: int = 0) -> torch.Tensor:
        x = self._residual(2 * self.index, x, lambda t: self.drop(self.post_1(self.attn(self.ln_1(t), cache, start))))
        return self._residual(2 * self.index + 1, x, lambda t: self.drop(self.post_2(self.mlp(self.ln_2(t)))))

    def branch_params(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        attn = [*self.ln_1.parameters(), *self.attn.parameters(), *self.post_1.parameters()]
        mlp = [*self.ln_2.parameters(), *self.mlp.parameters(), *self.post_2.parameters()]
        return attn, mlp


@dataclass
class PriorLoss:
    loss: torch.Tensor
    text: torch.Tensor
    image: torch.Tensor


class Transformer(nn.Module):
    """The prior; ``forward(text, image) -> (text_logits, image_logits)``, ``loss(text, image)``."""

    def __init__(self, args: TransformerArgs):
        super().__init__()
        a = self.args = args
        if missing := a.unresolved():
            raise ConfigError(
                f"model.{', model.'.join(missing)}: not set; train_prior derives them from the tokenizer, the dVAE "
                "or the token shards (resolve_sizes), anything else must give them"
            )
        self.text_emb = nn.Embedding(a.text_vocab, a.dim)
        self.text_pos = nn.Parameter(torch.zeros(a.text_len, a.dim))
        self.image_emb = nn.Embedding(a.image_vocab, a.dim)
        self.row_emb = nn.Parameter(torch.zeros(a.grid, a.dim))
        self.col_emb = nn.Parameter(torch.zeros(a.grid, a.dim))
        self.blocks = nn.ModuleList(
            Block(a, MaskSpec(layer_kind(i, a.depth), a.text_len, a.grid, a.conv_kernel, a.conv_wrap), i - 1)
            for i in range(1, a.depth + 1)
        )
        self.scaler: BlockScaler | None = None
        self.ln_f = nn.LayerNorm(a.dim)
        self.text_head = nn.Linear(a.dim, a.text_vocab, bias=False)
        self.image_head = nn.Linear(a.dim, a.image_vocab, bias=False)
        self.apply(self._init)
        for name, p in self.named_parameters():
            if name.endswith(("attn.proj.weight", "mlp.2.weight")):  # GPT-2's scaled residual init
                nn.init.normal_(p, std=0.02 / (2 * a.depth) ** 0.5)
        for p in (self.text_pos, self.row_emb, self.col_emb):
            nn.init.normal_(p, std=0.01)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)

    def enable_precision(self, args: PrecisionArgs) -> BlockScaler:
        """Run the resblocks in ``args.dtype`` with per-branch gradient scaling (SPEC §3); ``auto`` is
        resolved for the device the weights are on (precision.pick_precision)."""
        if args.dtype == "auto":
            args = dataclasses.replace(args, dtype=pick_precision("auto", next(self.parameters()).device).dtype)
        self.scaler = BlockScaler(2 * self.args.depth, args)
        for b in self.blocks:
            b.scaler = self.scaler
        self.scaler.attach(self.branch_params(), self.other_params())
        return self.scaler

    def branch_params(self) -> list[list[nn.Parameter]]:
        """Parameters of each resblock branch, in the scaler's order (attn, mlp of layer 1, ...)."""
        return [ps for b in self.blocks for ps in b.branch_params()]

    def other_params(self) -> list[nn.Parameter]:
        """Parameters outside the resblock branches: embeddings, the final LayerNorm, the heads."""
        inside = {id(p) for ps in self.branch_params() for p in ps}
        return [p for p in self.parameters() if id(p) not in inside]

    def _check(self, text: torch.Tensor, image: torch.Tensor) -> None:
        a = self.args
        for name, t, shape, vocab in (
            ("text", text, (a.text_len,), a.text_vocab),
            ("image", image, (a.n_image,), a.image_vocab),
        ):
            if not isinstance(t, torch.Tensor) or t.dtype != torch.long:
                raise ValueError(f"{name} tokens must be a LongTensor, got {getattr(t, 'dtype', type(t))}")
            if t.dim() != 2 or tuple(t.shape[1:]) != shape:
                raise ValueError(f"{name} tokens must be (B, {shape[0]}), got shape {tuple(t.shape)}")
            if t.numel() and (t.min() < 0 or t.max() >= vocab):
                raise ValueError(f"{name} tokens must lie in [0, {vocab}), got [{t.min().item()}, {t.max().item()}]")
        if text.shape[0] != image.shape[0]:
            raise ValueError(f"text and image batch sizes differ: {text.shape[0]} vs {image.shape[0]}")

    def embed_text(self, text: torch.Tensor) -> torch.Tensor:
        return self.text_emb(text) + self.text_pos  # (B, text_len, d)

    def embed_image(self, image: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Image ids at image positions ``start..`` -> (B, n, d), with their row and column embeddings."""
        g = self.args.grid
        pos = torch.arange(start, start + image.shape[1], device=image.device)
        return self.image_emb(image) + self.row_emb[pos // g] + self.col_emb[pos % g]

    def hidden(self, x: torch.Tensor, caches: list[LayerCache] | None = None, start: int = 0) -> torch.Tensor:
        """The resblocks and the final LayerNorm, in fp32 for the heads."""
        for i, block in enumerate(self.blocks):
            x = block(x, caches[i] if caches is not None else None, start)
        return self.ln_f(x).float()

    # The heads are called as modules (not through their .weight), so that ZeRO-3 gathers their
    # weights in the order it traced. With fp32 weights (the paper's mode) the logits are fp32 throughout.
    def text_logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.text_head(h.to(self.text_head.weight.dtype)).float()

    def image_logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.image_head(h.to(self.image_head.weight.dtype)).float()

    def forward(self, text: torch.Tensor, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (fp32): text (B, text_len - 1, text_vocab) for text targets 1.., image (B, grid^2, image_vocab)."""
        self._check(text, image)
        h = self.hidden(torch.cat([self.embed_text(text), self.embed_image(image)], 1))
        t = self.args.text_len
        return self.text_logits(h[:, : t - 1]), self.image_logits(h[:, t - 1 : -1])

    # -- cached decoding ------------------------------------------------------------------------

    def new_caches(self, batch: int) -> list[LayerCache]:
        p = next(self.parameters())
        hd = self.args.dim // self.args.heads
        return [LayerCache(b.attn.spec, batch, self.args.heads, hd, p.device, p.dtype) for b in self.blocks]

    @torch.no_grad()
    def start_decoding(self, text: torch.Tensor, caches: list[LayerCache]) -> torch.Tensor:
        """Feed the text; returns the logits (B, image_vocab) of the first image token."""
        a = self.args
        if text.dim() != 2 or text.shape[1] != a.text_len or text.dtype != torch.long:
            raise ValueError(f"text tokens must be a LongTensor (B, {a.text_len}), got {tuple(text.shape)}")
        h = self.hidden(self.embed_text(text), caches, 0)
        return self.image_logits(h[:, -1])

    @torch.no_grad()
    def decode_step(self, token: torch.Tensor, index: int, caches: list[LayerCache]) -> torch.Tensor:
        """Feed image token ``index`` (B,); returns the logits (B, image_vocab) of token ``index + 1``."""
        x = self.embed_image(token[:, None], index)
        h = self.hidden(x, caches, self.args.text_len + index)
        return self.image_logits(h[:, -1])

    @torch.no_grad()
    def generate(
        self,
        text: torch.Tensor,
        temperature: float = 1.0,
        top_k: int | None = None,
        prime: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        top_p: float | None = None,
        uncond: torch.Tensor | None = None,
        guidance: float = 1.0,
        progress: Callable[[int], None] | None = None,
        negatives: Sequence[tuple[torch.Tensor, float]] = (),
    ) -> torch.Tensor:
        """Sample image tokens (B, grid^2) for text (B, text_len) with the cache, this model's own forward.

        ``temperature`` 0 is greedy; ``top_k`` / ``top_p`` restrict the candidates (sample_logits).
        ``prime`` (B, P) fixes the first P image tokens (image-to-image). With ``uncond`` (B, text_len),
        usually the empty caption, classifier-free guidance runs the conditional and unconditional
        sequences as one batch and samples from ``c + (guidance - 1) * (c - u)`` (so 1 is plain
        conditional sampling, exactly). ``negatives``, pairs of captions (B or 1, text_len) and weights
        w, add ``w * (c - n)`` each: guidance away from a caption of their own, in the same batch
        (bench/swap_guidance.py: the caption with its shapes swapped); weight 0 draws what the call
        without it draws. ``progress`` is called with each finished position.
        """
        n_prime = 0 if prime is None else prime.shape[1]
        keep = None
        if prime is not None:
            keep = torch.zeros(self.args.n_image, dtype=torch.bool, device=text.device)
            keep[:n_prime] = True
            prime = F.pad(prime, (0, self.args.n_image - n_prime))
        group = SampleGroup(text.shape[0], temperature, top_k, top_p, guidance, generator)
        out, _ = self._decode(text, [group], uncond, prime, keep, progress, negatives)
        return out

    @torch.no_grad()
    def generate_groups(
        self,
        text: torch.Tensor,
        groups: Sequence[SampleGroup],
        uncond: torch.Tensor | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> torch.Tensor:
        """:meth:`generate` for rows in consecutive groups with settings of their own (temperature,
        top-k/top-p, guidance, generator): one cached pass for all, as a server batches requests.
        Each group samples from its own generator, so its tokens are those it would draw alone
        (up to the rounding of batched arithmetic). ``uncond`` is needed when a group guides."""
        if sum(g.rows for g in groups) != text.shape[0]:
            raise ValueError(f"the groups hold {sum(g.rows for g in groups)} rows, the text {text.shape[0]}")
        out, _ = self._decode(text, list(groups), uncond, None, None, progress)
        return out

    @torch.no_grad()
    def edit(
        self,
        text: torch.Tensor,
        tokens: torch.Tensor,
        redraw: torch.Tensor,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
        top_p: float | None = None,
        uncond: torch.Tensor | None = None,
        guidance: float = 1.0,
        progress: Callable[[int], None] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Redraw the positions ``redraw`` (a bool mask over the grid^2 image positions) of ``tokens``
        (B, grid^2) for ``text``, keeping every other token: in raster order, one cached pass.

        Returns the edited tokens and, per row, the mean log-likelihood of the kept tokens that come
        after the first redrawn one, under the guided distribution at temperature 1 (no top-k/top-p):
        how well the fixed rest of the image follows from the new content. A token before the
        box cannot see the box, so the sampler alone cannot make the redrawn region fit what follows
        it; ranking candidates by this score (sample/generate.py) does. NaN where nothing follows."""
        keep = ~redraw.to(device=text.device, dtype=torch.bool)
        group = SampleGroup(text.shape[0], temperature, top_k, top_p, guidance, generator)
        return self._decode(text, [group], uncond, tokens, keep, progress)

    def _decode(
        self,
        text: torch.Tensor,
        groups: list[SampleGroup],
        uncond: torch.Tensor | None,
        fixed: torch.Tensor | None,
        keep: torch.Tensor | None,
        progress: Callable[[int], None] | None,
        negatives: Sequence[tuple[torch.Tensor, float]] = (),
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The cached sampling loop: positions where ``keep`` is set take ``fixed``'s token, the rest
        are drawn, each group of rows with its own settings. The caption, ``uncond`` and each of
        ``negatives`` run as one batch of streams (:meth:`_guided` mixes them). Returns the tokens and
        the mean log-likelihood of the kept tokens after the first drawn one (see :meth:`edit`)."""
        a = self.args
        b = text.shape[0]
        scales = {g.guidance for g in groups}
        if uncond is None and scales != {1.0}:
            raise ValueError("guidance other than 1 needs uncond (the empty caption's tokens)")
        if len(scales) == 1:
            guidance: float | torch.Tensor = scales.pop()
        else:
            guidance = torch.cat([torch.full((g.rows, 1), float(g.guidance)) for g in groups]).to(text.device)
        streams = [text] + ([] if uncond is None else [uncond]) + [n for n, _ in negatives]
        both = torch.cat([t.expand(b, -1) for t in streams])
        weights = [float(w) for _, w in negatives]

        def mix(logits: torch.Tensor) -> torch.Tensor:
            return self._guided(logits, b, guidance, uncond is not None, weights)

        caches = self.new_caches(both.shape[0])
        logits = mix(self.start_decoding(both, caches))
        bounds = []
        start = 0
        for g in groups:
            bounds.append((start, start + g.rows, g))
            start += g.rows
        out = torch.empty(b, a.n_image, dtype=torch.long, device=text.device)
        keep_list = [False] * a.n_image if keep is None else keep.tolist()
        fit = torch.zeros(b, dtype=torch.float32, device=text.device)
        n_fit, drawn = 0, False
        for i in range(a.n_image):
            if keep_list[i]:
                out[:, i] = fixed[:, i]  # type: ignore[index]
                if drawn:
                    logp = torch.log_softmax(logits.float(), -1)
                    fit += logp.gather(1, out[:, i : i + 1]).squeeze(1)
                    n_fit += 1
            else:
                for lo, hi, g in bounds:
                    part = logits if (lo, hi) == (0, b) else logits[lo:hi]
                    out[lo:hi, i] = sample_logits(part, g.temperature, g.top_k, g.generator, g.top_p)
                drawn = True
            if i + 1 < a.n_image:
                logits = mix(self.decode_step(out[:, i].repeat(len(streams)), i, caches))
            if progress is not None:
                progress(i)
        return out, fit / n_fit if n_fit else torch.full_like(fit, float("nan"))

    @staticmethod
    def _guided(
        logits: torch.Tensor,
        b: int,
        guidance: float | torch.Tensor,
        has_uncond: bool = True,
        weights: Sequence[float] = (),
    ) -> torch.Tensor:
        """Streams of ``b`` rows each (the caption c, the unconditional u where ``has_uncond``, then
        one per negative n_j) mixed as ``c + (guidance - 1)(c - u) + sum_j w_j (c - n_j)``."""
        if logits.shape[0] == b:
            return logits
        c = logits[:b]
        out, k = c, 1
        if has_uncond:
            if isinstance(guidance, torch.Tensor):  # per row: in the logits' dtype, as a scalar would be
                guidance = guidance.to(logits.dtype)
            out, k = c + (guidance - 1.0) * (c - logits[b : 2 * b]), 2
        for j, w in enumerate(weights):
            out = out + w * (c - logits[(k + j) * b : (k + j + 1) * b])
        return out

    def loss(self, text: torch.Tensor, image: torch.Tensor) -> PriorLoss:
        return self.loss_from_logits(text, image, *self(text, image))

    def loss_from_logits(
        self, text: torch.Tensor, image: torch.Tensor, text_logits: torch.Tensor, image_logits: torch.Tensor
    ) -> PriorLoss:
        """The weighted loss of logits from :meth:`forward` (e.g. through a DeepSpeed engine)."""
        lt = F.cross_entropy(text_logits.flatten(0, 1), text[:, 1:].flatten())
        li = F.cross_entropy(image_logits.flatten(0, 1), image.flatten())
        a = self.args
        return PriorLoss(a.text_loss_weight * lt + a.image_loss_weight * li, lt.detach(), li.detach())


@dataclass
class SampleGroup:
    """Consecutive rows of a batched generate call that sample with settings of their own."""

    rows: int
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    guidance: float = 1.0
    generator: torch.Generator | None = None


def sample_logits(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
    top_p: float | None = None,
) -> torch.Tensor:
    """One id per row of (B, V) logits: greedy at temperature 0, else softmax(logits / T) restricted
    to the ``top_k`` largest and to the smallest set whose probability reaches ``top_p`` (nucleus)."""
    if temperature <= 0:
        return logits.argmax(-1)
    return torch.multinomial(allowed_probs(logits / temperature, top_k, top_p), 1, generator=generator)[:, 0]


def allowed_probs(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """softmax(logits) with everything outside the top k and the top-p nucleus set to 0 (renormalised)."""
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits.float(), -1)
    if top_p is not None and top_p < 1.0:
        sorted_p, order = probs.sort(-1, descending=True)
        before = sorted_p.cumsum(-1) - sorted_p  # mass of the tokens ranked above each one
        keep_sorted = before < top_p  # the top token is always kept
        keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
        probs = torch.where(keep, probs, torch.zeros_like(probs))
        probs = probs / probs.sum(-1, keepdim=True)
    return probs
