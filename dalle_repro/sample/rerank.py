"""CLIP reranking (SPEC §5): score each candidate image against its caption, keep the best.

The score is the cosine similarity of CLIP's image and text embeddings, or, with reference captions
(``sample.rerank_reference``: shards, typically the training set's), log p(caption | image) among
the caption and those, at CLIP's temperature (:meth:`Reranker.pick_scores`). Two model sources, both
read from local files only (``local_files_only``; nothing is downloaded, ever):

- a folder in Hugging Face's format: ``CLIPModel`` with its tokenizer and (optionally) its
  ``preprocessor_config.json``, e.g. a downloaded ``openai/clip-vit-base-patch32`` or the small
  CLIP that ``tools/train_clip.py`` trains for the demo;
- an open_clip model: ``open_clip:ARCH:/path/weights.safetensors``, when open_clip is installed.

Images are resized and normalised in torch (no torchvision). A missing or broken model raises
:class:`RerankError` at load time, before any sampling starts.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_pixels(
    images: torch.Tensor, size: int, mean: tuple[float, ...] = CLIP_MEAN, std: tuple[float, ...] = CLIP_STD
) -> torch.Tensor:
    """(N, 3, H, W) floats in [0, 1] -> CLIP's input: bicubic resize to ``size`` (when needed), normalised.

    The resize is antialiased, as CLIP's own preprocessing (PIL's bicubic) is: a 256 -> 224
    downscale without it aliases fine texture, and the scores drift from the ones CLIP was trained
    to give (tests/test_sampling.py compares with PIL)."""
    x = images.float()
    if tuple(x.shape[-2:]) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
    m = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return (x.clamp(0, 1) - m) / s


class RerankError(ValueError):
    """The CLIP model cannot be loaded (names the path and what is wrong)."""


class Reranker:
    """``scores(images, captions)``: cosine similarities; ``rank(...)``: the order, best first."""

    def __init__(self, source: str | Path, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self._reference_spec: str | None = None  # use_reference's shards, their captions and embeddings
        self._reference: list[str] = []
        self._reference_emb: torch.Tensor | None = None
        text = str(source)
        if text.startswith("open_clip:"):
            self._load_open_clip(text)
        else:
            self._load_hf(Path(text))

    def _load_hf(self, d: Path) -> None:
        if not d.is_dir():
            raise RerankError(f"CLIP folder {d} does not exist (pass a local Hugging Face CLIP folder)")
        if not (d / "config.json").is_file() and (d / "clip" / "config.json").is_file():
            d = d / "clip"  # a CLIP training run's folder (tools/train_clip.py, the demo's outputs/demo/clip)
        if not (d / "config.json").is_file():
            raise RerankError(f"{d} has no config.json: not a Hugging Face model folder")
        try:
            from transformers import AutoTokenizer, CLIPModel
        except ImportError as e:
            raise RerankError(f"transformers is needed to load {d}: {e}") from None
        try:
            self.model = CLIPModel.from_pretrained(d, local_files_only=True).to(self.device).eval()
            self.tokenizer = AutoTokenizer.from_pretrained(d, local_files_only=True)
        except Exception as e:  # transformers raises many kinds; all mean "this folder is not usable"
            raise RerankError(f"cannot load CLIP from {d}: {type(e).__name__}: {e}") from None
        pre = d / "preprocessor_config.json"
        conf = json.loads(pre.read_text()) if pre.is_file() else {}
        self.mean = tuple(conf.get("image_mean", CLIP_MEAN))
        self.std = tuple(conf.get("image_std", CLIP_STD))
        self.size = int(self.model.config.vision_config.image_size)
        self.max_len = int(self.model.config.text_config.max_position_embeddings)
        self._kind = "hf"

    def _load_open_clip(self, spec: str) -> None:
        try:
            _, arch, path = spec.split(":", 2)
        except ValueError:
            raise RerankError(f"{spec!r}: expected open_clip:ARCH:/path/weights.safetensors") from None
        try:
            import open_clip  # type: ignore[import-not-found]
        except ImportError:
            raise RerankError("open_clip is not installed (pip install open_clip_torch), or use a HF folder") from None
        if not Path(path).is_file() or not path.endswith(".safetensors"):
            raise RerankError(f"{path}: open_clip weights must be a local .safetensors file (no pickles)")
        try:
            model = open_clip.create_model(arch, pretrained=path)
        except Exception as e:
            raise RerankError(f"cannot load open_clip {arch} from {path}: {type(e).__name__}: {e}") from None
        self.model = model.to(self.device).eval()
        self.tokenizer = open_clip.get_tokenizer(arch)
        self.mean = tuple(getattr(model.visual, "image_mean", None) or CLIP_MEAN)
        self.std = tuple(getattr(model.visual, "image_std", None) or CLIP_STD)
        size = model.visual.image_size
        self.size = int(size[0] if isinstance(size, (tuple, list)) else size)
        self._kind = "open_clip"

    def _pixels(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (N, 3, H, W) in [0, 1], got {tuple(images.shape)}")
        return clip_pixels(images.to(self.device), self.size, self.mean, self.std)

    @torch.no_grad()
    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        x = self._pixels(images)
        e = self.model.get_image_features(pixel_values=x) if self._kind == "hf" else self.model.encode_image(x)
        return F.normalize(_features(e).float(), dim=-1)

    @torch.no_grad()
    def embed_texts(self, captions: list[str]) -> torch.Tensor:
        if self._kind == "hf":
            t = self.tokenizer(
                captions, padding="max_length", truncation=True, max_length=self.max_len, return_tensors="pt"
            ).to(self.device)
            e = self.model.get_text_features(input_ids=t["input_ids"], attention_mask=t["attention_mask"])
        else:
            e = self.model.encode_text(self.tokenizer(captions).to(self.device))
        return F.normalize(_features(e).float(), dim=-1)

    def use_reference(self, spec: str | None) -> None:
        """Rank against the captions of ``spec`` (:func:`reference_captions`); None: by cosine alone.
        Their embeddings are computed once per spec."""
        if spec == self._reference_spec:
            return
        if spec is None:
            self._reference_spec, self._reference, self._reference_emb = None, [], None
            return
        caps = reference_captions(spec)
        self._reference = caps
        self._reference_emb = torch.cat([self.embed_texts(caps[i : i + 256]) for i in range(0, len(caps), 256)])
        self._reference_spec = spec
        log.info("reranking against %d reference captions of %s", len(caps), spec)

    def pick_scores(self, images: torch.Tensor, caption: str) -> torch.Tensor:
        """What the reranker picks by: the cosine with ``caption``, or, after :meth:`use_reference`,
        log p(caption | image) among the caption and the reference captions, at CLIP's own temperature.
        The second asks how much better an image fits its caption than the captions the data holds:
        an image that fits many captions well (a typical one) no longer wins on its cosine alone."""
        return self.pick_and_cosine(images, caption)[0]

    def pick_and_cosine(self, images: torch.Tensor, caption: str) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`pick_scores` and the cosines with ``caption``, from one embedding of the images."""
        if self._reference_emb is None:
            cos = self.scores(images, caption)
            return cos, cos
        im = self.embed_images(images)
        cos = (im @ self.embed_texts([caption]).T).squeeze(1)
        keep = torch.tensor([c != caption for c in self._reference], device=im.device)
        pick = caption_log_prob(cos, im @ self._reference_emb[keep].T, self.logit_scale())
        return pick.cpu(), cos.cpu()

    def logit_scale(self) -> float:
        """CLIP's own temperature: exp(logit_scale), as its training softmax used it (at most 100)."""
        with torch.no_grad():
            return min(100.0, float(self.model.logit_scale.exp()))

    def scores(self, images: torch.Tensor, captions: str | list[str]) -> torch.Tensor:
        """Cosine similarity of each image with its caption (one caption for all, or one per image)."""
        caps = [captions] if isinstance(captions, str) else list(captions)
        if len(caps) not in (1, images.shape[0]):
            raise ValueError(f"{images.shape[0]} images but {len(caps)} captions")
        t = self.embed_texts(caps)
        return (self.embed_images(images) * t).sum(-1).cpu()

    def rank(self, images: torch.Tensor, caption: str, keep: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Indices of the best ``keep`` images for ``caption``, best first, and all scores (:meth:`pick_scores`)."""
        s = self.pick_scores(images, caption)
        order = torch.argsort(s, descending=True, stable=True)
        return order[: keep or len(order)], s


def caption_log_prob(cos: torch.Tensor, others: torch.Tensor, scale: float) -> torch.Tensor:
    """log p(caption | image) for images whose cosine with the caption is ``cos`` (N,) and with the
    other captions ``others`` (N, R): a softmax over the R + 1 captions at temperature 1 / ``scale``."""
    return cos * scale - torch.logsumexp(torch.cat([cos[:, None], others], 1) * scale, 1)


MAX_REFERENCE = 50_000  # distinct reference captions kept (their embeddings stay in memory)


def reference_captions(spec: str) -> list[str]:
    """The distinct captions of the shards ``spec`` (a shard spec as ``data.shards`` takes; the
    ``txt`` members of its first ``MAX_REFERENCE`` samples), sorted; RerankError where there are none."""
    from dalle_repro.data.sources import expand_shards
    from dalle_repro.data.tar import shard_captions

    try:
        paths = expand_shards(spec)
    except (OSError, ValueError) as e:
        raise RerankError(f"rerank_reference: {spec}: {e}") from None
    out = sorted({c for c in shard_captions(paths, MAX_REFERENCE) if c})
    if not out:
        raise RerankError(f"rerank_reference: no caption in the shards {spec}")
    return out


def _features(e: object) -> torch.Tensor:
    """transformers 5 returns an output object from get_*_features; 4.x a tensor."""
    if isinstance(e, torch.Tensor):
        return e
    for name in ("pooler_output", "image_embeds", "text_embeds"):
        v = getattr(e, name, None)
        if isinstance(v, torch.Tensor):
            return v
    raise TypeError(f"unexpected CLIP output {type(e).__name__}")
