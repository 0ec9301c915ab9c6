"""Fine-tuning (train/finetune.py): a prior run that starts from an export's weights, with parts frozen;
what cannot be fine-tuned together refused at start naming both sides; exact resume; the record of
what an export was fine-tuned from; and the dVAE's init from a dVAE folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import checkpoint_state, dvae_overrides, prior_overrides, train_prior_on_two_ranks
from safetensors.torch import load_file

from dalle_repro.core.config import ConfigError, load_config, save_config
from dalle_repro.models.dvae import DVAE, DVAEArgs
from dalle_repro.train.finetune import frozen_names
from dalle_repro.train.metrics import read_metrics
from dalle_repro.train.prior import train
from dalle_repro.train.prior_config import PriorTrainConfig

pytest.importorskip("deepspeed")


def config(data: dict[str, Path], run_dir: Path, *extra: str) -> PriorTrainConfig:
    return load_config(PriorTrainConfig, None, prior_overrides(data, run_dir, *extra))


@pytest.fixture(scope="module")
def base_export(prior_data, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("base") / "run"
    train(config(prior_data, run, "run.steps=8", "run.caption_dropout=0"))
    return run / "export"


def embeddings_and_two_layers(weights: dict[str, torch.Tensor]) -> list[str]:
    """The tensor names that ``init.freeze=[embeddings,layers:2]`` keeps, spelled out independently."""
    names = [k for k in weights if k.split(".")[0] in ("text_pos", "row_emb", "col_emb", "text_emb", "image_emb")]
    return names + [k for k in weights if k.startswith(("blocks.0.", "blocks.1."))]


def val_losses(run_dir: Path) -> list[float]:
    return [r["val_loss"] for r in read_metrics(run_dir) if "val_loss" in r]


def test_fine_tuning_starts_from_the_export_freezes_what_it_is_told_and_records_its_source(
    prior_data, base_export, tmp_path
):
    freeze = "init.freeze=[embeddings,layers:2]"
    ft = tmp_path / "ft"
    cfg = config(prior_data, ft, f"init.export={base_export}", freeze, "run.val_every=3", "schedule.lr=0.001")
    train(cfg)
    scratch = tmp_path / "scratch"
    train(config(prior_data, scratch, "run.val_every=3", "schedule.lr=0.001"))
    # it starts where the export ended, far below a run from scratch, and lowers the validation loss further
    first_ft = next(r["loss"] for r in read_metrics(ft) if "loss" in r)
    first_scratch = next(r["loss"] for r in read_metrics(scratch) if "loss" in r)
    assert first_ft < first_scratch - 0.5
    base_val = val_losses(base_export.parent)[-1]
    assert val_losses(ft)[-1] < base_val
    before = load_file(str(base_export / "model.safetensors"))  # the EMA weights the run started from
    after = load_file(str(ft / "export" / "raw.safetensors"))
    ema_after = load_file(str(ft / "export" / "model.safetensors"))
    frozen = embeddings_and_two_layers(before)
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    assert all(torch.equal(before[k], ema_after[k]) for k in frozen)  # the EMA started from the loaded weights
    moved = [k for k in before if k not in frozen]
    assert moved and all(not torch.equal(before[k], after[k]) for k in moved if k.startswith("blocks.3."))
    info = json.loads((ft / "export" / "export.json").read_text())
    src = info["fine_tuned_from"]
    assert src["export"] == str(base_export.resolve()) and src["step"] == 8 and len(src["weights_digest"]) >= 16
    assert json.loads((ft / "init.json").read_text()) == src


def test_a_fine_tuning_run_resumes_exactly(prior_data, base_export, tmp_path):
    extra = (f"init.export={base_export}", "init.freeze=[body]", "run.ckpt_every=100")
    train(config(prior_data, tmp_path / "whole", *extra))
    train(config(prior_data, tmp_path / "split", *extra, "run.stop_after=3"))
    train(config(prior_data, tmp_path / "split", *extra), resume_run=True)
    loss = [[(r["step"], r["loss"]) for r in read_metrics(tmp_path / n) if "loss" in r] for n in ("whole", "split")]
    assert loss[0] == loss[1] and len(loss[0]) == 6
    a = load_file(str(tmp_path / "whole" / "export" / "raw.safetensors"))
    b = load_file(str(tmp_path / "split" / "export" / "raw.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # only the output moved: the final layer norm and the two heads
    start = load_file(str(base_export / "model.safetensors"))
    changed = {k.split(".")[0] for k in a if not torch.equal(a[k], start[k])}
    assert changed and changed <= {"ln_f", "text_head", "image_head"}


@pytest.mark.parametrize("zero", [2, 3])
def test_fine_tuning_on_two_ranks_keeps_frozen_parts_at_zero_stage(prior_data, base_export, tmp_path, zero):
    """Under the deepspeed launcher with 2 ranks, ZeRO 2 (gradients and optimizer state sharded) and
    3 (parameters sharded too, the frozen ones among them): the replicas agree, the frozen tensors
    come out bit-identical to the export's in the raw and the EMA weights, the rest moved."""
    run = tmp_path / "ft"
    extra = [f"init.export={base_export}", "init.freeze=[embeddings,layers:2]", f"deepspeed.zero_stage={zero}"]
    cfg = load_config(PriorTrainConfig, None, prior_overrides(prior_data, run, "run.ckpt_every=3", *extra))
    save_config(cfg, tmp_path, "ft.yaml")
    train_prior_on_two_ranks(tmp_path / "ft.yaml")
    ranks = checkpoint_state(run, 6)["ranks"]
    assert len(ranks) == 2
    if zero < 3:  # replicas: the ranks hold the same weights (ZeRO 3 shards them: the export gathers them)
        assert ranks[0]["weights"] == ranks[1]["weights"]
    before = load_file(str(base_export / "model.safetensors"))
    after = load_file(str(run / "export" / "raw.safetensors"))
    ema = load_file(str(run / "export" / "model.safetensors"))
    frozen = embeddings_and_two_layers(before)
    assert frozen and all(torch.equal(before[k], after[k]) and torch.equal(before[k], ema[k]) for k in frozen)
    moved = [k for k in before if k.startswith("blocks.3.") and k.endswith("weight")]
    assert moved and all(not torch.equal(before[k], after[k]) for k in moved)
    assert json.loads((run / "export" / "export.json").read_text())["fine_tuned_from"]["step"] == 8


def test_what_cannot_be_fine_tuned_together_is_refused_naming_both_sides(prior_data, base_export, tmp_path):
    init = f"init.export={base_export}"
    with pytest.raises(ConfigError, match=r"text.text_len: 12, but the export .* text_len 8"):
        train(config(prior_data, tmp_path / "a", init, "text.text_len=12"))
    with pytest.raises(ConfigError, match=r"model.dim: 64, but the export .* trained with 32"):
        train(config(prior_data, tmp_path / "b", init, "model.dim=64", "model.heads=4"))
    other_tok = tmp_path / "tokenizer.json"
    data = json.loads(Path(prior_data["tokenizer"]).read_text())
    data["model"]["merges"] = data["model"]["merges"][:-1]
    other_tok.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=r"text.path: .*another tokenizer .* than the export's"):
        train(config(prior_data, tmp_path / "c", init, f"text.path={other_tok}"))
    torch.manual_seed(1)  # the same shape as the export's dVAE, other weights
    other = DVAE(DVAEArgs(image_size=16, n_hid=8, n_blk_per_group=1, group_count=3, vocab_size=32, n_init=8))
    other.save_pretrained(tmp_path / "other_dvae")
    with pytest.raises(ConfigError, match=r"dvae: .*other_dvae \(weights digest \w+\) is another dVAE"):
        train(config(prior_data, tmp_path / "d", init, f"dvae={tmp_path / 'other_dvae'}"))
    with pytest.raises(ConfigError, match=r"init.freeze: unknown part 'heads'"):
        train(config(prior_data, tmp_path / "e", init, "init.freeze=[heads]"))
    with pytest.raises(ConfigError, match=r"init.export: .* is not an export"):
        train(config(prior_data, tmp_path / "f", f"init.export={tmp_path}"))
    for d in "abcdef":  # refused before any training: nothing of a run was written
        assert not (tmp_path / d / "checkpoints").exists()


def test_freeze_parts_name_the_right_tensors():
    from dalle_repro.models.transformer import Transformer, TransformerArgs

    m = Transformer(TransformerArgs(text_vocab=20, text_len=4, image_vocab=8, grid=2, dim=16, depth=3, heads=2))
    assert {n.split(".")[0] for n in frozen_names(m, ["embeddings"])} == {
        "text_pos",
        "row_emb",
        "col_emb",
        "text_emb",
        "image_emb",
    }
    assert {n.split(".")[1] for n in frozen_names(m, ["layers:2"])} == {"0", "1"}
    body = frozen_names(m, ["body"])
    assert not any(n.startswith(("ln_f", "text_head", "image_head")) for n in body)
    assert len(body) == len(list(m.parameters())) - 4  # ln_f weight and bias, two heads
    with pytest.raises(ConfigError, match="asks for 4 layers; the model has 3"):
        frozen_names(m, ["layers:4"])


def test_the_dvae_starts_from_a_dvae_folder_and_refuses_another_architecture(emoji_dir, tmp_path):
    from dalle_repro.train.dvae import DVAETrainConfig
    from dalle_repro.train.dvae import train as train_dvae

    base = tmp_path / "base"
    train_dvae(load_config(DVAETrainConfig, None, dvae_overrides(emoji_dir, base, "run.steps=4")))
    ft = tmp_path / "ft"
    train_dvae(
        load_config(DVAETrainConfig, None, dvae_overrides(emoji_dir, ft, "run.steps=2", f"init.dvae={base}/dvae"))
    )
    scratch = tmp_path / "scratch"
    train_dvae(load_config(DVAETrainConfig, None, dvae_overrides(emoji_dir, scratch, "run.steps=2")))
    first = [next(r["loss"] for r in read_metrics(d) if "loss" in r) for d in (ft, scratch)]
    last_base = [r["loss"] for r in read_metrics(base) if "loss" in r][-1]
    assert abs(first[0] - last_base) < abs(first[1] - last_base)
    assert json.loads((ft / "init.json").read_text())["dvae"] == str((base / "dvae").resolve())
    bad = dvae_overrides(emoji_dir, tmp_path / "bad", "run.steps=2", f"init.dvae={base}/dvae", "model.vocab_size=64")
    with pytest.raises(ConfigError, match=r"init.dvae: .*model.vocab_size: 64 here, \d+ in"):
        train_dvae(load_config(DVAETrainConfig, None, bad))
    shutil.rmtree(tmp_path / "bad", ignore_errors=True)
