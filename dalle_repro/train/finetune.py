"""Starting a run from trained weights (fine-tuning): the ``init`` section of the prior's and the dVAE's configs.

A fine-tuning run loads a trained model's weights, then trains them with a fresh optimizer, a fresh
schedule and an EMA that starts from the loaded weights, on the data its config names. What it
cannot continue is refused at start, with an error that names both sides:

- the prior: another tokenizer (its vocabulary and merges) or another ``text.text_len``; another
  dVAE (codebook, grid, or the weights' digest: the same codes would mean other pictures); an
  architecture size (``model.dim``, ``depth``, ...) set to something else than the export's. Sizes
  at their defaults are taken from the export (a size set to its default value cannot be told from
  one left unset, and is taken from the export too);
- the dVAE: a ``model`` section that differs from the folder's.

Parts can be frozen (kept bit-identical): ``embeddings`` (the text and image embeddings and the
position tables), ``layers:N`` (the first N resblocks), ``body`` (everything but the output: the
final layer norm and the two heads). The export records what it was fine-tuned from
(``export.json``'s ``fine_tuned_from``: the folder, its step, the digests of its weights and its
config), written at start as ``RUN/init.json``. Resuming a fine-tuning run resumes its own
checkpoint as any run does; the initial weights are read only when a run starts from nothing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from dalle_repro.core.config import ConfigError, arg
from dalle_repro.core.pretrained import build_pretrained, pretrained_args, tensors_digest, weights_digest
from dalle_repro.models.dvae import DVAE, DVAEArgs
from dalle_repro.models.transformer import Transformer, TransformerArgs

log = logging.getLogger(__name__)

# The sizes that make two transformers the same architecture (the rest: backend, dropout, loss weights, ...).
ARCHITECTURE = ("dim", "depth", "heads", "mlp_ratio", "conv_kernel", "conv_wrap", "sandwich_ln")
FREEZE_PARTS = ("embeddings", "layers:N", "body")


@dataclass
class InitArgs:
    """Where a prior run's weights start (fine-tuning), and what stays frozen."""

    export: str | None = arg(
        None,
        "A trained prior's export folder (RUN/export) whose weights this run starts from, with a fresh optimizer "
        "and schedule; null: from scratch. Its tokenizer, text length, dVAE and architecture must be this run's.",
    )
    weights: Literal["model", "raw"] = arg("model", "The export's weights to start from: model (the EMA) or raw.")
    freeze: list[str] = arg(
        factory=list,
        doc="Parts kept as loaded: embeddings (text and image embeddings, position tables), layers:N (the first "
        "N resblocks), body (everything but the final layer norm and the two heads).",
    )


@dataclass
class DVAEInitArgs:
    """Where a dVAE run's weights start (fine-tuning)."""

    dvae: str | None = arg(
        None,
        "A trained dVAE folder (RUN/dvae) whose weights this run starts from, with a fresh optimizer and "
        "schedule; null: from scratch. Its model section must be this run's.",
    )
    weights: Literal["model", "raw"] = arg("model", "The folder's weights to start from (model: the EMA).")


def frozen_names(model: torch.nn.Module, parts: list[str]) -> list[str]:
    """The parameter names that ``parts`` (``init.freeze``) freeze in a :class:`Transformer`."""
    names = [n for n, _ in model.named_parameters()]
    depth = len(getattr(model, "blocks", []))
    out: set[str] = set()
    for part in parts:
        m = re.fullmatch(r"layers:(\d+)", part)
        if part == "embeddings":
            out |= {n for n in names if n.split(".")[0] in ("text_pos", "row_emb", "col_emb", "text_emb", "image_emb")}
        elif m:
            k = int(m.group(1))
            if not 1 <= k <= depth:
                raise ConfigError(f"init.freeze: {part!r} asks for {k} layers; the model has {depth} (1..{depth})")
            out |= {n for n in names if n.startswith("blocks.") and int(n.split(".")[1]) < k}
        elif part == "body":
            out |= {n for n in names if n.split(".")[0] not in ("ln_f", "text_head", "image_head")}
        else:
            raise ConfigError(f"init.freeze: unknown part {part!r}; the parts are {', '.join(FREEZE_PARTS)}")
    return [n for n in names if n in out]


def freeze(model: torch.nn.Module, parts: list[str]) -> list[str]:
    """Turn off the gradients of ``parts``; returns the frozen names (logged with their count)."""
    names = set(frozen_names(model, parts))
    n = 0
    for name, p in model.named_parameters():
        if name in names:
            p.requires_grad_(False)
            n += p.numel()
    if names:
        total = sum(p.numel() for p in model.parameters())
        log.info("init.freeze %s: %d tensors, %d of %d parameters frozen", parts, len(names), n, total)
    return sorted(names)


def _tokenizer_identity(path: str | Path) -> str:
    """A digest of what makes a tokenizer: its model section (vocabulary and merges) and normalizer."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    keep = {k: data.get(k) for k in ("model", "normalizer", "pre_tokenizer", "added_tokens")}
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


def prior_init_config(cfg: Any) -> Any:
    """``cfg`` (a PriorTrainConfig) checked against ``init.export`` and completed from it.

    The architecture sizes left at their defaults take the export's; one set to another value is an
    error. ``dvae`` null takes the export's dVAE. Refused, each naming both sides: another tokenizer,
    another text length, a dVAE with another codebook, grid or weights."""
    export = cfg.init.export
    if export is None:
        return cfg
    d = Path(export)
    if not (d / "export.json").is_file():
        raise ConfigError(f"init.export: {d} is not an export of launch/train_prior.py (no export.json)")
    theirs = pretrained_args(d, TransformerArgs)
    defaults = TransformerArgs()
    sizes = {}
    for key in ARCHITECTURE:
        mine, its = getattr(cfg.model, key), getattr(theirs, key)
        if mine != its and mine != getattr(defaults, key):
            raise ConfigError(
                f"model.{key}: {mine}, but the export {d} was trained with {its}; a fine-tuning run keeps the "
                f"export's architecture (leave model.{key} unset)"
            )
        sizes[key] = its
    if cfg.text.text_len != theirs.text_len:
        raise ConfigError(
            f"text.text_len: {cfg.text.text_len}, but the export {d} was trained with text_len {theirs.text_len}; "
            f"set text.text_len={theirs.text_len}"
        )
    mine_tok, its_tok = _tokenizer_identity(cfg.text.path), _tokenizer_identity(d / "tokenizer.json")
    if mine_tok != its_tok:
        raise ConfigError(
            f"text.path: {cfg.text.path} is another tokenizer (digest {mine_tok}) than the export's "
            f"{d / 'tokenizer.json'} (digest {its_tok}); the same ids would mean other words. Set "
            f"text.path={d / 'tokenizer.json'} and encode nothing again: token shards hold image codes only"
        )
    info = json.loads((d / "export.json").read_text())
    its_dvae = info.get("dvae")
    its_dvae_dir = None if not its_dvae else (Path(its_dvae) if Path(its_dvae).is_absolute() else d / its_dvae)
    dvae = cfg.dvae
    if dvae is None and its_dvae_dir is not None:
        dvae = str(its_dvae_dir)
        log.info("dvae: the export's, %s", dvae)
    if dvae is not None and its_dvae_dir is not None:
        a, b = pretrained_args(dvae, DVAEArgs), pretrained_args(its_dvae_dir, DVAEArgs)
        if (a.vocab_size, a.grid) != (b.vocab_size, b.grid):
            raise ConfigError(
                f"dvae: {dvae} has {a.vocab_size} codes on a {a.grid}x{a.grid} grid, but the export {d} was trained "
                f"over {its_dvae_dir}'s {b.vocab_size} codes on a {b.grid}x{b.grid} grid"
            )
        da, db = weights_digest(DVAE.from_pretrained(dvae)), weights_digest(DVAE.from_pretrained(its_dvae_dir))
        if da != db:
            raise ConfigError(
                f"dvae: {dvae} (weights digest {da}) is another dVAE than the one the export {d} was trained over "
                f"({its_dvae_dir}, digest {db}): its codes mean other pictures. Fine-tune over the export's dVAE "
                "(leave dvae unset) and encode the new images with it"
            )
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **sizes), dvae=dvae)


def load_prior_init(model: Transformer, args: InitArgs) -> dict[str, Any]:
    """Load ``init.export``'s weights into ``model`` (shapes checked first); returns the record the
    export keeps as ``fine_tuned_from``."""
    assert args.export is not None
    d = Path(args.export)
    source = build_pretrained(d, TransformerArgs, Transformer, args.weights)
    state = source.state_dict()
    mine = model.state_dict()
    wrong = [k for k in mine if k not in state or state[k].shape != mine[k].shape]
    if wrong:
        raise ConfigError(f"init.export: {d}'s weights do not fit this model: {', '.join(wrong[:5])}")
    model.load_state_dict(state)
    info = json.loads((d / "export.json").read_text())
    return {
        "export": str(d.resolve()),
        "weights": args.weights,
        "step": info.get("step"),
        "weights_digest": tensors_digest(state),
        "config_digest": hashlib.sha256((d / "config.yaml").read_bytes()).hexdigest()[:16],
        "fine_tuned_from": info.get("fine_tuned_from"),
    }


def load_dvae_init(model: DVAE, args: DVAEInitArgs, mine: DVAEArgs) -> dict[str, Any]:
    """Load ``init.dvae``'s weights into ``model``; a folder of another ``model`` section is refused."""
    assert args.dvae is not None
    theirs = pretrained_args(args.dvae, DVAEArgs)
    diff = [
        f"model.{f.name}: {getattr(mine, f.name)} here, {getattr(theirs, f.name)} in {args.dvae}"
        for f in dataclasses.fields(DVAEArgs)
        if getattr(mine, f.name) != getattr(theirs, f.name)
    ]
    if diff:
        raise ConfigError("init.dvae: another architecture than this run's: " + "; ".join(diff))
    source = DVAE.from_pretrained(args.dvae, weights=args.weights)
    state = source.state_dict()
    model.load_state_dict(state)
    return {"dvae": str(Path(args.dvae).resolve()), "weights": args.weights, "weights_digest": tensors_digest(state)}
