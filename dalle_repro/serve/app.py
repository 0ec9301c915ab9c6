"""The FastAPI app: the playground page at ``/`` and the JSON API.

- ``GET /api/info``: the model's sizes and whether CLIP reranks;
- ``POST /api/generate``: a caption and the sampling settings in (``GenerateRequest``), PNG images
  (base64) with their CLIP scores out; with ``init_image`` (a base64 PNG or JPEG) an image edit:
  ``init_rows`` keeps its top token rows, ``edit_box`` [x0, y0, x1, y1] redraws a region;
- ``GET /api/stats``: how many generate calls served how many requests.

Bad input gets a 422 whose ``error`` names the field; a full queue a 503 with ``Retry-After``.
With a token, every call but the page itself needs ``Authorization: Bearer TOKEN``.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import io
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, Field, field_validator, model_validator

from dalle_repro.core.images import to_pil
from dalle_repro.data.samples import decode_image
from dalle_repro.sample.generate import Box, SampleSettings, edit_input
from dalle_repro.serve.batcher import Batcher, Busy, Job, Result
from dalle_repro.serve.page import PAGE

MAX_CAPTION_CHARS = 1000
MAX_IMAGE_BYTES = 8 << 20
REQUEST_TIMEOUT = 600.0  # seconds a request may wait for its images


class GenerateRequest(BaseModel):
    """One request of ``POST /api/generate``."""

    caption: str = Field(min_length=1, max_length=MAX_CAPTION_CHARS)
    candidates: int = Field(16, ge=1, le=256)
    keep: int = Field(4, ge=1, le=64)
    temperature: float = Field(1.0, ge=0, le=5)
    top_k: int | None = Field(None, ge=1)
    top_p: float | None = Field(None, gt=0, le=1)
    guidance: float = Field(1.0, ge=0, le=20)
    seed: int = Field(0, ge=0, le=2**31 - 1)
    grid: bool = False
    init_image: str | None = Field(None, max_length=MAX_IMAGE_BYTES * 4 // 3 + 4)
    init_rows: int = Field(0, ge=0)
    edit_box: list[int] | None = Field(None, min_length=4, max_length=4)

    @field_validator("caption")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("the caption is blank")
        return v.strip()

    @model_validator(mode="after")
    def _consistent(self) -> GenerateRequest:
        if self.keep > self.candidates:
            raise ValueError(f"keep ({self.keep}) cannot exceed candidates ({self.candidates})")
        if (self.init_rows or self.edit_box) and not self.init_image:
            raise ValueError("init_rows and edit_box edit an image: give init_image")
        if self.init_image and not (self.init_rows or self.edit_box):
            raise ValueError("init_image: say what to do with it, init_rows (keep its top rows) or edit_box")
        if self.init_rows and self.edit_box:
            raise ValueError("init_rows and edit_box are two edits: give one")
        return self


def _png(image: torch.Tensor) -> str:
    buf = io.BytesIO()
    to_pil(image).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _field_error(exc: RequestValidationError) -> str:
    parts = []
    for e in exc.errors():
        loc = [str(x) for x in e.get("loc", ()) if x != "body"]
        parts.append(f"{'.'.join(loc) or 'request'}: {e.get('msg', 'invalid')}")
    return "; ".join(parts)


def create_app(batcher: Batcher, info: dict[str, Any], token: str | None = None) -> FastAPI:
    """The app over a running :class:`Batcher`; ``info`` is what ``/api/info`` shows."""
    app = FastAPI(title="dalle-repro", docs_url="/api/docs", redoc_url=None, openapi_url="/api/openapi.json")
    dvae = batcher.prior.dvae

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"error": _field_error(exc)}, status_code=422)

    @app.middleware("http")
    async def _auth(request: Request, call_next: Any) -> Any:
        if token is not None and request.url.path.startswith("/api/"):
            scheme, _, given = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
                return JSONResponse({"error": "authorization: a valid Bearer token is needed"}, status_code=401)
        return await call_next(request)

    @app.get("/", response_class=HTMLResponse)
    async def page() -> str:
        return PAGE

    @app.get("/api/info")
    async def api_info() -> dict[str, Any]:
        return info

    @app.get("/api/stats")
    async def api_stats() -> dict[str, Any]:
        return dict(batcher.stats) | {"waiting": batcher.queue.qsize()}

    @app.post("/api/generate")
    def api_generate(req: GenerateRequest) -> JSONResponse:  # a plain def: FastAPI runs it in its thread pool,
        # so decoding the image and encoding the PNGs never hold up the event loop (and the requests it queues)
        settings = SampleSettings(
            candidates=req.candidates,
            keep=req.keep,
            temperature=req.temperature,
            top_k=req.top_k,
            top_p=req.top_p,
            guidance=req.guidance,
            seed=req.seed,
            init_rows=req.init_rows,
            batch_size=None,
        )
        try:
            settings.check(batcher.prior.model)
        except ValueError as e:
            return JSONResponse({"error": str(e)}, status_code=422)
        init, box = None, None
        if req.init_image is not None:
            try:
                raw = base64.b64decode(req.init_image, validate=True)
                im, _ = decode_image(raw)
            except (binascii.Error, ValueError, Exception) as e:
                return JSONResponse({"error": f"init_image: not a readable PNG or JPEG ({e})"}, status_code=422)
            try:
                box = Box(*req.edit_box) if req.edit_box is not None else None
                init, box = edit_input(im, box, dvae.args.image_size, batcher.prior.model.args.grid)
            except ValueError as e:
                return JSONResponse({"error": str(e)}, status_code=422)
        job = Job(req.caption, settings, init, box)
        try:
            future = batcher.submit(job)
        except Busy as e:
            headers = {"Retry-After": str(int(round(e.retry_after)))}
            return JSONResponse({"error": str(e), "retry_after": e.retry_after}, status_code=503, headers=headers)
        try:
            result: Result = future.result(timeout=REQUEST_TIMEOUT)
        except ValueError as e:
            return JSONResponse({"error": str(e)}, status_code=422)
        except TimeoutError:
            future.cancel()
            return JSONResponse({"error": f"no answer within {REQUEST_TIMEOUT} s"}, status_code=504)
        except RuntimeError as e:
            return JSONResponse({"error": str(e)}, status_code=503)
        body: dict[str, Any] = {
            "caption": req.caption,
            "images": [
                {"png": _png(im), "score": None if result.scores is None else result.scores[i]}
                for i, im in enumerate(result.images)
            ],
            "seconds": result.seconds,
            "batched_with": result.batched_with,
        }
        if req.grid:
            cs = result.candidate_scores
            body["candidates"] = [
                {"png": _png(im), "score": None if cs is None else cs[i]} for i, im in enumerate(result.candidates)
            ]
        return JSONResponse(body)

    return app
