"""The demo's settings (:class:`DemoConfig`), the folders it owns, and the configs it derives for
each training stage: the dVAE's, the prior's and the CLIP's, pointed at the demo's data and run
folders, then the user's overrides, then the time plan's shortening.
"""

from __future__ import annotations

import contextvars
import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from dalle_repro.core.config import (
    ConfigError,
    arg,
    deep_merge,
    from_dict,
    load_config,
    parse_overrides,
    to_dict,
)
from dalle_repro.data.emoji import EmojiArgs
from dalle_repro.data.loader import DataArgs
from dalle_repro.data.shapes import UNLABELLED, ShapesArgs, build_shapes_from
from dalle_repro.data.strokes import build_strokes_dataset
from dalle_repro.data.tokenizer import BPEArgs, TokenizerArgs
from dalle_repro.evaluation.evaluate import EvalArgs
from dalle_repro.sample.generate import SampleSettings
from dalle_repro.train.clip import ClipTrainConfig
from dalle_repro.train.dvae import DVAETrainConfig
from dalle_repro.train.prior_config import PriorTrainConfig

log = logging.getLogger(__name__)

# Whether the demo's command line carried --allow-pipe: the dVAE and prior YAML files the demo
# config names are files too, so their pipe: shards need it (config.refuse_pipe). Set by run_demo
# for its own run only.
ALLOW_PIPE: contextvars.ContextVar[bool] = contextvars.ContextVar("allow_pipe", default=False)


@dataclass
class StrokesArgs(ShapesArgs):
    """The second compositional data set (data/strokes.py), never used for tuning: scenes of one or two
    thin or thick coloured strokes on textured paper, some colour-form pairs held out of training."""

    output: str = arg("data/strokes", "Folder for train/, val/, heldout/ and summary.json.")
    image_size: int = arg(32, "Side of the rendered scenes, in pixels (a thin stroke's form needs 32).", ge=32, le=512)


@dataclass
class DemoConfig:
    """Settings of every stage of the demo."""

    out_dir: str = arg("outputs/demo", "Where the demo's report, previews and stage markers go.")
    dataset: Literal["shapes", "strokes", "emoji"] = arg(
        "shapes",
        "shapes: the compositional scenes with held-out pairs (zero-shot, measured); strokes: the second such "
        "set, never tuned on (configs/demo/strokes.yaml); emoji: the emoji set, which the prior memorises "
        "(configs/demo/emoji.yaml).",
    )
    shapes: ShapesArgs = arg(factory=ShapesArgs, doc="The shapes data set.")
    strokes: StrokesArgs = arg(factory=StrokesArgs, doc="The strokes data set.")
    emoji: EmojiArgs = arg(factory=lambda: EmojiArgs(workers=2), doc="The emoji shards.")
    bpe: BPEArgs = arg(
        factory=lambda: BPEArgs(vocab_size=4096), doc="Tokenizer training (emoji names run out of merges sooner)."
    )
    text: TokenizerArgs = arg(factory=TokenizerArgs, doc="Caption encoding.")
    data: DataArgs = arg(factory=DataArgs, doc="The loader.")
    dvae_config: str = arg("configs/demo/dvae.yaml", "Config of the demo dVAE (launch/train_dvae.py's format).")
    dvae_overrides: list[str] = arg(
        factory=list,
        doc="key=value overrides for the dVAE config, after the demo's own (shards, run_dir), e.g. [run.steps=100].",
    )
    tokens_output: str = arg("data/shapes_tokens", "Folder for the token shards (train/ and val/).")
    prior_config: str = arg("configs/demo/prior.yaml", "Config of the demo prior (launch/train_prior.py's format).")
    prior_overrides: list[str] = arg(
        factory=list, doc="key=value overrides for the prior config, after the demo's own, e.g. [run.steps=50]."
    )
    prior_ranks: int = arg(2, "Ranks the deepspeed launcher starts for the prior (CPU processes without a GPU).", ge=1)
    train_minutes: float | None = arg(
        20.0,
        "Minutes the dVAE, prior and CLIP training may take together on this machine. The demo times a few "
        "updates of each first and, where the configured runs would take longer, shortens all three by one "
        "fraction, schedules alike (dalle_repro/demo/plan.py; OUT/plan.json). null: always the configured runs.",
        gt=0,
    )
    clip: ClipTrainConfig = arg(factory=ClipTrainConfig, doc="The small CLIP (tools/train_clip.py's settings).")
    captions_train: list[str] = arg(factory=list, doc="Training-split captions to sample (the report checks them).")
    captions_val: int = arg(2, "Validation-split captions to sample, the first ones of the split.", ge=0)
    captions_new: list[str] = arg(factory=list, doc="Captions in neither split.")
    sample: SampleSettings = arg(
        factory=lambda: SampleSettings(candidates=32, keep=4, batch_size=None),
        doc="How the demo captions are sampled and reranked.",
    )
    evaluation: EvalArgs = arg(factory=EvalArgs, doc="The zero-shot evaluation (shapes and strokes only).")
    rerank_against_train: bool = arg(
        False,
        "Rerank the demo's samples and the evaluation's candidates against the training captions: "
        "sample.rerank_reference and evaluation.sample.rerank_reference become DATA/train/*.tar (the data "
        "set's own training shards), unless set.",
    )


def _build_strokes(a: ShapesArgs, overwrite: bool = False) -> dict[str, Any]:
    return build_strokes_dataset(
        a.output,
        n_train=a.train,
        n_heldout=a.heldout,
        n_unlabelled=a.unlabelled,
        image_size=a.image_size,
        shard_size=a.shard_size,
        val_fraction=a.val_fraction,
        seed=a.seed,
        workers=a.workers,
        overwrite=overwrite,
    )


# The compositional worlds (data/worlds.py): their data sets' builders.
SCENES = {"shapes": build_shapes_from, "strokes": _build_strokes}


def data_args(cfg: DemoConfig) -> ShapesArgs | EmojiArgs:
    """The settings of the chosen data set."""
    return {"shapes": cfg.shapes, "strokes": cfg.strokes, "emoji": cfg.emoji}[cfg.dataset]


def data_dir(cfg: DemoConfig) -> Path:
    """The folder of the chosen data set (train/, val/, and for shapes and strokes heldout/)."""
    return Path(data_args(cfg).output)


def dvae_images(cfg: DemoConfig) -> str:
    """The data set's folder the dVAE trains on: ``unlabelled`` (scenes of every pair, no captions)
    where the shapes or strokes section asks for them, else ``train``, as the prior and CLIP."""
    a = data_args(cfg)
    return UNLABELLED if isinstance(a, ShapesArgs) and a.unlabelled > 0 else "train"


DEMO_MARK = ".dalle-repro-demo"


def claim(folder: str | Path) -> Path:
    """``folder`` as the demo's own: created with the mark file :data:`DEMO_MARK` in it, or found
    empty or with the mark. Anything else raises ConfigError naming it.

    The demo replaces what it made (a run folder from other settings, the shapes and token shards
    it wrote), so it must know what it made: ``out_dir`` or ``shapes.output`` pointed at a user's
    folder would otherwise lose its checkpoints or shards."""
    folder = Path(folder)
    mark = folder / DEMO_MARK
    if folder.is_dir() and not mark.is_file() and any(folder.iterdir()):
        raise ConfigError(
            f"{folder} exists and was not made by the demo (it has no {DEMO_MARK} file); the demo replaces only "
            "folders it made: point the demo elsewhere (out_dir, shapes.output, tokens_output, run_dir overrides) "
            "or move that folder away"
        )
    folder.mkdir(parents=True, exist_ok=True)
    mark.touch()
    return folder


def plan_path(cfg: DemoConfig) -> Path:
    return Path(cfg.out_dir, "plan.json")


def read_plan(path: Path) -> dict[str, Any] | None:
    """The plan file, None before the plan stage has written one; a damaged one is named.

    Only its ``fraction`` (checked to lie in [MIN_FRACTION, 1]) and its timings are read back: the
    file sits in the output folder, which may have come from someone else, so the overrides it
    records are recomputed from the fraction (:func:`planned`) rather than applied as written."""
    from dalle_repro.demo import plan as dp

    if not path.is_file():
        return None
    try:
        plan = json.loads(path.read_text())
        f = plan.get("fraction") if isinstance(plan, dict) else None
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not dp.MIN_FRACTION <= f <= 1:
            raise ValueError(f"fraction {f!r} is not a number in [{dp.MIN_FRACTION}, 1]")
        return plan
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: unreadable time plan ({e}); delete it and run the demo again to plan anew") from e


def planned(cfg: DemoConfig, stage: Literal["dvae", "prior", "clip"]) -> list[str]:
    """The plan's overrides for a training stage: its update counts (plan.SCALED_KEYS) scaled by
    the plan's fraction (none before the plan stage has run)."""
    from dalle_repro.demo import plan as dp

    plan = read_plan(plan_path(cfg))
    if plan is None:
        return []
    unplanned = {"dvae": dvae_config, "prior": prior_config, "clip": clip_config}[stage](cfg, plan=False)
    return dp.scaled_overrides(unplanned, dp.SCALED_KEYS[stage], plan["fraction"])


def dvae_config(cfg: DemoConfig, plan: bool = True) -> DVAETrainConfig:
    """The demo dVAE's config: its YAML, pointed at the demo's shards and run folder, then the
    user's overrides, then the time plan's shortening of the result (``plan``; train_minutes=null
    trains exactly what the overrides say)."""
    e = data_dir(cfg)
    images = dvae_images(cfg)
    own = [f"data.shards={e}/{images}/*.tar", f"run.val_shards={e}/val/*.tar", f"run.run_dir={cfg.out_dir}/dvae"]
    return load_config(
        DVAETrainConfig,
        cfg.dvae_config,
        [*own, *cfg.dvae_overrides, *(planned(cfg, "dvae") if plan else [])],
        allow_pipe=ALLOW_PIPE.get(),
    )


def prior_config(cfg: DemoConfig, plan: bool = True) -> PriorTrainConfig:
    """The demo prior's config: its YAML, pointed at the demo's tokens, tokenizer, dVAE and run
    folder, then the user's overrides, then the time plan's shortening (``plan``)."""
    t = cfg.tokens_output
    # the model's sizes are left to train_prior.resolve_sizes: the tokenizer's vocabulary, the dVAE's grid and codes
    own = [
        f"text.text_len={cfg.text.text_len}",
        f"data.shards={t}/train/*.tar",
        "data.kind=tokens",
        f"run.val_shards={t}/val/*.tar",
        f"dvae={dvae_config(cfg, plan=False).run.run_dir}/dvae",
        f"text.path={cfg.text.path}",
        f"run.run_dir={cfg.out_dir}/prior",
    ]
    return load_config(
        PriorTrainConfig,
        cfg.prior_config,
        [*own, *cfg.prior_overrides, *(planned(cfg, "prior") if plan else [])],
        allow_pipe=ALLOW_PIPE.get(),
    )


def clip_config(cfg: DemoConfig, plan: bool = True) -> ClipTrainConfig:
    """The small CLIP's settings, pointed at the demo's shards, tokenizer and folder; ``plan``: its
    length as the time plan sets it."""
    c = cfg.clip
    if plan and (shorter := planned(cfg, "clip")):
        c = from_dict(ClipTrainConfig, deep_merge(to_dict(c), parse_overrides(shorter)))
    return dataclasses.replace(
        c,
        text=dataclasses.replace(c.text, path=cfg.text.path),
        data=dataclasses.replace(c.data, shards=f"{data_dir(cfg)}/train/*.tar"),
        run=dataclasses.replace(c.run, run_dir=f"{cfg.out_dir}/clip", val_shards=f"{data_dir(cfg)}/val/*.tar"),
    )
