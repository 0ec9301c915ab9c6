"""The prior trainer's config (its sections' Args), and the sizes it reads off the tokenizer, the dVAE
and the token shards' ``summary.json`` instead of asking for them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from dalle_repro.core.config import ConfigError, arg
from dalle_repro.core.precision import PrecisionArgs
from dalle_repro.core.pretrained import pretrained_args, weights_digest
from dalle_repro.data.loader import DataArgs
from dalle_repro.data.sources import expand_shards, is_remote
from dalle_repro.data.tar import first_token_grid
from dalle_repro.data.tokenizer import TextTokenizer, TokenizerArgs
from dalle_repro.models.dvae import DVAE, DVAEArgs
from dalle_repro.models.transformer import TransformerArgs
from dalle_repro.train.finetune import InitArgs
from dalle_repro.train.loop import RunArgs
from dalle_repro.train.metrics import LogArgs

log = logging.getLogger(__name__)


@dataclass
class PriorScheduleArgs:
    """Learning rate: linear warm-up, then decay (SPEC §2: 4.5e-4 after 5,000 warm-up updates)."""

    lr: float = arg(4.5e-4, "Peak learning rate, reached at the end of the warm-up.", gt=0)
    warmup_steps: int = arg(5000, "Updates of linear warm-up from lr/warmup_steps to lr.", ge=0)
    decay: Literal["cosine", "plateau", "constant"] = arg(
        "cosine", "After the warm-up: cosine to lr_end; plateau: times plateau_factor when validation stalls."
    )
    lr_end: float = arg(0.0, "cosine: the final learning rate; plateau: the smallest.", ge=0)
    decay_steps: int | None = arg(None, "cosine: updates of the decay after the warm-up; null: until run.steps.", gt=0)
    plateau_factor: float = arg(0.5, "plateau: the factor applied when validation loss stops falling.", gt=0, lt=1)
    plateau_patience: int = arg(2, "plateau: validations without a new best before the learning rate drops.", ge=1)


@dataclass
class PriorOptimArgs:
    """AdamW (SPEC §2), clipping and the EMA of weights."""

    impl: Literal["torch", "deepspeed", "apex"] = arg(
        "torch",
        "torch: torch.optim.AdamW (fused on CUDA); deepspeed: DeepSpeed's FusedAdam from the generated config; "
        "apex: apex.optimizers.FusedAdam (needs apex installed).",
    )
    beta1: float = arg(0.9, "Adam beta1.", ge=0, lt=1)
    beta2: float = arg(0.96, "Adam beta2 (the paper: 0.96).", ge=0, lt=1)
    eps: float = arg(1e-8, "Adam epsilon.", gt=0)
    weight_decay: float = arg(4.5e-2, "Decoupled weight decay, on weights (2-d tensors) only.", ge=0)
    grad_clip: float = arg(4.0, "Clip the global gradient norm to this (the paper: 4); 0: no clipping.", ge=0)
    ema_decay: float = arg(
        0.999, "[?] EMA decay of the weights (the paper names 0.99 or 0.999, not which); warmed up.", ge=0, lt=1
    )


@dataclass
class DeepSpeedArgs:
    """What goes into the generated DeepSpeed config (RUN/deepspeed.json)."""

    zero_stage: int = arg(
        0, "ZeRO stage: 0 (plain data parallel), 1 (optimizer), 2 (+gradients), 3 (+weights).", ge=0, le=3
    )
    grad_accum: int = arg(1, "Micro-batches (data.batch_size each) per update on each rank.", ge=1)
    config: str | None = arg(None, "A DeepSpeed JSON of your own, merged over the generated one (its keys win).")


@dataclass
class PriorRunArgs(RunArgs):
    """The run (train/loop.py's RunArgs), with caption dropout, sample grids and the export."""

    run_dir: str = arg("runs/prior", "Folder for checkpoints, metrics, sample grids and the export.")
    seed: int = arg(0, "Seed of the initial weights (the same on every rank) and of caption dropout.", ge=0)
    val_shards: str | None = arg(None, "Validation shards (same kind as data.kind); null: no validation.")
    caption_dropout: float = arg(
        0.0, "Probability of replacing a caption by the empty one (for classifier-free guidance).", ge=0, lt=1
    )
    sample_every: int = arg(1000, "Updates between sample grids from fixed captions (needs dvae).", gt=0)
    sample_captions: int = arg(4, "Captions from the validation split in the sample grid.", ge=0)
    sample_prompts: list[str] = arg(factory=list, doc="More captions for the sample grid.")
    copy_dvae: bool = arg(True, "Copy the dVAE folder into the export (else the export records its path).")


# The update counts of the config that scale with the run's length (the demo's time plan, run.end_by).
LENGTH_KEYS = (
    "run.steps",
    "schedule.warmup_steps",
    "schedule.decay_steps",
    "run.ckpt_every",
    "run.val_every",
    "run.sample_every",
)


@dataclass
class PriorTrainConfig:
    """Everything a prior run reads."""

    model: TransformerArgs = arg(factory=TransformerArgs, doc="The transformer.")
    precision: PrecisionArgs = arg(factory=PrecisionArgs, doc="Mixed precision (SPEC §3).")
    text: TokenizerArgs = arg(factory=TokenizerArgs, doc="Caption encoding.")
    dvae: str | None = arg(
        None, "dVAE folder (train_dvae's RUN/dvae): encodes image shards on the fly and decodes sample grids."
    )
    data: DataArgs = arg(factory=DataArgs, doc="Training samples: token shards (data.kind: tokens) or images.")
    schedule: PriorScheduleArgs = arg(factory=PriorScheduleArgs, doc="Learning-rate schedule.")
    optim: PriorOptimArgs = arg(factory=PriorOptimArgs, doc="Optimiser and EMA.")
    deepspeed: DeepSpeedArgs = arg(factory=DeepSpeedArgs, doc="DeepSpeed.")
    run: PriorRunArgs = arg(factory=PriorRunArgs, doc="The run.")
    init: InitArgs = arg(factory=InitArgs, doc="Start from a trained export's weights (fine-tuning).")
    log: LogArgs = arg(factory=LogArgs, doc="Logging.")

    def __post_init__(self) -> None:
        if self.model.text_len is not None and self.text.text_len != self.model.text_len:
            raise ConfigError(
                f"model.text_len: {self.model.text_len}, but text.text_len is {self.text.text_len}; state it once, "
                "as text.text_len (model.text_len follows it when null)"
            )
        if self.data.kind == "images" and self.dvae is None:
            raise ConfigError("dvae: image shards (data.kind: images) need a dVAE folder to encode them")
        if self.precision.mode == "deepspeed" and self.precision.dtype == "fp32":
            raise ConfigError("precision.dtype: precision.mode 'deepspeed' needs bf16 or fp16")


def token_summary(shards: list[str]) -> tuple[Path, dict[str, Any]] | None:
    """The ``summary.json`` that tools/encode_tokens.py wrote at the top of its output, found from
    the first local shard upwards (three folders at most), when it names a grid and a codebook."""
    for shard in [p for p in shards if not is_remote(p)][:1]:
        folder = Path(shard).parent
        for d in [folder, *list(folder.parents)[:3]]:
            path = d / "summary.json"
            try:
                summary = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if isinstance(summary, dict) and {"grid", "vocab_size"} <= summary.keys():
                return path, summary
    return None


MAX_GRID, MAX_IMAGE_VOCAB = 256, 1 << 20  # a summary.json's sizes beyond these are refused (the paper's: 32, 8192)


def _summary_sizes(where: Path, summary: dict[str, Any], shards: list[str]) -> tuple[int, int]:
    """(grid, codes) of a token folder's summary.json, bounded and checked against a token grid of
    the shards themselves before anything is sized from them: the file comes with the data set,
    and a grid of 100000 or a codebook of 2e9 would size the model before any check."""
    out = []
    for name, key, top in (("grid", "model.grid", MAX_GRID), ("vocab_size", "model.image_vocab", MAX_IMAGE_VOCAB)):
        v = summary[name]
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= top:
            raise ConfigError(f"{key}: {where} gives {name} {v!r}, not an integer in [1, {top}]; set dvae= instead")
        out.append(v)
    found = first_token_grid([p for p in shards if not is_remote(p)])
    if found is not None and found[1] != (out[0], out[0]):
        raise ConfigError(
            f"model.grid: {where} gives grid {out[0]}, but the token shards hold {found[1]} grids ({found[0]}); "
            "set dvae= the dVAE that made them"
        )
    return out[0], out[1]


def resolve_sizes(cfg: PriorTrainConfig) -> tuple[PriorTrainConfig, list[str]]:
    """``cfg`` with every null size read off its source, and one line per size saying where from.

    Sources: ``text.text_len``; the tokenizer file (``TextTokenizer.vocab_size``: BPE + text_len
    pads); the dVAE folder's config (grid, codes, image size); without a dVAE, the token shards'
    ``summary.json`` (tools/encode_tokens.py). A size given explicitly is kept and checked against
    its source, with an error naming both."""
    m, notes = cfg.model, []
    sizes: dict[str, int] = {}

    def take(key: str, given: int | None, found: int | None, source: str, hint: str = "") -> None:
        if found is None:
            if given is None:
                raise ConfigError(f"{key}: not set, and {source}{hint}")
            notes.append(f"{key}: {given} (given)")
            return
        if given is not None and given != found:
            raise ConfigError(f"{key}: {given}, but {source} gives {found}{hint}; leave it unset to use {found}")
        notes.append(f"{key}: {found} ({'given, checked against ' if given is not None else 'from '}{source})")
        sizes[key.split(".")[1]] = found

    text_len = cfg.text.text_len
    take("model.text_len", m.text_len, text_len, "text.text_len")
    tokenizer = TextTokenizer(cfg.text.path, text_len)
    take(
        "model.text_vocab",
        m.text_vocab,
        tokenizer.vocab_size,
        f"{cfg.text.path} ({tokenizer.bpe_vocab_size} BPE + {text_len} pads)",
    )
    image_size = None
    if cfg.dvae is not None:
        dv = pretrained_args(cfg.dvae, DVAEArgs)
        grid_src = codes_src = f"the dVAE {cfg.dvae}"
        grid, codes, image_size = dv.grid, dv.vocab_size, dv.image_size
    else:
        shards = expand_shards(cfg.data.shards) if cfg.data.kind == "tokens" else []
        found = token_summary(shards) if cfg.data.kind == "tokens" else None
        where = found[0] if found else None
        grid, codes = _summary_sizes(found[0], found[1], shards) if found else (None, None)
        grid_src = codes_src = (
            f"the token shards' summary {where}" if where else "there is no dvae= and no summary.json beside the shards"
        )
    hint = "" if grid is not None else " (tools/encode_tokens.py writes one at the top of its output); set dvae="
    take("model.grid", m.grid, grid, grid_src, hint)
    take("model.image_vocab", m.image_vocab, codes, codes_src, hint)
    data = cfg.data
    if cfg.data.kind == "images" and image_size is not None:
        given = cfg.data.image_size
        if given is not None and given != image_size:
            raise ConfigError(f"data.image_size: {given}, but the dVAE {cfg.dvae} takes {image_size}; leave it unset")
        notes.append(f"data.image_size: {image_size} (from the dVAE {cfg.dvae})")
        data = dataclasses.replace(cfg.data, image_size=image_size)
    model = dataclasses.replace(m, **sizes)
    return dataclasses.replace(cfg, model=model, data=data), notes


PAPER_BPE, PAPER_GRID, PAPER_CODES = 16384, 32, 8192  # SPEC §2: the paper's BPE vocabulary, token grid, codebook


def model_with_paper_sizes(cfg: PriorTrainConfig) -> TransformerArgs:
    """``cfg.model`` with each null size set to the paper's (16,384 BPE + text.text_len pads, a 32x32
    grid of 8192 codes), for tools that size a config without its tokenizer, dVAE or shards at
    hand (tools/memory_table.py, bench/gpu_check.py). Training reads them off the files instead."""
    m, t = cfg.model, cfg.text.text_len
    return dataclasses.replace(
        m,
        text_len=m.text_len or t,
        text_vocab=m.text_vocab or PAPER_BPE + t,
        grid=m.grid or PAPER_GRID,
        image_vocab=m.image_vocab or PAPER_CODES,
    )


def check_token_shards(cfg: PriorTrainConfig) -> None:
    """Token shards whose grids the model cannot take fail here, before DeepSpeed starts, rather
    than as every sample skipped (``wrong_token_grid``) once the loader runs."""
    found = first_token_grid([p for p in expand_shards(cfg.data.shards) if not is_remote(p)])  # no download
    g = cfg.model.grid
    if found is not None and found[1] != (g, g):
        where, shape = found
        raise ConfigError(
            f"model.grid: {g}, but the token shards hold {shape[0]}x{shape[1]} grids ({where}): they were made "
            "with another dVAE. Encode the images again with this one (tools/encode_tokens.py), or set "
            f"model.grid={shape[0]} and dvae= the dVAE that made them."
        )


def check_tokens_match_dvae(cfg: PriorTrainConfig) -> None:
    """Token shards made by another dVAE than ``dvae=`` fail here, at start: their codes mean other
    pictures to this dVAE, and a prior trained on them exits 0 having learnt the wrong thing. The
    shards' ``summary.json`` (tools/encode_tokens.py) records the codebook, the grid and a digest
    of the weights that made them; each is compared with the dVAE given, and an error names both."""
    if cfg.data.kind != "tokens" or cfg.dvae is None:
        return
    found = token_summary(expand_shards(cfg.data.shards))
    if found is None:  # no summary (shards made elsewhere): check_token_shards still checks the grid
        return
    path, summary = found
    dv = pretrained_args(cfg.dvae, DVAEArgs)
    theirs = f"the dVAE {summary.get('dvae', '(unnamed)')} that made the token shards ({path})"
    if (int(summary["vocab_size"]), int(summary["grid"])) != (dv.vocab_size, dv.grid):
        raise ConfigError(
            f"dvae: {cfg.dvae} has {dv.vocab_size} codes on a {dv.grid}x{dv.grid} grid, but {theirs} has "
            f"{summary['vocab_size']} codes on a {summary['grid']}x{summary['grid']} grid. " + _RE_ENCODE
        )
    if "dvae_digest" not in summary:
        log.warning("%s records no dVAE digest (an older encode_tokens): the dVAE's weights are not checked", path)
        return
    digest = weights_digest(DVAE.from_pretrained(cfg.dvae))
    if digest != summary["dvae_digest"]:
        raise ConfigError(
            f"dvae: {cfg.dvae} (weights digest {digest}) has the shape of {theirs}, but not its weights "
            f"(digest {summary['dvae_digest']}). " + _RE_ENCODE
        )


_RE_ENCODE = (
    "Encode the images again with this dVAE (tools/encode_tokens.py), or set dvae= the dVAE that made the shards."
)
