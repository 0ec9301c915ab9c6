"""Evaluate a trained prior, a folder of generated images, or a dVAE, by the numbers the field uses.

  Prior (zero-shot, on the shapes set; the demo's "evaluate" stage runs exactly this):
    python tools/evaluate.py --model RUN/export --clip CLIP_DIR --seen 'data/shapes/val/*.tar' \\
        --heldout 'data/shapes/heldout/*.tar' --train 'data/shapes/train/*.tar' --output OUT
  Generated images (KEY.png with KEY.txt captions in a folder) against reference shards:
    python tools/evaluate.py --images DIR --reference 'data/val/*.tar' [--clip CLIP_DIR] [--inception PTH] --output OUT
  A dVAE's reconstructions:
    python tools/evaluate.py --dvae RUN/dvae --reference 'data/val/*.tar' [--clip ...] [--inception PTH] --output OUT

FID needs FID's Inception weights from a local file (--inception: pytorch-fid's
pt_inception-2015-12-05-6726825d.pth); nothing is downloaded. Without them the Fréchet distance is
reported in the CLIP's image space (fd_clip), which compares runs with each other but is not FID.
--attributes reads shapes-set captions back from the pixels (dalle_repro/data/shapes.py). Writes
OUT/evaluation.json and PNG plots; prints the JSON's main numbers.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import torch


def _radii(text: str) -> list[float]:
    try:
        out = [float(r) for r in text.split(",") if r.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--blur-radii: {text!r} is not a comma-separated list of numbers") from None
    if not out or min(out) < 0:
        raise argparse.ArgumentTypeError("--blur-radii: give radii >= 0, e.g. 0,1,2,4,8")
    return out


def _distances(ref: torch.Tensor, gen: torch.Tensor, a: argparse.Namespace, reranker: Any, out: Path) -> dict:
    """FID at each blur radius (with --inception), and the Fréchet distance in CLIP space (with --clip)."""
    from dalle_repro.evaluation.evaluate import features, fid_by_blur, frechet_distance, plot_fid_by_blur
    from dalle_repro.evaluation.inception import FIDInception

    res: dict[str, Any] = {}
    if a.inception:
        net = FIDInception.from_file(a.inception)
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


def _load_folder(d: Path) -> tuple[list[str], torch.Tensor]:
    from dalle_repro.data.samples import SampleError, decode_image, image_to_tensor

    captions, images = [], []
    for png in sorted(d.glob("*.png")):
        txt = png.with_suffix(".txt")
        if not txt.is_file():
            raise FileNotFoundError(f"{txt} not found: each generated image needs its caption beside it")
        try:
            im, _ = decode_image(png.read_bytes())
        except SampleError as e:  # a zero-byte or broken PNG: say which
            raise ValueError(f"{png}: not a readable image ({e.reason}: {e})") from None
        captions.append(txt.read_text(encoding="utf-8").strip())
        images.append(image_to_tensor(im))
    if not images:
        raise FileNotFoundError(f"no .png in {d}")
    return captions, _stack(images, str(d))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--model", help="a prior export (RUN/export): the zero-shot evaluation on the shapes set")
    what.add_argument("--images", help="a folder of generated KEY.png with KEY.txt captions")
    what.add_argument("--dvae", help="a dVAE model folder (RUN/dvae): its reconstructions of --reference")
    p.add_argument("--output", required=True, help="folder for evaluation.json and the plots")
    p.add_argument("--clip", help="a CLIP folder (tools/train_clip.py's, or a Hugging Face download)")
    p.add_argument("--inception", help="FID's Inception weights (pt_inception-2015-12-05-6726825d.pth)")
    p.add_argument("--blur-radii", type=_radii, default=[0, 1, 2, 4, 8], help="FID blur radii (default 0,1,2,4,8)")
    p.add_argument("--reference", help="reference shards (--images, --dvae)")
    p.add_argument("--attributes", action="store_true", help="read shapes captions back (--images, --dvae)")
    p.add_argument("--limit", type=int, default=None, help="at most this many reference images (--dvae)")
    g = p.add_argument_group("the prior (--model)")
    g.add_argument("--seen", help="shards whose captions use pairs seen in training (the validation split)")
    g.add_argument("--heldout", help="shards whose captions use held-out pairs")
    g.add_argument("--train", help="training shards, for the picture of the nearest training captions")
    g.add_argument("--captions", type=int, default=24, help="distinct captions per split (default 24)")
    g.add_argument("--candidates", type=int, default=16, help="samples per caption (default 16)")
    g.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1)")
    g.add_argument("--top-k", type=int, default=None, help="sampling top-k (default: none)")
    g.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale (default 1: none)")
    g.add_argument("--pictures", type=int, default=6, help="held-out captions in the nearest-caption picture")
    g.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    a = p.parse_args(argv)
    if a.model and not (a.clip and a.seen and a.heldout):
        p.error("--model needs --clip, --seen and --heldout")
    if (a.images or a.dvae) and not a.reference:
        p.error("--images and --dvae need --reference shards")
    if a.captions < 1 or a.candidates < 1 or (a.top_k is not None and a.top_k < 1) or a.temperature <= 0:
        p.error("--captions, --candidates and --top-k must be >= 1, --temperature > 0")
    if a.guidance < 0:
        p.error("--guidance must be >= 0")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    from dalle_repro.core.files import atomic_write_text
    from dalle_repro.evaluation.evaluate import (
        attribute_accuracy,
        caption_images,
        clip_score,
        dvae_reconstructions,
        zero_shot,
    )
    from dalle_repro.sample.rerank import Reranker

    out = Path(a.output)
    try:
        reranker = Reranker(a.clip) if a.clip else None
        if a.model:
            from dalle_repro.sample.export import load_prior
            from dalle_repro.sample.generate import SampleSettings

            prior = load_prior(a.model)
            prior.use_trained_precision()
            settings = SampleSettings(
                candidates=a.candidates,
                keep=1,
                top_k=a.top_k,
                temperature=a.temperature,
                guidance=a.guidance,
                seed=a.seed,
                batch_size=a.candidates,
            )
            result = zero_shot(
                prior,
                reranker,
                a.seen,
                a.heldout,
                settings,
                a.captions,
                a.train,
                a.pictures,
                out_dir=out,
                inception=a.inception,
                blur_radii=a.blur_radii,
            )
            summary = {
                split: {
                    "all_attributes_right": {k: v["all"] for k, v in rep["attributes"].items()},
                    "reader_ceiling": rep["reader_ceiling"]["all"],
                    "clip_score": rep["clip_score"],
                    "fd_clip": rep["fd_clip"],
                    **({"fid_by_blur": rep["fid_by_blur"]} if "fid_by_blur" in rep else {}),
                }
                for split, rep in result["splits"].items()
            }
            print(json.dumps(summary, indent=1))
            return 0
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

            dvae = DVAE.from_pretrained(a.dvae).eval()
            rec = dvae_reconstructions(dvae, ref.split(64))
            caps, gen = ref_caps, rec["reconstructions"]
            result |= {"dvae": a.dvae, "psnr": rec["psnr"], "bits_per_dim": rec["bits_per_dim"]}
        result |= _distances(ref, gen, a, reranker, out)
        if reranker is not None:
            result["clip_score"] = clip_score(gen, caps, reranker)
            result["clip_score_reference"] = clip_score(ref, ref_caps, reranker)
        if a.attributes:
            result["attributes"] = attribute_accuracy(gen, caps)
            result["attributes_reference"] = attribute_accuracy(ref, ref_caps)
        atomic_write_text(out / "evaluation.json", json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=1))
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
