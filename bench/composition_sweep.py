"""Which choices buy composition: the shapes demo's stages, in memory, for several variants at once.

The demo takes 20 minutes a run on a 2-core CPU, too long to compare choices by whole runs there.
This sweep runs the same models on whatever device it is given (a GPU turns a demo run into
seconds) without the demo's files: scenes rendered in memory, the dVAE trained with the trainer's
own ``train_step`` and schedules, the prior with the model's own loss, the demo's LR schedule,
caption dropout, EMA and AdamW (no DeepSpeed: one process), and samples drawn with the sampler
the project ships (``sample.generate``: the KV cache, temperature, guidance). Each variant is
scored by reading every sample back (``evaluation.tasks``): all attributes right over all
candidates, for 96 seen and 96 held-out captions, with 95% intervals; the dVAE by what its
reconstructions of the same renders keep, with codebook usage.

Variants are named ``key=value`` edits of the demo configuration (configs/demo/*.yaml), so a
variant that wins here is a config change the demo can take. Numbers from another device are not
the demo's numbers (other kernels, other precision): they rank choices, the demo run measures them.

Priors can be compared on a demo run's own dVAE (``--dvae-from NAME=RUN/dvae``, no dVAE trained),
trained with attribute dropout (``word_drop=P``) and sampled several ways (``--score``: the guidance
scale, and guidance against the caption without its shape words instead of the empty caption).

Usage: python bench/composition_sweep.py --out OUT [--device cuda] [--quick]
       [--dvae NAME:key=value,key=value] [--dvae ...] [--dvae-from NAME=DIR]
       [--prior NAME:key=value,...] [--prior ...] [--score NAME:guidance=G,contrast=shape] [--score ...]
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing import Pool
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dalle_repro.core.cli import flag_aliases, parse_cli
from dalle_repro.core.config import arg, deep_merge, from_dict, load_yaml, parse_overrides
from dalle_repro.core.precision import PrecisionArgs
from dalle_repro.data import shapes
from dalle_repro.data.worlds import world_of
from dalle_repro.evaluation.tasks import read_back, summarize
from dalle_repro.models.dvae import DVAE, codebook_usage
from dalle_repro.models.transformer import Transformer, TransformerArgs
from dalle_repro.train.dvae import DVAETrainConfig, State, train_step
from dalle_repro.train.optim import EMA, adamw, cosine, param_groups


def _render(args: tuple[str, dict[str, Any], int, int]) -> np.ndarray:
    world, scene, size, seed = args
    return np.asarray(world_of(world).render(shapes.Scene.from_json(scene), size, seed=seed))


def scenes(
    n: int, held_out: bool | None, seed: int, size: int, workers: int, world: str = "shapes"
) -> tuple[list[str], torch.Tensor]:
    """``n`` random scenes of ``world`` (seen pairs only, each with a held-out pair, or ``held_out``
    None: scenes over every pair, the dVAE's unlabelled pool): captions and uint8 images."""
    w = world_of(world)
    rng = np.random.default_rng([seed, 2 if held_out is None else int(held_out)])
    draw = w.any_scene if held_out is None else w.random_scene
    sc = [draw(rng, held_out) for _ in range(n)]
    offset = {None: 2 * 10**9, True: 10**9, False: 0}[held_out]
    jobs = [(world, s.to_json(), size, seed * 1_000_003 + i + offset) for i, s in enumerate(sc)]
    with Pool(workers) as pool:
        ims = pool.map(_render, jobs, chunksize=256)
    return [s.caption() for s in sc], torch.from_numpy(np.stack(ims)).permute(0, 3, 1, 2).contiguous()


def distinct(captions: list[str], images: torch.Tensor, limit: int) -> tuple[list[str], torch.Tensor]:
    """The first ``limit`` distinct captions and the first image of each."""
    seen: dict[str, int] = {}
    for i, c in enumerate(captions):
        if c not in seen and len(seen) < limit:
            seen[c] = i
    return list(seen), images[list(seen.values())]


def edited(path: str, cls: type, edits: str) -> Any:
    """The config at ``path`` with ``key=value,key=value`` edits."""
    data = load_yaml(ROOT / path)
    if edits:
        data = deep_merge(data, parse_overrides(edits.split(",")))
    return from_dict(cls, data)


def train_dvae(
    cfg: DVAETrainConfig,
    images: torch.Tensor,
    dev: torch.device,
    seed: int,
    each_update: Callable[[int, dict], None] | None = None,
) -> tuple[DVAE, dict]:
    """The demo's dVAE trained ``cfg.run.steps`` updates on batches of ``images`` with the trainer's
    own ``train_step``; ``each_update(update, metrics)`` sees every update's metrics. Returns the EMA."""
    torch.manual_seed(seed)
    model = DVAE(cfg.model).to(dev)
    o = cfg.optim
    opt = adamw(model, cfg.schedule.lr_start, (o.beta1, o.beta2), o.eps, o.weight_decay)
    st = State(model, model, opt, EMA(model, o.ema_decay), None, None)  # type: ignore[arg-type]
    gen = torch.Generator().manual_seed(seed)
    b, t0 = cfg.data.batch_size, time.perf_counter()
    for i in range(cfg.run.steps):
        idx = torch.randint(0, len(images), (b,), generator=gen)
        x = images[idx].to(dev).float().div_(255)
        last = train_step(st, x, cfg, dev)
        if each_update is not None:
            each_update(i + 1, last)
    ema = DVAE(cfg.model).to(dev)
    ema.load_state_dict({k: v.to(dev) for k, v in st.ema.state_dict().items()})
    return ema.eval(), {"seconds": round(time.perf_counter() - t0, 1), "last": last}


@torch.no_grad()
def encode(dvae: DVAE, images: torch.Tensor, dev: torch.device) -> torch.Tensor:
    return torch.cat([dvae.encode(b.to(dev).float() / 255).cpu() for b in images.split(512)])


@torch.no_grad()
def ceiling(dvae: DVAE, captions: list[str], images: torch.Tensor, dev: torch.device) -> dict[str, Any]:
    tokens = encode(dvae, images, dev)
    recon = torch.cat([dvae.decode(t.to(dev)).cpu() for t in tokens.split(512)])
    usage = codebook_usage(torch.bincount(tokens.flatten(), minlength=dvae.args.vocab_size))
    s = summarize(read_back(recon, captions, world_of(captions[0])))
    return {
        "all": s["all"],
        "shape": s["shape"],
        "codes_used": usage["codes_used"],
        "perplexity": round(usage["perplexity"], 1),
    }


def train_prior(
    settings: dict[str, Any],
    text: torch.Tensor,
    image: torch.Tensor,
    empty: torch.Tensor,
    margs: TransformerArgs,
    dev: torch.device,
    seed: int,
    partial: tuple[torch.Tensor, torch.Tensor] | None = None,
    word_drop: float = 0.0,
    swap: tuple[torch.Tensor, torch.Tensor] | None = None,
    swap_weight: float = 0.0,
) -> tuple[Transformer, dict[str, Any]]:
    """The demo prior's training without DeepSpeed: AdamW on the model's loss, warm-up then cosine,
    caption dropout, the EMA the export keeps. Attribute dropout (``word_drop`` P with ``partial``,
    the captions' tokens without their shape words and without their colour words): a caption loses
    its shape words with probability P/2 and its colour words with P/2, so that the prior also learns
    what a shape word and a colour word draw alone, and knows a caption without its shape words.
    Swap contrast (``swap_weight`` W with ``swap``, each caption's tokens with its two shapes swapped
    and whether that swap is eligible): for every eligible row, W times -log sigmoid(log p(image |
    caption) - log p(image | swapped caption)), the prior as a classifier between a caption and its
    swap, so that it must read which shape goes with which colour. Eligible: two objects of two shapes
    and two colours whose swap makes only seen pairs (no held-out pair reaches training, not even as
    text)."""
    torch.manual_seed(seed)
    model = Transformer(margs).to(dev)
    # the demo's precision: per-resblock bf16 with the fp32 residual stream where the device runs bf16
    # natively (precision.dtype auto), the block scaler dropping a non-finite branch's gradients
    scaler = model.enable_precision(PrecisionArgs(dtype=settings.get("precision", {}).get("dtype", "auto")))
    o, s, r = settings["optim"], settings["schedule"], settings["run"]
    opt = torch.optim.AdamW(param_groups(model, o.get("weight_decay", 0.01)), lr=s["lr"], betas=(0.9, 0.96))
    ema = EMA(model, o.get("ema_decay", 0.99))
    steps, batch = int(r["steps"]), int(settings["data"]["batch_size"]) * settings.get("ranks", 2)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    for step in range(steps):
        warm = int(s.get("warmup_steps", 100))
        lr = s["lr"] * (step + 1) / warm if step < warm else cosine(step - warm, s["lr"], s["lr_end"], steps - warm)
        for g in opt.param_groups:
            g["lr"] = lr
        idx = torch.randint(0, len(text), (batch,), generator=gen)
        t, im = text[idx].to(dev), image[idx].to(dev)
        whole = torch.ones(batch, dtype=torch.bool, device=dev)  # rows that keep their whole caption
        if word_drop > 0 and partial is not None:
            u = torch.rand(batch, generator=gen).to(dev)[:, None]
            whole = u[:, 0] >= word_drop
            t = torch.where(
                u < word_drop / 2, partial[0][idx].to(dev), torch.where(u < word_drop, partial[1][idx].to(dev), t)
            )
        drop = torch.rand(batch, generator=gen) < float(r.get("caption_dropout", 0.0))
        t = torch.where(drop.to(dev)[:, None], empty.to(dev), t)
        text_logits, image_logits = model(t, im)
        loss = model.loss_from_logits(t, im, text_logits, image_logits).loss
        rows = (swap[1][idx].to(dev) & whole & ~drop.to(dev)) if swap is not None and swap_weight > 0 else None
        if rows is not None and rows.any():
            im_s = im[rows]
            logp_true = -F.cross_entropy(image_logits[rows].transpose(1, 2), im_s, reduction="none").sum(1)
            _, swapped_logits = model(swap[0][idx].to(dev)[rows], im_s)
            logp_swap = -F.cross_entropy(swapped_logits.transpose(1, 2), im_s, reduction="none").sum(1)
            loss = loss + swap_weight * F.softplus(logp_swap - logp_true).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        scaler.end_step(model.branch_params(), step)
        torch.nn.utils.clip_grad_norm_(model.parameters(), float(o.get("grad_clip", 4.0)))
        opt.step()
        ema.update(model, step)
    out = Transformer(margs).to(dev)
    out.load_state_dict({k: v.to(dev) for k, v in ema.state_dict().items()})
    return out.eval(), {"seconds": round(time.perf_counter() - t0, 1), "last_loss": round(float(loss.detach()), 4)}


@torch.no_grad()
def score_prior(
    prior,
    dvae,
    tok,
    captions: list[str],
    candidates: int,
    seed: int,
    dev: torch.device,
    guidance: float = 2.0,
    contrast: str = "",
) -> dict[str, Any]:
    """``candidates`` samples of every caption in one cached, guided generate call (temperature 0.7;
    the demo's evaluation guides by 2 against the empty caption), decoded and read back. ``contrast``
    "shape" or "colour" guides against the caption without its shape (colour) words instead of the
    empty one: ``c + (guidance - 1) * (c - u)`` then amplifies what those words add, alone."""
    world = world_of(captions[0])
    words = {"": None, "shape": world.SHAPES, "colour": tuple(world.COLOURS)}[contrast]
    rows = torch.tensor([tok.encode(c) for c in captions for _ in range(candidates)], dtype=torch.long, device=dev)
    if words is None:
        uncond = torch.tensor([tok.encode("")], dtype=torch.long, device=dev).expand(len(rows), -1)
    else:
        uncond = torch.tensor(
            [tok.encode(without(c, words)) for c in captions for _ in range(candidates)], dtype=torch.long, device=dev
        )
    gen = torch.Generator(device=dev).manual_seed(seed)
    grid = prior.args.grid
    tokens = torch.cat(
        [
            prior.generate(r, temperature=0.7, uncond=u, guidance=guidance, generator=gen)
            for r, u in zip(rows.split(1024), uncond.split(1024), strict=True)
        ]
    )
    images = torch.cat([dvae.decode(t.view(-1, grid, grid)).cpu() for t in tokens.split(1024)])
    s = summarize(read_back(images, [c for c in captions for _ in range(candidates)], world))
    keys = ("all", "shape", "colour", "colour_shape_binding", "position", "counting", "shapes_swapped")
    return {k: s[k] for k in keys} | {"overall": s["overall"]}


def without(caption: str, words: Sequence[str]) -> str:
    """``caption`` with every word of ``words`` left out ("a big red triangle on the left" without the
    shapes: "a big red on the left")."""
    drop = set(words)
    return " ".join(w for w in caption.split() if w not in drop)


def swapped_caption(caption: str, world: Any) -> str | None:
    """``caption`` with its two objects' shapes exchanged (``Scene.shapes_swapped``), where the swap
    pairs each colour with a shape seen with it in training; else None."""
    swap = world.parse_caption(caption).shapes_swapped()
    if swap is None or swap.pairs() & set(world.HELD_OUT):
        return None
    return swap.caption()


def variant(text: str) -> tuple[str, str]:
    name, _, edits = text.partition(":")
    return name, edits


@dataclass
class SweepArgs:
    """The sweep's settings. A variant is NAME:key=value,key=value (edits of configs/demo/*.yaml); give
    one per flag (``--dvae base: --dvae v2048:model.vocab_size=2048``)."""

    out: str = arg(doc="Folder for sweep.json.")
    device: Literal["auto", "cpu", "cuda"] = arg("auto", "auto: CUDA when there is one.")
    world: Literal["shapes", "strokes"] = arg(
        "shapes", "The data set: the demo's shapes, or the strokes set that no setting was tuned on."
    )
    train: int = arg(8000, "Training scenes (the demo's shapes.train).", gt=0)
    dvae: list[str] = arg(
        factory=list,
        doc="dVAE variants to train, NAME:key=value,...; none given: base: (the demo's), unless --dvae-from. "
        "pairs=all: trained on as many unlabelled scenes of every pair, held-out ones included (the priors "
        "still train on seen pairs only).",
    )
    prior: list[str] = arg(
        factory=lambda: ["base:"],
        doc="Prior variants, NAME:key=value,... (also train=N, ranks=N, dvae=NAME, "
        "word_drop=P: attribute dropout, swap_weight=W: swap contrast, see train_prior).",
    )
    prior_dvae: str | None = arg(None, "The dVAE variant the priors use; null: the first.")
    dvae_from: list[str] = arg(
        factory=list,
        doc="Trained dVAEs to use as variants as they are, NAME=DIR (a RUN/dvae model folder, "
        "e.g. a demo run's outputs/demo/dvae/dvae).",
    )
    score: list[str] = arg(
        factory=lambda: ["g2:guidance=2"],
        doc="Ways to sample every prior, NAME:guidance=G,contrast=shape|colour (contrast: guide against the "
        "caption without those words instead of the empty caption); the first fills seen/heldout.",
    )
    captions: int = arg(96, "Distinct captions per split.", gt=0)
    candidates: int = arg(8, "Samples per caption.", gt=0)
    seed: int = arg(0, "Seed of the scenes, the weights and the samples.", ge=0)
    workers: int = arg(4, "Rendering processes.", gt=0)
    quick: bool = arg(False, "Tiny sizes, to check the script on a CPU.")
    dvae_only: bool = arg(False, "Train and score the dVAE variants only, no prior.")


def main(argv: list[str] | None = None) -> int:
    a, _ = parse_cli(SweepArgs, argv, __doc__ or "", aliases=flag_aliases(SweepArgs))
    if a is None:
        return 0
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"device": str(dev), "args": vars(a), "dvae": {}, "prior": {}}
    if dev.type == "cuda":
        result["gpu"] = torch.cuda.get_device_name(dev)
    t0 = time.perf_counter()
    n_train = 64 if a.quick else a.train
    wanted = [
        int(e.split("=", 1)[1])
        for _, edits in map(variant, a.prior)
        for e in edits.split(",")
        if e.startswith("train=")
    ]
    max_train = max([n_train, *([] if a.quick else wanted)])
    train_caps, train_ims = scenes(max_train, False, a.seed, 32, a.workers, a.world)
    val_caps, val_ims = distinct(*scenes(600, False, a.seed + 1, 32, a.workers, a.world), a.captions)
    held_caps, held_ims = distinct(*scenes(600, True, a.seed + 2, 32, a.workers, a.world), a.captions)
    result["data_seconds"] = round(time.perf_counter() - t0, 1)
    dvaes = {}
    for spec in a.dvae_from:
        name, _, folder = spec.partition("=")
        dvae = DVAE.from_pretrained(folder).to(dev).eval()
        info = {
            "from": folder,
            "seen": ceiling(dvae, val_caps, val_ims, dev),
            "heldout": ceiling(dvae, held_caps, held_ims, dev),
        }
        result["dvae"][name] = info
        dvaes[name] = dvae
        print(json.dumps({"dvae": name, **info}), flush=True)
    pool: torch.Tensor | None = None  # the unlabelled scenes of every pair, made for the first variant that asks
    for name, spec in map(variant, a.dvae or ([] if a.dvae_from else ["base:"])):
        own = [e for e in spec.split(",") if e.startswith("pairs=")]
        edits = ",".join(e for e in spec.split(",") if e and not e.startswith("pairs="))
        pairs = own[-1].split("=", 1)[1] if own else "seen"
        if pairs not in ("all", "seen"):
            raise SystemExit(f"--dvae {name}: pairs= takes all (scenes of every pair) or seen, got {own[-1]!r}")
        every = pairs == "all"
        if every and pool is None:
            pool = scenes(n_train, None, a.seed, 32, a.workers, a.world)[1]
        cfg = edited("configs/demo/dvae.yaml", DVAETrainConfig, edits)
        if a.quick:
            cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, steps=3))
        if dev.type == "cuda":  # bf16 autocast on a GPU; on a CPU the config's own (auto: the demo's pick)
            cfg = dataclasses.replace(cfg, precision=dataclasses.replace(cfg.precision, dtype="bf16"))
        dvae, info = train_dvae(cfg, pool if every and pool is not None else train_ims[:n_train], dev, a.seed)
        info |= {"seen": ceiling(dvae, val_caps, val_ims, dev), "heldout": ceiling(dvae, held_caps, held_ims, dev)}
        info["edits"], info["pairs"] = edits, pairs
        result["dvae"][name] = info
        dvaes[name] = dvae
        print(json.dumps({"dvae": name, **{k: v for k, v in info.items() if k != "last"}}), flush=True)
        (out / "sweep.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    from dalle_repro.data.tokenizer import TextTokenizer, train_bpe

    tok = TextTokenizer(train_bpe(train_caps[:n_train], 512, 2), 16)
    base = load_yaml(ROOT / "configs/demo/prior.yaml")
    tokens_of: dict[str, torch.Tensor] = {}
    text_all = torch.tensor([tok.encode(c) for c in train_caps], dtype=torch.long)
    empty = torch.tensor([tok.encode("")], dtype=torch.long)
    world = world_of(a.world)
    partial = tuple(
        torch.tensor([tok.encode(without(c, words)) for c in train_caps], dtype=torch.long)
        for words in (world.SHAPES, tuple(world.COLOURS))
    )
    scorings = [(n, dict(e.split("=", 1) for e in edits.split(",") if e)) for n, edits in map(variant, a.score)]
    swaps = [swapped_caption(c, world) for c in train_caps]
    swap = (
        torch.tensor([tok.encode(w or "") for w in swaps], dtype=torch.long),
        torch.tensor([w is not None for w in swaps], dtype=torch.bool),
    )
    for name, edits in map(variant, [] if a.dvae_only else a.prior):
        pairs = [e for e in edits.split(",") if e]
        own = ("train", "ranks", "dvae", "word_drop", "swap_weight")
        extra = dict(e.split("=", 1) for e in pairs if e.split("=", 1)[0] in own)
        dvae_name = extra.get("dvae", a.prior_dvae or next(iter(dvaes)))
        dvae = dvaes[dvae_name]
        if dvae_name not in tokens_of:
            tokens_of[dvae_name] = encode(dvae, train_ims, dev)
        tokens_all = tokens_of[dvae_name]
        settings = deep_merge(base, parse_overrides([e for e in pairs if e.split("=", 1)[0] not in extra]))
        settings["ranks"] = int(extra.get("ranks", 2))
        n = 32 if a.quick else int(extra.get("train", n_train))
        if a.quick:
            settings["run"]["steps"] = 3
        m = settings["model"]
        margs = TransformerArgs(
            text_vocab=tok.vocab_size,
            text_len=16,
            image_vocab=dvae.args.vocab_size,
            grid=dvae.args.image_size // 2 ** (dvae.args.group_count - 1),
            dim=m["dim"],
            depth=m["depth"],
            heads=m["heads"],
            conv_kernel=m.get("conv_kernel", 11),
            # dense on a GPU: the sequences are short, and flex's compile would cost more than it saves
            attention=m.get("attention", "auto") if dev.type == "cpu" else "dense",
            text_loss_weight=m.get("text_loss_weight", 0.125),
            image_loss_weight=m.get("image_loss_weight", 0.875),
        )
        prior, info = train_prior(
            settings,
            text_all[:n],
            tokens_all[:n].flatten(1),
            empty,
            margs,
            dev,
            a.seed,
            partial=(partial[0][:n], partial[1][:n]),
            word_drop=float(extra.get("word_drop", 0.0)),
            swap=(swap[0][:n], swap[1][:n]),
            swap_weight=float(extra.get("swap_weight", 0.0)),
        )
        c = 2 if a.quick else a.candidates
        caps_v, caps_h = (val_caps[:2], held_caps[:2]) if a.quick else (val_caps, held_caps)
        info |= {"edits": edits, "train_scenes": n, "dvae": dvae_name, "scores": {}}
        for sname, how in scorings:
            kw = {"guidance": float(how.get("guidance", 2.0)), "contrast": how.get("contrast", "")}
            got = {
                split: score_prior(prior, dvae, tok, caps, c, a.seed, dev, **kw)
                for split, caps in (("seen", caps_v), ("heldout", caps_h))
            }
            info["scores"][sname] = got
            if "seen" not in info:
                info |= got
            brief = {
                s: {k: round(v["rate"] if isinstance(v, dict) else v, 3) for k, v in got[s].items()}
                for s in ("seen", "heldout")
            }
            print(json.dumps({"prior": name, "score": sname, "seconds": info["seconds"], **brief}), flush=True)
        result["prior"][name] = info
        (out / "sweep.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    result["seconds"] = round(time.perf_counter() - t0, 1)
    (out / "sweep.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    print(f"[sweep] {result['seconds']} s; wrote {out / 'sweep.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
