"""The prior's exported folder: what the sampler loads, without DeepSpeed.

``EXPORT/`` holds:

- ``model.safetensors``: the EMA weights (what sampling uses), ``raw.safetensors``: the raw ones;
- ``config.yaml``: the run's full config (its ``model`` section rebuilds the transformer; its
  ``precision.dtype`` is the user's, ``auto`` by default, which the sampler picks on its own machine);
- ``tokenizer.json``: the BPE tokenizer the prior was trained with;
- ``dvae/``: a copy of the dVAE folder (or, with ``copy_dvae`` off, ``export.json`` names its path);
- ``export.json``: the step, the text length, the caption-dropout rate (whether classifier-free
  guidance is meaningful) and where the dVAE is.

Everything is read with safetensors, JSON and YAML only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dalle_repro.core.config import load_yaml, to_yaml
from dalle_repro.core.precision import Pick, PrecisionArgs, pick_precision, slow_bf16_note
from dalle_repro.core.pretrained import build_pretrained, write_folder
from dalle_repro.data.tokenizer import TextTokenizer
from dalle_repro.models.dvae import DVAE
from dalle_repro.models.transformer import Transformer, TransformerArgs


def write_export(
    directory: str | Path,
    config: Any,
    ema: dict[str, torch.Tensor],
    raw: dict[str, torch.Tensor],
    tokenizer_path: str | Path,
    dvae_dir: str | Path | None,
    info: dict[str, Any],
    copy_dvae: bool = True,
) -> Path:
    """Write the export folder atomically (see the module docstring)."""
    meta = dict(info)
    folders: dict[str, str | Path] = {}
    if dvae_dir is not None and copy_dvae:
        folders["dvae"] = dvae_dir
        meta["dvae"] = "dvae"
    else:
        meta["dvae"] = str(Path(dvae_dir).resolve()) if dvae_dir is not None else None
    texts = {
        "config.yaml": to_yaml(config),
        "tokenizer.json": Path(tokenizer_path).read_text(encoding="utf-8"),
        "export.json": json.dumps(meta, indent=2) + "\n",
    }
    return write_folder(directory, {"model": ema, "raw": raw}, texts, folders)


@dataclass
class Prior:
    """A loaded export: the transformer, its tokenizer, the dVAE (None when the export has none), metadata."""

    model: Transformer
    tokenizer: TextTokenizer
    dvae: DVAE | None
    info: dict[str, Any]
    config: dict[str, Any]

    def use_trained_precision(self) -> Pick:
        """Run the resblocks in the precision of the prior's config, picked on this machine: ``auto``
        (the default) is decided here (precision.pick_precision), fp16 becomes bf16 on a CPU. Returns
        the pick, whose reason says why."""
        requested = self.config.get("precision", {}).get("dtype") or "fp32"
        device = next(self.model.parameters()).device
        if requested == "fp16" and device.type != "cuda":  # as near as a CPU comes
            note = slow_bf16_note(device, "precision.dtype")
            pick = Pick("bf16", f"precision.dtype=fp16 (the export's) runs as bf16 on {device.type}{note}")
        else:
            pick = pick_precision(requested, device, "precision.dtype")
        if pick.dtype != "fp32":
            self.model.enable_precision(PrecisionArgs(dtype=pick.dtype))
        return pick


def load_prior(directory: str | Path, weights: str = "model", device: str | torch.device = "cpu") -> Prior:
    """Load an export folder (``weights``: ``model`` for the EMA weights, ``raw`` for the raw ones)."""
    d = Path(directory)
    model = build_pretrained(d, TransformerArgs, Transformer, weights)
    args = model.args
    info_path = d / "export.json"
    if not info_path.is_file():
        raise FileNotFoundError(f"{info_path} not found: {d} is not an export of launch/train_prior.py")
    info = json.loads(info_path.read_text())
    tokenizer = TextTokenizer(d / "tokenizer.json", args.text_len)
    if tokenizer.vocab_size != args.text_vocab:
        raise ValueError(
            f"{d}/tokenizer.json gives {tokenizer.vocab_size} text ids, the model has text_vocab {args.text_vocab}"
        )
    dvae = None
    if info.get("dvae"):
        where = d / info["dvae"] if not Path(info["dvae"]).is_absolute() else Path(info["dvae"])
        dvae = DVAE.from_pretrained(where).to(device).eval()
        if dvae.args.vocab_size != args.image_vocab:
            raise ValueError(f"the dVAE at {where} has {dvae.args.vocab_size} codes, the prior {args.image_vocab}")
    return Prior(model.to(device).eval(), tokenizer, dvae, info, load_yaml(d / "config.yaml"))
