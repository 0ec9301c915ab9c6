"""Evaluate a trained prior, a folder of generated images, or a dVAE, by the numbers the field uses.

  Prior (zero-shot, on the shapes set; the demo's "evaluate" stage runs exactly this):
    python tools/evaluate.py --model RUN/export --clip CLIP_DIR --seen 'data/shapes/val/*.tar' \\
        --heldout 'data/shapes/heldout/*.tar' --train 'data/shapes/train/*.tar' --output OUT
  Generated images against reference shards: DIR is launch/sample.py's --output as it wrote it
  (NNN-caption/ folders, each with result.json and 00.png, 01.png, ...; grid.png is left out), or a
  folder of KEY.png with KEY.txt captions:
    python tools/evaluate.py --images DIR --reference 'data/val/*.tar' [--clip CLIP_DIR] [--inception PTH] --output OUT
  A dVAE's reconstructions:
    python tools/evaluate.py --dvae RUN/dvae --reference 'data/val/*.tar' [--clip ...] [--inception PTH] --output OUT

FID needs FID's Inception weights from a local file (--inception: pytorch-fid's
pt_inception-2015-12-05-6726825d.pth); nothing is downloaded. Without them the Fréchet distance is
reported in the CLIP's image space (fd_clip), which compares runs with each other but is not FID.
--attributes reads shapes-set captions back from the pixels (dalle_repro/data/shapes.py); --world
strokes reads the strokes set's instead (data/strokes.py), for --model too. Writes
OUT/evaluation.json and prints its main numbers; --model adds the plots attributes.png,
best_of_n.png and heldout_vs_nearest.png (with --train), and --inception fid_by_blur.png.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from pathlib import Path
from typing import Any

import torch

from dalle_repro.core.cli import flag_aliases, parse_cli
from dalle_repro.evaluation.evaluate import EvalArgs, EvaluateConfig
from dalle_repro.sample.generate import SampleSettings

FLAGS = (
    flag_aliases(EvaluateConfig)
    | flag_aliases(EvalArgs, "evaluation.")
    | flag_aliases(
        SampleSettings,
        "evaluation.sample.",
        only=("candidates", "temperature", "top_k", "guidance", "seed", "rerank_reference"),
    )
)


def _distances(ref: torch.Tensor, gen: torch.Tensor, a: EvaluateConfig, reranker: Any, out: Path) -> dict:
    """FID at each blur radius (with --inception), and the Fréchet distance in CLIP space (with --clip)."""
    from dalle_repro.evaluation.evaluate import features, fid_by_blur, frechet_distance, plot_fid_by_blur
    from dalle_repro.evaluation.inception import FIDInception

    res: dict[str, Any] = {}
    if a.evaluation.inception:
        net = FIDInception.from_file(a.evaluation.inception)
        res["fid_by_blur"] = fid_by_blur(ref, gen, net, a.blur_radii)
        res["fid"] = res["fid_by_blur"].get("0")
        res["plot_fid_by_blur"] = str(plot_fid_by_blur({"samples": res["fid_by_blur"]}, out / "fid_by_blur.png"))
    if reranker is not None:
        res["fd_clip"] = frechet_distance(features(ref, reranker.embed_images), features(gen, reranker.embed_images))
    return res


def _stack(images: list[torch.Tensor], where: str) -> torch.Tensor:
    """The images as one batch; images of several sizes are refused with the sizes (torch.stack's
    own error named neither the images nor their sizes)."""
    sizes = sorted({tuple(im.shape) for im in images})
    if len(sizes) > 1:
        raise ValueError(f"{where}: images of several sizes {sizes[:6]}; the FID and scores need one size")
    return torch.stack(images)


def _sample_output(d: Path) -> list[tuple[str, list[Path]]]:
    """(caption, images) of each prompt folder launch/sample.py wrote under ``d`` (or of ``d`` itself
    when it is one): the caption from result.json, the images NN.png (grid.png is their montage)."""
    folders = [d] if (d / "result.json").is_file() else sorted(p.parent for p in d.glob("*/result.json"))
    out = []
    for folder in folders:
        try:
            caption = json.loads((folder / "result.json").read_text(encoding="utf-8"))["prompt"]
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{folder / 'result.json'} is not launch/sample.py's result.json: {e}") from None
        pngs = sorted(p for p in folder.glob("*.png") if re.fullmatch(r"\d+", p.stem))
        out.append((str(caption), pngs))
    return out


def _flat_folder(d: Path) -> list[tuple[str, list[Path]]]:
    """(caption, [image]) of each KEY.png with its KEY.txt in ``d``."""
    out = []
    for png in sorted(d.glob("*.png")):
        txt = png.with_suffix(".txt")
        if not txt.is_file():
            raise FileNotFoundError(
                f"{txt} not found: --images takes launch/sample.py's output folder (NNN-caption/result.json), "
                "or KEY.png images each with its KEY.txt caption"
            )
        out.append((txt.read_text(encoding="utf-8").strip(), [png]))
    return out


def _load_folder(d: Path) -> tuple[list[str], torch.Tensor]:
    """The captions and images (N, 3, H, W) uint8 of --images: launch/sample.py's output or a flat folder."""
    from dalle_repro.data.samples import SampleError, decode_image, image_to_tensor

    if not d.is_dir():
        raise FileNotFoundError(f"--images {d} is not a folder")
    captions, images = [], []
    for caption, pngs in _sample_output(d) or _flat_folder(d):
        for png in pngs:
            try:
                im, _ = decode_image(png.read_bytes())
            except SampleError as e:  # a zero-byte or broken PNG: say which
                raise ValueError(f"{png}: not a readable image ({e.reason}: {e})") from None
            captions.append(caption)
            images.append(image_to_tensor(im))
    if not images:
        raise FileNotFoundError(f"no image in {d}: neither NNN-caption/NN.png with result.json nor KEY.png")
    return captions, _stack(images, str(d))


def _evaluate_prior(a: EvaluateConfig, reranker: Any, out: Path) -> dict[str, Any]:
    """The zero-shot evaluation of a prior export; returns the main numbers of each split."""
    from dalle_repro.evaluation.evaluate import zero_shot
    from dalle_repro.sample.export import load_prior

    assert a.model is not None and a.seen is not None and a.heldout is not None  # EvaluateConfig checked them
    prior = load_prior(a.model)
    prior.use_trained_precision()
    e = a.evaluation
    result = zero_shot(
        prior,
        reranker,
        a.seen,
        a.heldout,
        e.sample,
        e.captions,
        a.train,
        e.pictures,
        out_dir=out,
        inception=e.inception,
        blur_radii=a.blur_radii,
        world=a.world,
    )
    return {
        split: {
            "all_attributes_right": {k: v["all"] for k, v in rep["attributes"].items()},
            "reader_ceiling": rep["reader_ceiling"]["all"],
            "clip_score": rep["clip_score"],
            "fd_clip": rep["fd_clip"],
            **({"fid_by_blur": rep["fid_by_blur"]} if "fid_by_blur" in rep else {}),
        }
        for split, rep in result["splits"].items()
    }


def _evaluate_images(a: EvaluateConfig, reranker: Any, out: Path) -> dict[str, Any]:
    """Generated images (--images) or a dVAE's reconstructions (--dvae) against --reference."""
    from dalle_repro.evaluation.evaluate import attribute_accuracy, caption_images, clip_score, dvae_reconstructions

    assert a.reference is not None  # EvaluateConfig checked it
    ref_caps, ref_list = caption_images(a.reference)
    if a.limit:
        ref_caps, ref_list = ref_caps[: a.limit], ref_list[: a.limit]
    if not ref_list:
        raise ValueError(f"no captioned image in {a.reference}")
    ref = _stack(ref_list, f"--reference {a.reference}")
    result: dict[str, Any] = {"reference": a.reference, "reference_images": len(ref)}
    out.mkdir(parents=True, exist_ok=True)
    if a.images:
        caps, gen = _load_folder(Path(a.images))
        result |= {"images": a.images, "generated_images": len(gen)}
    else:
        from dalle_repro.models.dvae import DVAE

        assert a.dvae is not None
        dvae = DVAE.from_pretrained(a.dvae).eval()
        rec = dvae_reconstructions(dvae, ref.split(64))
        caps, gen = ref_caps, rec["reconstructions"]
        result |= {"dvae": a.dvae, "psnr": rec["psnr"], "bits_per_dim": rec["bits_per_dim"]}
    result |= _distances(ref, gen, a, reranker, out)
    if reranker is not None:
        result["clip_score"] = clip_score(gen, caps, reranker)
        result["clip_score_reference"] = clip_score(ref, ref_caps, reranker)
    if a.attributes:
        result["attributes"] = attribute_accuracy(gen, caps, a.world)
        result["attributes_reference"] = attribute_accuracy(ref, ref_caps, a.world)
    return result


def main(argv: list[str] | None = None) -> int:
    a, _ = parse_cli(EvaluateConfig, argv, __doc__ or "", aliases=FLAGS)
    if a is None:
        return 0
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    from dalle_repro.core.files import atomic_write_text
    from dalle_repro.sample.rerank import Reranker

    out = Path(a.output)
    try:
        reranker = Reranker(a.clip) if a.clip else None
        if a.model:
            print(json.dumps(_evaluate_prior(a, reranker, out), indent=1))
        else:
            result = _evaluate_images(a, reranker, out)
            atomic_write_text(out / "evaluation.json", json.dumps(result, indent=2) + "\n")
            print(json.dumps(result, indent=1))
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    plots = sorted(p.name for p in out.glob("*.png"))
    print(f"wrote evaluation.json{' and ' + ', '.join(plots) if plots else ''} in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
