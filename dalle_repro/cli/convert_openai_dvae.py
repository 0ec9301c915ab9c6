"""Convert OpenAI's released dVAE (encoder.pkl, decoder.pkl) into a dalle-repro model folder.

OpenAI published the dVAE as whole pickled modules. Unpickling a file runs whatever code it names,
so this tool does it only when you pass --trust-pickle, for files you got from a source you trust,
and it needs OpenAI's `dall_e` package importable (tools/setup.sh --dev installs it, or:
pip install --no-deps DALL-E attrs). The output (config.yaml + model.safetensors) loads with
DVAE.from_pretrained, which reads safetensors only; nothing else in dalle-repro ever unpickles.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from dalle_repro.core.cli import flag_aliases, parse_cli
from dalle_repro.core.config import arg
from dalle_repro.core.pretrained import check_replaceable, load_state_strict
from dalle_repro.models.dvae import DVAE, args_from_openai, state_from_openai

ENC_ATTRS = ("n_hid", "n_blk_per_group", "input_channels", "vocab_size", "group_count")
DEC_ATTRS = ("n_hid", "n_blk_per_group", "output_channels", "vocab_size", "n_init", "group_count")


@dataclass
class ConvertArgs:
    """OpenAI's two pickles in, one dVAE folder out."""

    encoder: str = arg(doc="OpenAI's encoder.pkl.")
    decoder: str = arg(doc="OpenAI's decoder.pkl.")
    output: str = arg(doc="Folder to write (config.yaml, model.safetensors).")
    image_size: int = arg(256, "Input size recorded in the config.", gt=0)


SWITCHES_DOC = """
--trust-pickle: allow unpickling the two files (runs their code).
--overwrite: replace the output folder even if it holds files that are not a dVAE's.
"""


def _unpickle(path: Path) -> torch.nn.Module:
    try:
        import dall_e  # noqa: F401  (the pickles name its classes)
    except ImportError:
        raise SystemExit(
            "error: OpenAI's dall_e package is needed to unpickle: pip install --no-deps DALL-E attrs"
        ) from None
    if not path.is_file():
        raise SystemExit(f"error: {path} not found")
    module = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(module, torch.nn.Module):
        raise SystemExit(f"error: {path} holds a {type(module).__name__}, not a pickled module")
    return module


def main(argv: list[str] | None = None) -> int:
    a, flags = parse_cli(
        ConvertArgs,
        argv,
        (__doc__ or "") + SWITCHES_DOC,
        flags=("--trust-pickle", "--overwrite"),
        aliases=flag_aliases(ConvertArgs),
    )
    if a is None:
        return 0
    if not flags["trust_pickle"]:
        print(
            "error: refusing to unpickle without --trust-pickle: loading a pickle runs code from the file. "
            "Pass --trust-pickle only for files from a source you trust.",
            file=sys.stderr,
        )
        return 2
    try:  # before the (slow) unpickling: a folder of the user's other files is never replaced
        check_replaceable(Path(a.output), {"config.yaml", "model.safetensors"}, flags["overwrite"])
    except FileExistsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    enc, dec = _unpickle(Path(a.encoder)), _unpickle(Path(a.decoder))
    enc_attrs = {k: getattr(enc, k) for k in ENC_ATTRS if hasattr(enc, k)}
    dec_attrs = {k: getattr(dec, k) for k in DEC_ATTRS if hasattr(dec, k)}
    try:
        args = args_from_openai(enc_attrs, dec_attrs, a.image_size)
        model = DVAE(args)
        load_state_strict(model, state_from_openai(enc.state_dict(), dec.state_dict()), f"{a.encoder} + {a.decoder}")
    except (KeyError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    model.save_pretrained(Path(a.output), overwrite=flags["overwrite"])
    print(f"converted {args}: wrote config.yaml and model.safetensors in {a.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
