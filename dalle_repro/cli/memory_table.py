"""Expected GPU memory per rank for prior configs: parameters, gradients + optimizer, activations.

Usage: python tools/memory_table.py [CONFIG ...] [--gpus 8 64 ...]
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
from dalle_repro.train.prior_config import PriorTrainConfig, model_with_paper_sizes

DEFAULT = ["configs/gpu/prior-350m.yaml", "configs/gpu/prior-1.3b.yaml", "configs/paper/prior.yaml"]
GIB = 2**30


@dataclass
class MemoryTableArgs:
    """The configs to tabulate, and at which data-parallel sizes."""

    configs: list[str] = arg(factory=lambda: list(DEFAULT), doc="Prior configs (launch/train_prior.py's format).")
    gpus: list[int] = arg(factory=lambda: [8, 64], doc="Data-parallel ranks to tabulate.", ge=1)


def fp32_in_the_paper(model: Transformer) -> int:
    """Parameters the paper keeps in fp32: gains, biases, embeddings, unembeddings (all but the
    blocks' weight matrices)."""
    half = sum(p.numel() for b in model.blocks for p in b.parameters() if p.dim() >= 2)
    return sum(p.numel() for p in model.parameters()) - half


def estimate(cfg: PriorTrainConfig, gpus: int, paper_storage: bool = False) -> dict[str, float]:
    with torch.device("meta"):
        model = Transformer(cfg.model)
    p = sum(t.numel() for t in model.parameters())
    z = cfg.deepspeed.zero_stage
    if paper_storage:
        p32 = fp32_in_the_paper(model)
        per_weight, per_grad, per_optim = 2 * p + 2 * p32, 2 * p + 2 * p32, 4 * p + 4 * p32
    else:
        scaled = cfg.precision.mode == "block_scaled"
        per_weight, per_grad, per_optim = (4 if scaled else 2) * p, (4 if scaled else 2) * p, (8 if scaled else 12) * p
    weights = per_weight / (gpus if z == 3 else 1)
    grads = per_grad / (gpus if z >= 2 else 1)
    optim = per_optim / (gpus if z >= 1 else 1)
    a = cfg.model
    b, s, d, layers = cfg.data.batch_size, a.seq_len, a.dim, a.depth
    if a.checkpoint:
        acts = layers * 8 * b * s * d + 34 * b * s * d
    else:
        acts = layers * (34 + 8) * b * s * d
    acts += 2 * 4 * b * (a.text_len * a.text_vocab + a.n_image * a.image_vocab)
    return {
        "params": p,
        "weights": weights / GIB,
        "grads": grads / GIB,
        "optim": optim / GIB,
        "acts": acts / GIB,
        "total": (weights + grads + optim + acts) / GIB,
    }


def main(argv: list[str] | None = None) -> int:
    a, _ = parse_cli(MemoryTableArgs, argv, __doc__ or "", aliases={"--gpus": "gpus"}, positional="configs")
    if a is None:
        return 0
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


if __name__ == "__main__":
    sys.exit(main())
