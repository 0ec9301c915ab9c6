"""Serve a trained prior: a playground page and an HTTP JSON API that batches concurrent requests.

Usage:
  python launch/serve.py --model RUN/export [--clip CLIP_DIR] [--port 8000] [--host 127.0.0.1] [--token T]

Loads the export once (weights, tokenizer, dVAE) and, with --clip, a CLIP to rerank. Open
http://127.0.0.1:8000/ for the page: a caption box, the sampling controls of launch/sample.py, the
kept images with their CLIP scores, all candidates on request, downloads, the captions tried, and
image edits (keep an image's top token rows, or redraw a box). The API:

  curl -s http://127.0.0.1:8000/api/generate -H 'Content-Type: application/json' \\
       -d '{"caption": "a big red circle on the left", "candidates": 16, "keep": 4}'

answers {"caption", "images": [{"png": BASE64, "score": S}, ...], "seconds", "batched_with"};
"grid": true adds every candidate. Requests that arrive together are sampled in one batched
generate call (up to --max-rows sequences, waiting at most --max-wait-ms for company); when
--queue requests wait, the server answers 503 with a Retry-After header. Bad input gets a 422 whose
"error" names the field. It binds 127.0.0.1 unless --host says otherwise; another address prints a
warning. --token (or the environment variable DALLE_REPRO_SERVE_TOKEN) makes every API call need
"Authorization: Bearer TOKEN", on any address (the page reads it from its own address:
http://HOST:PORT/?token=TOKEN). Exports are read with safetensors only.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass

from dalle_repro.core.cli import flag_aliases, parse_cli
from dalle_repro.core.config import ConfigError, arg


@dataclass
class ServeArgs:
    """launch/serve.py: the model, the address, and the batching."""

    model: str = arg(doc="The export folder (RUN/export of launch/train_prior.py).")
    clip: str | None = arg(None, "CLIP for reranking: a local HF folder (tools/train_clip.py's, or a download).")
    host: str = arg("127.0.0.1", "Address to bind; anything but loopback is reachable by others (a warning).")
    port: int = arg(8000, "Port.", ge=0, le=65535)
    token: str | None = arg(
        None,
        "Access token every API call must carry (Authorization: Bearer TOKEN), on any address; the environment "
        "variable DALLE_REPRO_SERVE_TOKEN sets it without showing it to ps.",
    )
    max_rows: int = arg(256, "Sequences (candidates of all batched requests) in one generate call.", ge=1)
    max_wait_ms: float = arg(50.0, "Milliseconds a batch waits for more requests after its first.", ge=0)
    queue: int = arg(32, "Requests that may wait; one more is answered 503 (busy).", ge=1)
    device: str = arg("auto", "auto, cpu or cuda.")

    def __post_init__(self) -> None:
        if self.token is not None and len(self.token) < 8:
            raise ConfigError("token: use at least 8 characters")


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def main(argv: list[str] | None = None) -> int:
    a, _ = parse_cli(ServeArgs, argv, __doc__ or "", aliases=flag_aliases(ServeArgs))
    if a is None:
        return 0
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    import os

    import uvicorn

    token = a.token or os.environ.get("DALLE_REPRO_SERVE_TOKEN") or None
    if token is not None and len(token) < 8:
        print("error: the token needs at least 8 characters", file=sys.stderr)
        return 2

    from dalle_repro.core.distributed import pick_device
    from dalle_repro.sample.export import load_prior
    from dalle_repro.sample.rerank import Reranker, RerankError
    from dalle_repro.serve.app import create_app
    from dalle_repro.serve.batcher import Batcher

    if a.host not in LOOPBACK:
        print(
            f"warning: binding {a.host}: the playground and API are reachable from other machines"
            + ("" if token else "; pass --token (or DALLE_REPRO_SERVE_TOKEN) to require an access token"),
            file=sys.stderr,
        )
    try:
        device = pick_device(a.device)
        reranker = Reranker(a.clip, device) if a.clip else None
        prior = load_prior(a.model, "model", device)
    except (RerankError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if prior.dvae is None:
        print(f"error: {a.model} has no dVAE (its export.json names none): images cannot be decoded", file=sys.stderr)
        return 2
    print(f"precision: {prior.use_trained_precision().reason}", file=sys.stderr)
    batcher = Batcher(prior, reranker, a.max_rows, a.max_wait_ms / 1000, a.queue)
    info = {
        "model": a.model,
        "clip": a.clip,
        "grid": prior.model.args.grid,
        "image_size": prior.dvae.args.image_size,
        "text_len": prior.model.args.text_len,
        "caption_dropout": prior.info.get("caption_dropout"),
        "max_rows": a.max_rows,
    }
    app = create_app(batcher, info, token)
    shown = "[::1]" if a.host == "::1" else a.host
    note = " (token required: open the page as /?token=TOKEN)" if token else ""
    print(f"serving {a.model} on http://{shown}:{a.port}/{note}", file=sys.stderr)
    try:
        uvicorn.run(app, host=a.host, port=a.port, log_level="warning")
    finally:
        batcher.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
