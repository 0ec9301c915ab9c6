"""The embedded demo data set: every emoji of Debian's Noto Color Emoji font, captioned with its name.

Captions are the CLDR short names from Unicode's ``emoji-test.txt`` (Debian's ``unicode-data``),
e.g. "red apple" or "woman astronaut: medium skin tone". Only fully-qualified sequences are used.

Noto Color Emoji is a bitmap font with one strike (109 px). A sequence the font cannot draw shows
up as nothing (no glyph), or as several glyphs side by side (a ZWJ or modifier sequence it does not
ligate); both are detected from the rendered box and skipped, counted as ``not_drawable``.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections import Counter
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from dalle_repro.core.config import arg
from dalle_repro.data.writer import Record, Sample, encode_image, fingerprint, write_dataset

FONT_PATH = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
EMOJI_TEST_PATH = "/usr/share/unicode/emoji/emoji-test.txt"
STRIKE = 109  # the only bitmap size in Noto Color Emoji

_LINE = re.compile(r"^([0-9A-Fa-f ]+?)\s*;\s*([\w-]+)\s*#\s*\S+\s+E\d+\.\d+\s+(.+)$")


def _require(path: str, package: str) -> None:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: install Debian's {package} (apt-get install {package})")


def read_emoji_names(path: str = EMOJI_TEST_PATH) -> list[Record]:
    """Fully-qualified emoji of ``emoji-test.txt`` as records (key from the code points)."""
    _require(path, "unicode-data")
    records: list[Record] = []
    group = subgroup = ""
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.startswith("# group:"):
                group = line.split(":", 1)[1].strip()
            elif line.startswith("# subgroup:"):
                subgroup = line.split(":", 1)[1].strip()
            m = _LINE.match(line.strip())
            if not m or m.group(2) != "fully-qualified":
                continue
            cps = [int(c, 16) for c in m.group(1).split()]
            seq = "".join(map(chr, cps))
            key = "emoji_" + "-".join(f"{c:x}" for c in cps)
            meta = {"group": group, "subgroup": subgroup, "codepoints": m.group(1).strip()}
            records.append(Record(key, seq, m.group(3).strip(), meta))
    return sorted(records, key=lambda r: r.key)


_FONTS: dict[str, ImageFont.FreeTypeFont] = {}


def _font(path: str) -> ImageFont.FreeTypeFont:
    if path not in _FONTS:
        _FONTS[path] = ImageFont.truetype(path, STRIKE, layout_engine=ImageFont.Layout.RAQM)
    return _FONTS[path]


def render_emoji(seq: str, image_size: int = 64, font_path: str = FONT_PATH) -> Image.Image | None:
    """The emoji on white, ``image_size`` square, RGB; None when the font cannot draw it."""
    font = _font(font_path)
    single = font.getlength("\U0001f600")  # one glyph's advance
    left, top, right, bottom = font.getbbox(seq)
    if bottom - top <= 0 or right - left <= 0 or right - left > 1.5 * single:
        return None
    canvas = Image.new("RGBA", (int(right) + 8, int(bottom) + 8), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).text((0, 0), seq, font=font, embedded_color=True)
    box = canvas.getchannel("A").getbbox()
    if box is None:
        return None
    glyph = canvas.crop(box)
    side = max(glyph.size)
    square = Image.new("RGBA", (side, side), (255, 255, 255, 255))
    square.alpha_composite(glyph, ((side - glyph.size[0]) // 2, (side - glyph.size[1]) // 2))
    return square.convert("RGB").resize((image_size, image_size), Image.Resampling.LANCZOS)


def render_record(rec: Record, image_size: int = 64, font_path: str = FONT_PATH) -> Sample | tuple[str, str]:
    im = render_emoji(rec.source, image_size, font_path)
    if im is None:
        return ("not_drawable", rec.caption)
    image, ext = encode_image(im, "png")
    meta = dict(rec.meta, key=rec.key, caption=rec.caption, width=image_size, height=image_size)
    return Sample(rec.key, image, ext, rec.caption, meta)


def _file_stamp(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


@dataclass
class EmojiArgs:
    """The emoji shards (tools/make_emoji_dataset.py, and the demo's ``emoji`` section)."""

    output: str = arg("data/emoji", "Folder for train/, val/ and summary.json.")
    image_size: int = arg(64, "Side of the rendered emoji, in pixels.", ge=8)
    shard_size: int = arg(256, "Samples per shard.", gt=0)
    val_fraction: float = arg(0.05, "Fraction of emoji held out for validation, by key.", gt=0, lt=1)
    workers: int = arg(1, "Rendering processes.", gt=0)
    limit: int | None = arg(None, "Render only this many emoji, spread over all groups (quick runs); null: all.", gt=0)
    skin_tones: bool = arg(
        True, "Include the skin-tone variants (1785 of the 3655 emoji: the same pictures recoloured)."
    )
    groups: list[str] | None = arg(
        None, "Unicode emoji groups to keep, e.g. ['Smileys & Emotion', 'Food & Drink']; null: all.", sep=","
    )
    font: str = arg(FONT_PATH, "The emoji font.")
    names: str = arg(EMOJI_TEST_PATH, "Unicode's emoji-test.txt.")


def build_emoji_from(args: EmojiArgs, overwrite: bool = False) -> dict[str, Any]:
    """:func:`build_emoji_dataset` with the settings of ``args``."""
    return build_emoji_dataset(
        args.output,
        image_size=args.image_size,
        shard_size=args.shard_size,
        val_fraction=args.val_fraction,
        limit=args.limit,
        skin_tones=args.skin_tones,
        groups=args.groups,
        workers=args.workers,
        font_path=args.font,
        names_path=args.names,
        overwrite=overwrite,
    )


def build_emoji_dataset(
    output: str | Path,
    *,
    image_size: int = 64,
    shard_size: int = 256,
    val_fraction: float = 0.05,
    limit: int | None = None,
    skin_tones: bool = True,
    groups: list[str] | None = None,
    workers: int = 1,
    font_path: str = FONT_PATH,
    names_path: str = EMOJI_TEST_PATH,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Render the emoji into ``output/{train,val}`` shards; returns the summary (also summary.json)."""
    if image_size < 8:
        raise ValueError(f"image_size must be >= 8, got {image_size}")
    _require(font_path, "fonts-noto-color-emoji")
    records = read_emoji_names(names_path)
    if not skin_tones:  # the skin-tone variants repeat an image with another caption suffix
        records = [r for r in records if "skin tone" not in r.caption]
    if groups:
        known = sorted({r.meta["group"] for r in records})
        unknown = sorted(set(groups) - set(known))
        if unknown:
            raise ValueError(f"unknown emoji group(s) {unknown}; the groups are {known}")
        records = [r for r in records if r.meta["group"] in groups]
    if limit is not None:
        step = max(1, len(records) // limit)
        records = records[::step][:limit]  # a spread over all groups, not the first few
    options = {"image_size": image_size, "shard_size": shard_size, "val_fraction": val_fraction, "limit": limit}
    if not skin_tones:
        options["skin_tones"] = False  # only when set, so that earlier full data sets keep their fingerprint
    if groups:
        options["groups"] = sorted(groups)
    # the records carry the names; the font's bytes decide the pixels
    fp = fingerprint(records, options, extra=[_file_stamp(font_path)])
    return write_dataset(
        records,
        partial(render_record, image_size=image_size, font_path=font_path),
        output,
        shard_size=shard_size,
        val_fraction=val_fraction,
        workers=workers,
        fp=fp,
        skipped=Counter(),
        options=options | {"font": font_path, "names": names_path, "emoji_listed": len(records)},
        overwrite=overwrite,
        desc="emoji",
    )
