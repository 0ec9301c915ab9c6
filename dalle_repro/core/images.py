"""Pictures for people: image grids with captions, written atomically as PNG."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from dalle_repro.core.files import honour_umask


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images as uint8 levels: floats in [0, 1] are clamped, scaled and rounded; uint8 stays as it is."""
    return images if images.dtype == torch.uint8 else (images.float().clamp(0, 1) * 255).round().to(torch.uint8)


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """Images as float32 in [0, 1]: uint8 levels are divided by 255, floats are taken as they are."""
    return images.float() / 255 if images.dtype == torch.uint8 else images.float()


def to_pil(image: torch.Tensor) -> Image.Image:
    """(3, H, W) float in [0, 1] or uint8 -> RGB PIL image."""
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"expected an image (3, H, W), got shape {tuple(image.shape)}")
    return Image.fromarray(to_uint8(image).permute(1, 2, 0).cpu().numpy())


def grid(
    images: Sequence[torch.Tensor | Image.Image] | torch.Tensor,
    ncol: int,
    labels: Sequence[str] | None = None,
    scale: int = 1,
    pad: int = 2,
    label_height: int = 12,
    title: str | None = None,
) -> Image.Image:
    """Images (tensors or PIL images) in rows of ``ncol``, each optionally scaled up and labelled
    underneath, under an optional title."""
    pics = [im if isinstance(im, Image.Image) else to_pil(im) for im in images]
    if not pics:
        raise ValueError("no images to put in a grid")
    w, h = pics[0].size[0] * scale, pics[0].size[1] * scale
    lh = label_height if labels else 0
    nrow = -(-len(pics) // ncol)
    top = label_height + pad if title else 0
    sheet = Image.new("RGB", (ncol * (w + pad) + pad, top + nrow * (h + lh + pad) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((pad, pad), title, fill="black")
    for i, pic in enumerate(pics):
        x, y = pad + (i % ncol) * (w + pad), top + pad + (i // ncol) * (h + lh + pad)
        sheet.paste(pic.resize((w, h), Image.Resampling.NEAREST), (x, y))
        if labels:
            text = labels[i]
            while text and draw.textlength(text) > w:
                text = text[:-1]
            draw.text((x, y + h), text, fill="black")
    return sheet


def save_png(image: Image.Image, path: str | Path) -> Path:
    """Save a PNG under a temporary name, then rename it into place."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".png", dir=p.parent)
    os.close(fd)
    try:
        image.save(tmp, format="PNG")
        honour_umask(tmp)
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return p


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Peak signal-to-noise ratio of images in [0, 1], in dB."""
    mse = torch.mean((a.float() - b.float()) ** 2).item()
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)
