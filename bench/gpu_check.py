"""Every CUDA-only check and the GPU figures, in one short call; one JSON at the end.

Usage: python bench/gpu_check.py [--dry-run] [--budget-s 450] [--out FILE]

On one H100/H200 it is meant to finish in under 8 minutes (``--budget-s``: a check that would start
after the budget is spent is skipped and says so). The checks, each reported as
``{"ok": bool, ...}`` so that one failure does not hide the others:

- ``cuda_tests``: the test suite's CUDA-only tests (``pytest -k cuda``);
- ``flex_vs_dense``: FlexAttention against dense attention, forward and backward, for every mask kind
  at text 256 + grid 32 in bf16, at flex blocks of 128, 64 and 32 (largest error against an fp32
  dense reference, and the time of a forward + backward per block size);
- ``fp16_block_skip``: a small prior in fp16 under ``precision.mode=block_scaled`` inside a DeepSpeed
  engine, with an inf forced into one branch's gradient: that branch alone is skipped (its weights
  bit-identical), the others update, and its scale drops;
- ``prior_350m`` / ``prior_1.3b``: train steps of ``configs/gpu/prior-*.yaml``'s model (bf16, flex,
  its micro-batch and checkpointing), with tokens/s, model TFLOP/s and MFU against 989 TFLOP/s (dense
  bf16 on H100/H200 SXM). Model FLOPs: 6 x (weights of every matmul) per token, plus 12 x d per
  allowed (query, key) pair per layer (the mask's own pairs, not N^2); recomputation not counted;
- ``sampling``: cached sampling at grid 32 (the 350M model, 16 candidates at once), images/s;
- ``dvae_fp16``: train steps of ``configs/paper/dvae.yaml``'s dVAE in fp16 with loss scaling, images/s.

``--dry-run`` runs the same code on the CPU at toy sizes (local attention for training, flex
forward only, fp32 where CPU has no fp16), checking that every part builds and runs and that the
report has every field; its figures mean nothing. CI runs it (tests/test_bench.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dalle_repro.core.cli import flag_aliases, parse_cli
from dalle_repro.core.config import ConfigError, arg, load_config
from dalle_repro.core.precision import PrecisionArgs
from dalle_repro.models.attention import attend
from dalle_repro.models.masks import KINDS, MaskSpec, allowed, layer_kind
from dalle_repro.models.transformer import Transformer, TransformerArgs

PEAK_BF16_TFLOPS = 989.0  # H100/H200 SXM, dense bf16


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn: Callable[[], Any], dev: torch.device, warm: int, reps: int) -> float:
    """Seconds per call of ``fn`` after ``warm`` untimed calls."""
    for _ in range(warm):
        fn()
    _sync(dev)
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    _sync(dev)
    return (time.perf_counter() - t) / reps


def cuda_tests(dev: torch.device, dry: bool) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "pytest", "-q", "-k", "cuda", "-p", "no:cacheprovider", str(ROOT / "tests")]
    if dry:
        cmd.append("--collect-only")  # no CUDA here: only that the selection finds the tests
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    tail = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else r.stderr[-500:]
    return {"ok": r.returncode == 0, "summary": tail}


def flex_vs_dense(dev: torch.device, dry: bool) -> dict[str, Any]:
    text, grid, heads, d = (8, 8, 2, 16) if dry else (256, 32, 16, 64)
    blocks = (16, 32) if dry else (128, 64, 32)
    out: dict[str, Any] = {"ok": True, "max_err": {}, "fwd_bwd_ms": {}}
    for kind in KINDS:
        spec = MaskSpec(kind, text, grid, conv_kernel=11 if not dry else 3)
        g = torch.Generator(device="cpu").manual_seed(0)
        q, k, v = (torch.randn(2, heads, spec.n, d, generator=g).to(dev) for _ in range(3))
        dy = torch.randn(2, heads, spec.n, d, generator=g).to(dev)
        qd, kd, vd = (x.clone().requires_grad_() for x in (q, k, v))
        ref = attend(qd, kd, vd, spec, "dense")
        ref_grads = torch.autograd.grad(ref, (qd, kd, vd), dy)
        for block in blocks:
            half = torch.bfloat16 if not dry else torch.float32
            qf, kf, vf = (x.to(half).requires_grad_(not dry) for x in (q, k, v))
            if dry:
                with torch.no_grad():
                    y = attend(qf, kf, vf, spec, "flex", flex_block=block)
                err = float((y.float() - ref.detach()).abs().max())
            else:
                y = attend(qf, kf, vf, spec, "flex", flex_block=block)
                dyh = dy.to(half)
                grads = torch.autograd.grad(y, (qf, kf, vf), dyh)
                pairs = zip((y, *grads), (ref, *ref_grads), strict=True)
                err = max(float((a.float() - b).abs().max()) for a, b in pairs)

                def fwd_bwd(qf=qf, kf=kf, vf=vf, block=block, spec=spec, dyh=dyh) -> None:
                    yy = attend(qf, kf, vf, spec, "flex", flex_block=block)
                    torch.autograd.grad(yy, (qf, kf, vf), dyh)

                out["fwd_bwd_ms"][f"{kind}/{block}"] = round(1000 * _timed(fwd_bwd, dev, 2, 5), 3)
            out["max_err"][f"{kind}/{block}"] = err
            out["ok"] &= err < (1e-4 if dry else 5e-2)
    return out


def _prior_flops_per_sequence(model: Transformer) -> float:
    """Model FLOPs of one training sequence (forward + backward): 6 per matmul weight per token,
    and 12 d per allowed (query, key) pair per layer."""
    a = model.args
    matmul = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    pos = torch.arange(a.text_len + a.grid**2)
    pairs = 0
    for layer in range(1, a.depth + 1):
        spec = MaskSpec(layer_kind(layer, a.depth), a.text_len, a.grid, a.conv_kernel, a.conv_wrap)
        pairs += int(allowed(spec, pos[:, None], pos[None, :]).sum())
    return 6 * matmul * (a.text_len + a.grid**2) + 12 * a.dim * pairs


def _model_args(config: str, dry: bool) -> tuple[TransformerArgs, int]:
    from dalle_repro.train.prior_config import PriorTrainConfig, model_with_paper_sizes

    cfg = load_config(PriorTrainConfig, ROOT / config)
    if dry:
        small = dict(dim=64, depth=4, heads=4, text_len=8, text_vocab=64, grid=4, image_vocab=32, conv_kernel=3)
        return TransformerArgs(**small, attention="local", checkpoint=cfg.model.checkpoint), 2
    return model_with_paper_sizes(cfg), cfg.data.batch_size


def prior_step(config: str) -> Callable[[torch.device, bool], dict[str, Any]]:
    def check(dev: torch.device, dry: bool) -> dict[str, Any]:
        args, batch = _model_args(config, dry)
        torch.manual_seed(0)
        model = Transformer(args).to(dev)
        scaler = model.enable_precision(PrecisionArgs(dtype="fp32" if dry else "bf16"))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=dev.type == "cuda")
        text = torch.randint(0, args.text_vocab, (batch, args.text_len), device=dev)
        image = torch.randint(0, args.image_vocab, (batch, args.grid**2), device=dev)
        state = {"step": 0}

        def step() -> None:
            loss = model.loss(text, image).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            skipped, _ = scaler.end_step(model.branch_params(), state["step"])
            state["step"] += 1
            opt.step()
            assert not skipped, f"branches {skipped} skipped in a clean step"

        dt = _timed(step, dev, 1 if dry else 3, 1 if dry else 5)
        flops = _prior_flops_per_sequence(model) * batch / dt
        mem = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None
        return {
            "ok": True,
            "params": sum(p.numel() for p in model.parameters()),
            "batch": batch,
            "tokens_per_s": round(batch * args.seq_len / dt, 1),
            "model_tflops": round(flops / 1e12, 3),
            "mfu": round(flops / 1e12 / PEAK_BF16_TFLOPS, 4),
            "max_memory_gib": mem,
            "flex_block": args.flex_block,
        }

    return check


def fp16_block_skip(dev: torch.device, dry: bool) -> dict[str, Any]:
    """One rank of DeepSpeed (stage 0), fp16 resblocks (CPU autocast in a dry run), an inf forced
    into branch 1's weight gradient at the second update."""
    import deepspeed
    import torch.distributed as dist

    from dalle_repro.train.exact_skip import step_without

    if not dist.is_initialized():
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29611")
        deepspeed.init_distributed(dist_backend="nccl" if dev.type == "cuda" else "gloo")
    args = TransformerArgs(
        dim=64, depth=2, heads=4, text_len=8, text_vocab=64, grid=8, image_vocab=64, conv_kernel=3,
        attention="local" if dev.type == "cpu" else "flex",
    )  # fmt: skip
    torch.manual_seed(0)
    model = Transformer(args).to(dev)
    target = model.branch_params()[1][-2]
    box = {"step": 0}

    def inject(g: torch.Tensor) -> torch.Tensor:
        return g.clone().fill_(float("inf")) if box["step"] == 1 else g

    target.register_hook(inject)
    scaler = model.enable_precision(PrecisionArgs(dtype="fp16"))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    config = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "steps_per_print": 10**9}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    text = torch.randint(0, 64, (4, 8), device=dev)
    image = torch.randint(0, 64, (4, 64), device=dev)
    report: dict[str, Any] = {"skipped": []}
    for step in range(3):
        box["step"] = step
        before = [p.detach().clone() for p in model.parameters()]
        scale_before = scaler.scales.clone()
        engine.backward(model.loss_from_logits(text, image, *engine(text, image)).loss)
        skipped, _ = scaler.end_step(model.branch_params(), step, drop_grads=False)
        step_without(engine, [p for j in skipped for p in model.branch_params()[j]])
        report["skipped"].append(skipped)
        if step == 1:
            inside = {id(p) for p in model.branch_params()[1]}
            pairs = list(zip(before, model.parameters(), strict=True))
            same = [torch.equal(b, p) for b, p in pairs if id(p) in inside]
            moved = [not torch.equal(b, p) for b, p in pairs if id(p) not in inside]
            report["branch_unchanged"] = all(same)
            report["others_moved"] = sum(moved)
            report["scale_dropped"] = bool(scaler.scales[1] < scale_before[1])
    report["ok"] = (
        report["skipped"][1] == [1]
        and report["branch_unchanged"]
        and report["others_moved"] > 0
        and report["scale_dropped"]
        and not report["skipped"][2]
    )
    return report


def sampling(dev: torch.device, dry: bool) -> dict[str, Any]:
    args, _ = _model_args("configs/gpu/prior-350m.yaml", dry)
    torch.manual_seed(0)
    model = Transformer(args).to(dev).eval()
    if not dry:
        model.enable_precision(PrecisionArgs(dtype="bf16"))
    batch = 2 if dry else 16
    text = torch.randint(0, args.text_vocab, (batch, args.text_len), device=dev)
    g = torch.Generator(device=dev).manual_seed(0)
    dt = _timed(lambda: model.generate(text, top_k=64, generator=g), dev, 1, 1 if dry else 2)
    return {"ok": True, "grid": args.grid, "batch": batch, "img_per_s": round(batch / dt, 3)}


def dvae_fp16(dev: torch.device, dry: bool) -> dict[str, Any]:
    from dalle_repro.train.dvae import DVAETrainConfig, State, train_step
    from dalle_repro.train.optim import EMA, adamw

    over = ["data.batch_size=8", "precision.dtype=fp16"]
    if dry:
        over = ["model.image_size=32", "data.image_size=32", "model.n_hid=16", "model.vocab_size=64"]
        over += ["model.n_init=8", "model.group_count=2", "data.batch_size=2", "precision.dtype=fp32"]
    cfg = load_config(DVAETrainConfig, ROOT / "configs/paper/dvae.yaml", over)
    from dalle_repro.models.dvae import DVAE

    torch.manual_seed(0)
    model = DVAE(cfg.model).to(dev, memory_format=torch.channels_last)
    opt = adamw(model, 1e-4, (0.9, 0.999), 1e-8, 0.0)
    scaler = torch.amp.GradScaler("cuda") if cfg.precision.dtype == "fp16" else None
    st = State(model, model, opt, EMA(model, 0.999), scaler, loader=None)  # type: ignore[arg-type]
    b, s = cfg.data.batch_size, cfg.model.image_size
    images = torch.rand(b, 3, s, s, device=dev).contiguous(memory_format=torch.channels_last)
    last: dict[str, float] = {}

    def step() -> None:
        last.update(train_step(st, images, cfg, dev))

    dt = _timed(step, dev, 1 if dry else 3, 1 if dry else 5)
    return {
        "ok": bool(torch.isfinite(torch.tensor(last["loss"]))),
        "precision": cfg.precision.dtype,
        "loss_scale": scaler.get_scale() if scaler is not None else None,
        "img_per_s": round(b / dt, 2),
        "skipped_steps": last["skipped_steps"],
    }


CHECKS: dict[str, Callable[[torch.device, bool], dict[str, Any]]] = {
    "cuda_tests": cuda_tests,
    "flex_vs_dense": flex_vs_dense,
    "fp16_block_skip": fp16_block_skip,
    "prior_350m": prior_step("configs/gpu/prior-350m.yaml"),
    "prior_1.3b": prior_step("configs/gpu/prior-1.3b.yaml"),
    "sampling": sampling,
    "dvae_fp16": dvae_fp16,
}


@dataclass
class GpuCheckArgs:
    """The GPU check's settings."""

    dry_run: bool = arg(False, "Toy sizes on the CPU: checks that every part runs.")
    budget_s: float = arg(450.0, "Skip checks that would start after this many seconds.", gt=0)
    only: list[str] | None = arg(None, "Run only these checks (names of CHECKS); null: all.")
    out: str | None = arg(None, "Also write the JSON here.")

    def __post_init__(self) -> None:
        unknown = sorted(set(self.only or ()) - set(CHECKS))
        if unknown:
            raise ConfigError(f"only: no check named {', '.join(unknown)}; the checks are {', '.join(CHECKS)}")


def main(argv: list[str] | None = None) -> int:
    a, _ = parse_cli(GpuCheckArgs, argv, __doc__ or "", aliases=flag_aliases(GpuCheckArgs))
    if a is None:
        return 0
    if not a.dry_run and not torch.cuda.is_available():
        print("error: no CUDA device; --dry-run runs the checks at toy sizes on the CPU", file=sys.stderr)
        return 2
    dev = torch.device("cpu" if a.dry_run else "cuda")
    report: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "device": torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu (dry run)",
        "torch": torch.__version__,
        "dry_run": a.dry_run,
        "checks": {},
    }
    start = time.perf_counter()
    for name, check in CHECKS.items():
        if a.only and name not in a.only:
            continue
        if time.perf_counter() - start > a.budget_s:
            report["checks"][name] = {"ok": False, "skipped": f"over the {a.budget_s:.0f} s budget"}
            continue
        t = time.perf_counter()
        try:
            result = check(dev, a.dry_run)
        except Exception as e:  # one failing check must not hide the others
            result = {"ok": False, "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-2000:]}
        result["seconds"] = round(time.perf_counter() - t, 1)
        report["checks"][name] = result
        print(f"{name}: {'ok' if result['ok'] else 'FAILED'} in {result['seconds']} s", file=sys.stderr, flush=True)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
    report["ok"] = all(c["ok"] for c in report["checks"].values())
    report["seconds"] = round(time.perf_counter() - start, 1)
    text = json.dumps(report, indent=2, default=str)
    if a.out:
        Path(a.out).write_text(text + "\n")
    print(text)
    with contextlib.suppress(Exception):
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
