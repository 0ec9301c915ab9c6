"""One rank of the ZeRO tests in ``test_exact_skip.py`` (started once per rank, without the launcher).

``python zero_worker.py skip OUT``: for ZeRO stages 0-3, two runs of a small prior in fp32 under
DeepSpeed, one clean and one with an inf forced into one branch's weight gradient on rank 1 at one
update; rank 0 writes every parameter, its Adam moments and the skipped branches after each update.

``python zero_worker.py scale OUT``: a small prior in fp16 autocast (on CPU) under per-branch
scaling, on the same global batch whatever the number of ranks; rank 0 writes the scales and the
skipped branches after each update.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from safetensors.torch import save_file

from dalle_repro.core.precision import PrecisionArgs
from dalle_repro.models.transformer import Transformer, TransformerArgs
from dalle_repro.train.deepspeed import link_moments
from dalle_repro.train.exact_skip import ADAM_STATE, step_without
from dalle_repro.train.optim import param_groups

ARGS = TransformerArgs(
    dim=32, depth=2, heads=4, text_len=8, text_vocab=40, grid=4, image_vocab=32, conv_kernel=3, attention="local"
)
STEPS, FAULT_STEP, FAULT_BRANCH = 3, 1, 2  # branch 2: the attention branch of layer 2


def batch(step: int, rank: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    text = torch.randint(0, ARGS.text_vocab, (size, ARGS.text_len), generator=g)
    image = torch.randint(0, ARGS.image_vocab, (size, ARGS.grid**2), generator=g)
    return text, image


def engine_for(model: torch.nn.Module, stage: int, micro: int) -> object:
    opt = torch.optim.AdamW(param_groups(model, 0.045), lr=1e-2, betas=(0.9, 0.96), eps=1e-8)
    config = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": stage},
        "gradient_clipping": 1e6,  # computed (so the norm is), never binding: the runs compare bit for bit
        "steps_per_print": 10**9,
    }
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    return engine


def state_of(engine: object, model: Transformer, stage: int) -> dict[str, torch.Tensor]:
    """Every parameter (fp32 master at ZeRO 1-3) and its Adam moments, by name."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    out = {}
    for name, p in model.named_parameters():
        if stage == 0:
            out[name] = p.detach().clone()
            st = engine.optimizer.state.get(p, {})
            for k in ADAM_STATE:
                if k in st:
                    out[f"{name}:{k}"] = st[k].clone()
        else:
            out[name] = safe_get_full_fp32_param(p).clone()
            if engine.global_steps > 0:
                link_moments(engine)
                for k in ADAM_STATE:
                    out[f"{name}:{k}"] = safe_get_full_optimizer_state(p, k).clone()
    return {k: v.contiguous().cpu() for k, v in out.items()}


def skip_run(stage: int, fault: int | None, out: Path, name: str) -> dict:
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = Transformer(ARGS)
    step_box = [0]
    if fault is not None and rank == 1:
        target = model.branch_params()[FAULT_BRANCH][-2]  # a weight of the branch (post_1's or the attention's)

        def inject(g: torch.Tensor) -> torch.Tensor:
            if step_box[0] != fault:
                return g
            g = g.clone()
            g.view(-1)[3] = float("inf")
            return g

        target.register_hook(inject)  # before the scaler's own hook: the filter sees the inf
    scaler = model.enable_precision(PrecisionArgs(dtype="fp32"))
    engine = engine_for(model, stage, micro=2)
    if rank == 0 or stage > 0:  # the initial weights (a collective at ZeRO 1-3)
        init = state_of(engine, model, stage)
        if rank == 0:
            save_file(init, str(out / f"stage{stage}_{name}_init.safetensors"))
    record: dict = {"skipped": [], "grad_norm": []}
    for step in range(STEPS):
        step_box[0] = step
        text, image = batch(step, rank, 2)
        loss = model.loss_from_logits(text, image, *engine(text, image)).loss
        engine.backward(loss)
        skipped, _ = scaler.end_step(model.branch_params(), step, drop_grads=False)
        frozen = [p for j in skipped for p in model.branch_params()[j]]
        step_without(engine, frozen)
        norm = engine.get_global_grad_norm() if stage else None
        record["skipped"].append(skipped)
        record["grad_norm"].append(float(norm) if norm is not None else None)
        state = state_of(engine, model, stage)
        if rank == 0:
            save_file(state, str(out / f"stage{stage}_{name}_{step}.safetensors"))
    branch_names = {id(p): n for n, p in model.named_parameters()}
    record["branch"] = [branch_names[id(p)] for p in model.branch_params()[FAULT_BRANCH]]
    return record


def scale_run(out: Path) -> None:
    """The global batch is four copies of one pair of samples, split over the ranks, so that every rank's
    per-rank mean loss is the same function at 1 and 2 ranks; fp16 overflows then come alike."""
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = Transformer(ARGS)
    args = PrecisionArgs(dtype="fp16", init_log2=16.0, max_log2=30.0, growth_steps=1, decay_every=1)
    scaler = model.enable_precision(args)
    engine = engine_for(model, 0, micro=4 // world)
    scales, skipped_all = [], []
    for step in range(10):
        text, image = batch(step, 0, 2)
        text, image = text.repeat(2 // world, 1), image.repeat(2 // world, 1)
        loss = model.loss_from_logits(text, image, *engine(text, image)).loss
        engine.backward(loss)
        skipped, _ = scaler.end_step(model.branch_params(), step, drop_grads=False)
        step_without(engine, [p for j in skipped for p in model.branch_params()[j]])
        scales.append(scaler.scales.tolist())
        skipped_all.append(skipped)
    if rank == 0:
        (out / f"scale_{world}.json").write_text(json.dumps({"scales": scales, "skipped": skipped_all}))


def main() -> None:
    mode, out = sys.argv[1], Path(sys.argv[2])
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    deepspeed.init_distributed(dist_backend="gloo")
    torch.set_num_threads(1)
    if mode == "skip":
        records = {}
        for stage in (0, 1, 2, 3):
            for name, fault in (("clean", None), ("fault", FAULT_STEP), ("fault0", 0)):
                records[f"stage{stage}_{name}"] = skip_run(stage, fault, out, name)
        if dist.get_rank() == 0:
            (out / "skip.json").write_text(json.dumps(records))
    else:
        scale_run(out)
    dist.barrier()
    os._exit(0)  # DeepSpeed's atexit handlers can hang a gloo group at exit


if __name__ == "__main__":
    main()
