"""Expected GPU memory per rank for prior configs: parameters, gradients + optimizer, activations.

Usage: python tools/memory_table.py [CONFIG ...] [--gpus 8 64 ...] [--finetune [--freeze "" body ...]]
  (default: configs/gpu/prior-350m.yaml configs/gpu/prior-1.3b.yaml configs/paper/prior.yaml)

Prints a Markdown table (the one in docs/design.md). How each column is computed (P = parameters, counted
exactly by building the model on the meta device; N = ranks; ZeRO stage z):

- weights: 4P bytes (fp32, precision.mode block_scaled), or 2P (mode deepspeed); / N at z = 3.
- gradients: 4P (block_scaled) or 2P (deepspeed), / N at z >= 2.
- optimizer: AdamW's two fp32 moments, 8P, plus the fp32 master copy (4P) in mode deepspeed; / N at z >= 1.
- activations, per micro-batch of B sequences of S tokens at width d over L layers, kept for the
  backward pass: with per-resblock checkpointing, each branch's fp32 input (2 per layer: 8 B S d
  bytes per layer) plus one layer recomputed (about 34 B S d bytes in half precision, the usual
  transformer-layer estimate with attention that never stores S x S scores, as the block-sparse
  kernels do not); without checkpointing, about (34 + 8) B S d bytes per layer. Plus the fp32 logits
  and their gradient: 2 x 4 B (text_len x text_vocab + grid^2 x image_vocab) bytes.

Each config also gets a row "as the paper stores it", for comparison; no mode offers it. The paper
keeps parameters, gradients and both Adam moments in 16 bits except gains, biases, embeddings and
unembeddings (P32 of them, fp32; P16 = P - P32, the blocks' weight matrices): weights and gradients
2 P16 + 4 P32 each, moments 4 P16 + 8 P32, no master copy.

Fine-tuning (--finetune): one row per ZeRO stage (0-3) and per --freeze choice (init.freeze of
train/finetune.py: "" for none, "embeddings,layers:N", "body"), per device at --gpus ranks. Frozen
parameters keep their weights but take no gradient and no optimizer state; activations are kept only
for the layers above the highest frozen one when the embeddings are frozen too (no gradient flows
below it), for none of them with "body" frozen. "fits on" is the smallest of 16, 24, 40 and 80 GB cards
whose memory holds the total plus 2 GiB for the CUDA context and buffers.

These are estimates for planning (allocator fragmentation, communication buffers and the CUDA
context, typically 1-3 GiB, come on top); measure with torch.cuda.max_memory_allocated.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from dalle_repro.core.cli import parse_cli
from dalle_repro.core.config import arg, load_config
from dalle_repro.models.transformer import Transformer
from dalle_repro.train.finetune import frozen_names
from dalle_repro.train.prior_config import PriorTrainConfig, model_with_paper_sizes

DEFAULT = ["configs/gpu/prior-350m.yaml", "configs/gpu/prior-1.3b.yaml", "configs/paper/prior.yaml"]
GIB = 2**30


@dataclass
class MemoryTableArgs:
    """The configs to tabulate, and at which data-parallel sizes."""

    configs: list[str] = arg(factory=lambda: list(DEFAULT), doc="Prior configs (launch/train_prior.py's format).")
    gpus: list[int] = arg(factory=lambda: [8, 64], doc="Data-parallel ranks to tabulate.", ge=1)
    finetune: bool = arg(False, "Tabulate fine-tuning instead: every ZeRO stage, with and without freezing.")
    freeze: list[str] = arg(
        factory=lambda: ["", "embeddings,layers:half", "body"],
        doc="With --finetune: init.freeze choices, comma-separated parts (layers:half: the lower half).",
    )


def fp32_in_the_paper(model: Transformer) -> int:
    """Parameters the paper keeps in fp32: gains, biases, embeddings, unembeddings (all but the
    blocks' weight matrices)."""
    half = sum(p.numel() for b in model.blocks for p in b.parameters() if p.dim() >= 2)
    return sum(p.numel() for p in model.parameters()) - half


def frozen_parts(parts: list[str], depth: int) -> tuple[list[str], int]:
    """init.freeze parts (``layers:half`` resolved to the lower half) and the layers whose activations
    a backward pass still needs."""
    out = [f"layers:{depth // 2}" if q == "layers:half" else q for q in parts if q]
    if "body" in out:
        return out, 0
    below = max([int(q.split(":")[1]) for q in out if q.startswith("layers:")], default=0)
    return out, depth - below if "embeddings" in out else depth


def estimate(cfg: PriorTrainConfig, gpus: int, paper_storage: bool = False, freeze: list[str] | None = None) -> dict:
    with torch.device("meta"):
        model = Transformer(cfg.model)
    p = sum(t.numel() for t in model.parameters())
    parts, layers = frozen_parts(freeze or [], cfg.model.depth)
    frozen = set(frozen_names(model, parts))
    t = sum(v.numel() for k, v in model.named_parameters() if k not in frozen)  # trainable
    z = cfg.deepspeed.zero_stage
    if paper_storage:
        p32 = fp32_in_the_paper(model)
        per_weight, per_grad, per_optim = 2 * p + 2 * p32, 2 * p + 2 * p32, 4 * p + 4 * p32
    else:
        scaled = cfg.precision.mode == "block_scaled"
        per_weight, per_grad, per_optim = (4 if scaled else 2) * p, (4 if scaled else 2) * t, (8 if scaled else 12) * t
    weights = per_weight / (gpus if z == 3 else 1)
    grads = per_grad / (gpus if z >= 2 else 1)
    optim = per_optim / (gpus if z >= 1 else 1)
    a = cfg.model
    b, s, d = cfg.data.batch_size, a.seq_len, a.dim
    if layers == 0:
        acts = 0
    elif a.checkpoint:
        acts = layers * 8 * b * s * d + 34 * b * s * d
    else:
        acts = layers * (34 + 8) * b * s * d
    acts += 2 * 4 * b * (a.text_len * a.text_vocab + a.n_image * a.image_vocab)
    return {
        "params": p,
        "trainable": t,
        "weights": weights / GIB,
        "grads": grads / GIB,
        "optim": optim / GIB,
        "acts": acts / GIB,
        "total": (weights + grads + optim + acts) / GIB,
    }


def main(argv: list[str] | None = None) -> int:
    aliases = {"--gpus": "gpus", "--finetune": "finetune", "--freeze": "freeze"}
    a, _ = parse_cli(MemoryTableArgs, argv, __doc__ or "", aliases=aliases, positional="configs")
    if a is None:
        return 0
    if a.finetune:
        return finetune_table(a)
    cols = [
        "config",
        "params",
        "ZeRO",
        "micro-batch",
        "act. ckpt",
        "GPUs",
        "weights",
        "grads",
        "optimizer",
        "activations",
        "total",
    ]
    print("| " + " | ".join(cols) + " |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for path in a.configs:
        if not Path(path).is_file():
            print(f"error: {path} not found", file=sys.stderr)
            return 2
        cfg = load_config(PriorTrainConfig, path)
        cfg = dataclasses.replace(cfg, model=model_with_paper_sizes(cfg))  # sizes the config leaves to its files
        for n in a.gpus:
            for paper in (False, True):
                e = estimate(cfg, n, paper_storage=paper)
                row = [
                    f"`{path}`" + (" as the paper stores it" if paper else f" ({cfg.precision.mode})"),
                    f"{e['params'] / 1e9:.2f}B",
                    str(cfg.deepspeed.zero_stage),
                    str(cfg.data.batch_size),
                    "yes" if cfg.model.checkpoint else "no",
                    str(n),
                    *(f"{e[k]:.1f} GiB" for k in ("weights", "grads", "optim", "acts", "total")),
                ]
                print("| " + " | ".join(row) + " |")
    return 0


CARDS = (16, 24, 40, 80)  # GB, as cards are sold


def fits_on(total_gib: float) -> str:
    """The smallest card (GB) whose memory holds ``total_gib`` plus 2 GiB of context and buffers."""
    need = (total_gib + 2) * GIB
    return next((f"{c} GB" for c in CARDS if c * 1e9 >= need), "none of 80 GB or less")


def finetune_table(a: MemoryTableArgs) -> int:
    """The --finetune table: per config, ranks, ZeRO stage and freeze choice."""
    cols = ["config", "params", "frozen", "trainable", "ZeRO", "GPUs", "weights", "grads", "optimizer"]
    cols += ["activations", "total", "fits on"]
    print("| " + " | ".join(cols) + " |")
    print("|" + " --- |" * len(cols))
    for path in a.configs:
        if not Path(path).is_file():
            print(f"error: {path} not found", file=sys.stderr)
            return 2
        cfg = load_config(PriorTrainConfig, path)
        cfg = dataclasses.replace(cfg, model=model_with_paper_sizes(cfg))
        for n in a.gpus:
            for choice in a.freeze:
                for z in (0, 1, 2, 3) if n > 1 else (0,):  # on one rank ZeRO partitions nothing
                    c = dataclasses.replace(cfg, deepspeed=dataclasses.replace(cfg.deepspeed, zero_stage=z))
                    e = estimate(c, n, freeze=[q for q in choice.split(",") if q])
                    row = [f"`{path}`", f"{e['params'] / 1e9:.2f}B", choice or "nothing"]
                    row += [f"{e['trainable'] / 1e9:.2f}B", str(z), str(n)]
                    row += [f"{e[k]:.1f} GiB" for k in ("weights", "grads", "optim", "acts", "total")]
                    row.append(fits_on(e["total"]))
                    print("| " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
