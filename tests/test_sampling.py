"""Sampling and reranking: cached = uncached, seeds, top-k/top-p, guidance, priming, the rerank
order, CLIP loading errors, tools/train_clip.py and launch/sample.py end to end."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dalle_repro.data.tokenizer import TextTokenizer
from dalle_repro.models.dvae import DVAE, DVAEArgs
from dalle_repro.models.transformer import Transformer, TransformerArgs, allowed_probs, sample_logits
from dalle_repro.sample.export import write_export
from dalle_repro.sample.generate import SampleSettings, generate
from dalle_repro.sample.rerank import Reranker, RerankError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def parts(tokenizer_path: Path):
    torch.manual_seed(0)
    tok = TextTokenizer(tokenizer_path, 8)
    # depth 4: row, column, row, conv (every mask kind is cached)
    args = TransformerArgs(
        dim=32, depth=4, heads=4, text_len=8, text_vocab=tok.vocab_size, grid=4, image_vocab=32, conv_kernel=3
    )
    model = Transformer(args).eval()
    dvae = DVAE(DVAEArgs(image_size=16, n_hid=8, n_blk_per_group=1, group_count=3, vocab_size=32, n_init=8)).eval()
    return model, dvae, tok


def slow_greedy(model: Transformer, text: torch.Tensor) -> torch.Tensor:
    """Greedy decoding with the full forward at every position (no cache)."""
    a = model.args
    image = torch.zeros(text.shape[0], a.n_image, dtype=torch.long)
    for i in range(a.n_image):
        _, logits = model(text, image)
        image[:, i] = logits[:, i].argmax(-1)
    return image


def test_cached_sampling_equals_uncached_greedy_for_every_mask_kind(parts):
    model, dvae, tok = parts
    assert {b.kind for b in model.blocks} == {"row", "column", "conv"}
    captions = ["grinning face", "red heart"]
    res = generate(
        model, dvae, captions, tok, SampleSettings(candidates=2, keep=2, temperature=0, dedup=False), progress=False
    )
    text = torch.tensor([tok.encode(c) for c in captions])
    slow = slow_greedy(model, text)
    for r, want in zip(res, slow, strict=True):
        assert torch.equal(r.tokens[0].flatten(), want) and torch.equal(r.tokens[1].flatten(), want)
    assert res[0].images.shape == (2, 3, 16, 16) and 0 <= res[0].images.min() and res[0].images.max() <= 1


def test_seeds_reproduce_and_differ(parts):
    model, dvae, tok = parts
    run = lambda seed, bs: (
        generate(  # noqa: E731
            model,
            dvae,
            ["dog face"],
            tok,
            SampleSettings(candidates=5, keep=5, seed=seed, batch_size=bs),
            progress=False,
        )[0].tokens
    )
    assert torch.equal(run(3, 5), run(3, 5))
    assert not torch.equal(run(3, 5), run(4, 5))


def test_top_k_and_top_p_keep_only_the_allowed_tokens():
    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    p = allowed_probs(logits, top_k=5)
    assert ((p > 0).sum(-1) == 5).all()
    assert torch.equal((p > 0), logits >= logits.topk(5).values[:, -1:])
    probs = torch.softmax(logits, -1)
    q = allowed_probs(logits, top_p=0.5)
    for row, full in zip(q, probs, strict=True):
        kept = full[row > 0]
        assert kept.sum() >= 0.5 and kept.sum() - kept.min() < 0.5  # the smallest set reaching 0.5
        assert full[row > 0].min() >= full[row == 0].max()  # and it is the top of the distribution
    assert torch.allclose(q.sum(-1), torch.ones(3))
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_logits(logits, 1.0, 5, g, 0.9) for _ in range(300)])
    allowed = allowed_probs(logits, 5, 0.9) > 0
    assert all(allowed[r, draws[:, r]].all() for r in range(3))


def test_guidance_scale_one_equals_conditional_sampling(parts):
    model, _, tok = parts
    text = torch.tensor([tok.encode("red heart")] * 3)
    empty = torch.tensor([tok.encode("")])
    a = model.generate(text, generator=torch.Generator().manual_seed(1))
    b = model.generate(text, generator=torch.Generator().manual_seed(1), uncond=empty, guidance=1.0)
    c = model.generate(text, generator=torch.Generator().manual_seed(1), uncond=empty, guidance=200.0)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_a_negative_caption_mixes_in_as_written_and_weighs_nothing_at_zero(parts):
    model, _, tok = parts
    text = torch.tensor([tok.encode("red heart"), tok.encode("dog face")])
    empty = torch.tensor([tok.encode("")])
    neg = torch.tensor([tok.encode("dog face"), tok.encode("red heart")])
    seeded = lambda **kw: model.generate(  # noqa: E731
        text, temperature=0.7, uncond=empty, guidance=2.0, generator=torch.Generator().manual_seed(3), **kw
    )
    assert torch.equal(seeded(negatives=[(neg, 0.0)]), seeded())
    # greedy with the full forward at every position: c + (g - 1)(c - u) + h (c - s)
    g, h = 2.0, 3.0
    image = torch.zeros(2, model.args.n_image, dtype=torch.long)
    for i in range(model.args.n_image):
        c, u, s = (model(t.expand(2, -1), image)[1][:, i] for t in (text, empty, neg))
        image[:, i] = (c + (g - 1) * (c - u) + h * (c - s)).argmax(-1)
    got = model.generate(text, temperature=0.0, uncond=empty, guidance=g, negatives=[(neg, h)])
    assert torch.equal(got, image)
    assert not torch.equal(got, model.generate(text, temperature=0.0, uncond=empty, guidance=g))


def test_image_priming_keeps_the_top_rows(parts):
    model, dvae, tok = parts
    init = torch.rand(3, 16, 16)
    want = dvae.encode(init[None])[0]
    s = SampleSettings(candidates=3, keep=3, init_rows=2)
    res = generate(model, dvae, ["rocket"], tok, s, init_image=init, progress=False)[0]
    assert all(torch.equal(t[:2], want[:2]) for t in res.tokens)
    with pytest.raises(ValueError, match="init image"):
        generate(model, dvae, ["rocket"], tok, s, progress=False)


def test_rerank_order_equals_brute_force_cosine_order(clip_dir):
    r = Reranker(clip_dir)
    torch.manual_seed(0)
    images = torch.rand(7, 3, 16, 16)
    order, scores = r.rank(images, "grinning face", keep=4)
    # brute force: CLIP's own forward, cosine of the normalised embeddings, one pair at a time
    from transformers import AutoTokenizer, CLIPModel

    model = CLIPModel.from_pretrained(clip_dir, local_files_only=True).eval()
    t = AutoTokenizer.from_pretrained(clip_dir, local_files_only=True)(
        ["grinning face"], padding="max_length", max_length=12, return_tensors="pt"
    )
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    brute = []
    with torch.no_grad():
        for im in images:
            out = model(
                input_ids=t["input_ids"], attention_mask=t["attention_mask"], pixel_values=(im[None] - mean) / std
            )
            brute.append(F.cosine_similarity(out.image_embeds, out.text_embeds).item())
    assert torch.allclose(scores, torch.tensor(brute), atol=1e-5)
    assert order.tolist() == sorted(range(7), key=lambda i: -brute[i])[:4]


def test_ranking_against_reference_captions_is_log_p_of_the_caption_given_the_image(clip_dir, emoji_dir):
    """With reference captions the pick score is log p(caption | image) over the caption and the
    reference (the caption itself counted once), at CLIP's temperature; an image that fits every
    caption (a typical one) loses to one that fits its own caption only, where the cosine ranks them
    the other way round."""
    from dalle_repro.sample.rerank import reference_captions

    r = Reranker(clip_dir)
    images = torch.rand(5, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    assert torch.equal(r.pick_scores(images, "rocket"), r.scores(images, "rocket"))  # no reference: the cosine
    spec = f"{emoji_dir}/train/*.tar"
    ref = reference_captions(spec)
    assert ref == sorted(set(ref)) and len(ref) > 3
    r.use_reference(spec)
    caption = ref[0]  # in the reference: counted once
    im, txt = r.embed_images(images), r.embed_texts([caption, *ref[1:]])
    logits = im @ txt.T * r.logit_scale()
    want = logits[:, 0] - torch.logsumexp(logits, 1)
    assert torch.allclose(r.pick_scores(images, caption), want, atol=1e-5)
    pick, cos = r.pick_and_cosine(images, caption)  # what the evaluation records: the pick and the cosine
    assert torch.allclose(pick, want, atol=1e-5) and torch.allclose(cos, r.scores(images, caption), atol=1e-5)
    assert r.rank(images, caption)[0].tolist() == torch.argsort(want, descending=True).tolist()


def test_the_caption_log_prob_prefers_an_image_of_its_caption_to_one_that_fits_every_caption():
    """A typical image fits its caption at cosine 0.75 and each of 20 other captions at 0.4; a
    specific one fits its caption at 0.6 and the others at 0: the cosine picks the typical one,
    log p(caption | image) the specific one."""
    from dalle_repro.sample.rerank import caption_log_prob

    cos = torch.tensor([0.75, 0.6])
    others = torch.stack([torch.full((20,), 0.4), torch.zeros(20)])
    lp = caption_log_prob(cos, others, scale=15.0)
    assert cos.argmax() == 0 and lp.argmax() == 1
    assert torch.allclose(caption_log_prob(cos, others[:, :0], 15.0), torch.zeros(2))  # no other caption: p = 1


def test_a_reference_with_no_caption_is_a_clear_error(clip_dir, tmp_path):
    from dalle_repro.sample.rerank import reference_captions

    with pytest.raises(RerankError, match="rerank_reference"):
        reference_captions(str(tmp_path / "nothing-*.tar"))


def test_a_clip_training_run_folder_loads_its_model(clip_dir, tmp_path):
    import shutil

    shutil.copytree(clip_dir, tmp_path / "run" / "clip")  # what tools/train_clip.py and the demo write
    images = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    from_run = Reranker(tmp_path / "run").rank(images, "rocket", keep=3)[1]
    assert torch.equal(from_run, Reranker(clip_dir).rank(images, "rocket", keep=3)[1])
    (tmp_path / "empty").mkdir()
    with pytest.raises(RerankError, match="no config.json"):
        Reranker(tmp_path / "empty")


def test_missing_or_broken_clip_is_a_clear_error(tmp_path):
    with pytest.raises(RerankError, match="does not exist"):
        Reranker(tmp_path / "nope")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    with pytest.raises(RerankError, match="cannot load CLIP"):
        Reranker(tmp_path / "broken")
    with pytest.raises(RerankError, match="open_clip"):
        Reranker("open_clip:ViT-B-32:/nowhere.bin")


def test_sample_cli_writes_grids_images_and_json(parts, clip_dir, tokenizer_path, tmp_path):
    from dalle_repro.cli import sample as cli

    model, dvae, tok = parts
    dvae_dir = tmp_path / "dvae"
    dvae.save_pretrained(dvae_dir)
    export = tmp_path / "export"
    cfg = {"model": model.args, "precision": {"dtype": "fp32"}}
    state = model.state_dict()
    write_export(export, cfg, state, state, tokenizer_path, dvae_dir, {"step": 1, "caption_dropout": 0.1})
    out = tmp_path / "out"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("red heart\n\n")
    argv = ["--model", str(export), "--prompt", "dog face", "--prompts-file", str(prompts), "--candidates", "4"]
    argv += ["--keep", "2", "--clip", str(clip_dir), "--top-k", "10", "--guidance", "2", "--output", str(out)]
    assert cli.main(argv) == 0
    folders = sorted(p.name for p in out.iterdir())
    assert folders == ["000-dog-face", "001-red-heart"]
    info = json.loads((out / folders[0] / "result.json").read_text())
    assert info["prompt"] == "dog face" and len(info["scores"]) == 2 and info["scores"][0] >= info["scores"][1]
    assert info["settings"]["top_k"] == 10 and info["seed"] == 0
    assert info["settings"]["dedup"] is True and info["duplicates_dropped"] >= 0
    assert {p.name for p in (out / folders[0]).iterdir()} == {"grid.png", "00.png", "01.png", "result.json"}
    # a broken CLIP folder stops the CLI before any sampling
    assert cli.main([*argv[:-6], "--clip", str(tmp_path / "nope"), "--output", str(tmp_path / "o2")]) == 2
    assert not (tmp_path / "o2").exists()


@pytest.mark.parametrize("dtype", ["auto", "fp32", "bf16", "fp16", None])
def test_the_sampler_picks_the_precision_on_its_own_machine(parts, dtype):
    """An export's precision.dtype: auto is picked on the sampling machine, fp16 becomes bf16 on a CPU,
    and an export without one samples in fp32."""
    from dalle_repro.core.precision import auto_precision
    from dalle_repro.sample.export import Prior

    model, dvae, tok = parts
    fresh = Transformer(model.args).eval()  # enable_precision changes the model: not the shared one
    prior = Prior(fresh, tok, dvae, {}, {"precision": {"dtype": dtype}} if dtype else {})
    pick = prior.use_trained_precision()
    expected = {"auto": auto_precision("cpu").dtype, "fp16": "bf16", None: "fp32"}.get(dtype, dtype)
    assert pick.dtype == expected
    assert (fresh.scaler.args.dtype if fresh.scaler is not None else "fp32") == expected
    assert ("picked" in pick.reason) == (dtype == "auto")


def test_train_clip_picks_and_notes_its_precision(clip_dir):
    from dalle_repro.core.config import load_config
    from dalle_repro.core.precision import auto_precision
    from dalle_repro.train.clip import ClipTrainConfig
    from dalle_repro.train.metrics import read_metrics

    reason = f"precision.dtype=auto picked {auto_precision('cpu').reason}"
    assert json.loads((clip_dir / "retrieval.json").read_text())["precision"] == reason
    saved = clip_dir / "train_clip.yaml"
    assert saved.read_text().startswith(f"# precision: {reason}\n")
    assert load_config(ClipTrainConfig, saved).precision.dtype == "auto"
    rows = [r for r in read_metrics(clip_dir.parent) if "loss" in r]  # progress, as the other trainers log it
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(r["img_per_s"] > 0 for r in rows)


def test_clip_training_refuses_a_folder_of_other_files_before_any_work(tmp_path, monkeypatch):
    """save_clip replaced the whole output folder: a user's other files came back gone."""
    from dalle_repro.core.config import load_config
    from dalle_repro.train import clip as clip_train

    out = tmp_path / "run" / "clip"  # where the model goes: RUN/clip
    out.mkdir(parents=True)
    (out / "notes.md").write_text("the user's")
    monkeypatch.setattr(clip_train, "hf_tokenizer", lambda *a: pytest.fail("training started"))
    with pytest.raises(FileExistsError, match="notes.md"):
        clip_train.train_clip(load_config(clip_train.ClipTrainConfig, None, [f"run.run_dir={out.parent}"]))
    assert [p.name for p in out.iterdir()] == ["notes.md"]


def test_clip_pixels_resizes_with_antialiasing_like_clips_own_pil_bicubic():
    """256 -> 224 on a fine checkerboard: without antialiasing the result aliases far from PIL's."""
    import numpy as np
    from PIL import Image

    from dalle_repro.sample.rerank import clip_pixels

    board = ((np.indices((256, 256)).sum(0) % 2) * 255).astype(np.uint8)
    pil = Image.fromarray(np.stack([board] * 3, -1)).resize((224, 224), Image.Resampling.BICUBIC)
    want = torch.from_numpy(np.asarray(pil, dtype=np.float32) / 255).permute(2, 0, 1)[None]
    x = torch.from_numpy(board.astype(np.float32) / 255).expand(1, 3, 256, 256)
    got = clip_pixels(x, 224, mean=(0.0,) * 3, std=(1.0,) * 3)
    assert (got - want).abs().mean() < 0.02  # without antialiasing: 0.10


def test_a_latin_1_prompts_file_is_read(tmp_path, monkeypatch, capsys):
    """Issue 18 item 16: a Latin-1 --prompts-file ended in a 12-line UnicodeDecodeError traceback."""
    from dalle_repro.cli import sample as cli

    prompts = tmp_path / "p.txt"
    prompts.write_bytes("un chat été\ncafé noir\n".encode("cp1252"))
    seen = {}

    def fake_load(model, weights, device):
        raise FileNotFoundError(f"{model} stops here")

    monkeypatch.setattr(cli, "load_prior", fake_load)
    real = cli.decode_caption
    monkeypatch.setattr(cli, "decode_caption", lambda raw: seen.setdefault("text", real(raw)))
    assert cli.main(["--model", str(tmp_path / "m"), "--prompts-file", str(prompts)]) == 2
    assert seen["text"] == ("un chat été\ncafé noir\n", "latin-1") and "stops here" in capsys.readouterr().err


def test_identical_samples_are_dropped_and_counted(parts):
    """Greedy sampling draws one image again and again; a grid of copies showed less than it seemed."""
    model, dvae, tok = parts
    s = SampleSettings(candidates=3, keep=2, temperature=0)
    (r,) = generate(model, dvae, ["red heart"], tok, s, progress=False)
    assert r.kept == [0] and r.images.shape[0] == 1 and r.duplicates_dropped == 2
    assert r.summary()["duplicates_dropped"] == 2
    (r,) = generate(model, dvae, ["red heart"], tok, dataclasses.replace(s, dedup=False), progress=False)
    assert r.kept == [0, 1] and r.duplicates_dropped == 0 and torch.equal(r.tokens[0], r.tokens[1])


def test_an_empty_prompt_is_sampled_with_a_warning(parts, caplog):
    model, dvae, tok = parts
    s = SampleSettings(candidates=1, keep=1, temperature=0)
    with caplog.at_level(logging.WARNING, logger="dalle_repro.sample.generate"):
        generate(model, dvae, ["red heart", "  "], tok, s, progress=False)
    assert [r.getMessage() for r in caplog.records] == [
        "caption 1 is empty: its images are sampled unconditionally (no text to follow)"
    ]


def test_the_export_copies_only_the_dvae_folders_own_files_without_following_links(parts, tokenizer_path, tmp_path):
    """The export copied the whole dVAE folder following links: a ``README -> ~/.ssh/id_rsa`` there
    ended up, as the key's bytes, in RUN/export/dvae/."""
    from dalle_repro.sample.export import load_prior

    model, dvae, _ = parts
    dvae_dir = tmp_path / "dvae"
    dvae.save_pretrained(dvae_dir)
    secret = tmp_path / "id_rsa"
    secret.write_text("PRIVATE KEY")
    (dvae_dir / "README").symlink_to(secret)
    (dvae_dir / "notes").mkdir()
    (dvae_dir / "notes" / "key").symlink_to(secret)
    (dvae_dir / "extra.safetensors").symlink_to(secret)
    cfg = {"model": model.args, "precision": {"dtype": "fp32"}}
    state = model.state_dict()
    with pytest.raises(ValueError, match="extra.safetensors: not a regular file"):
        write_export(tmp_path / "export", cfg, state, state, tokenizer_path, dvae_dir, {"step": 1})
    (dvae_dir / "extra.safetensors").unlink()
    export = write_export(tmp_path / "export", cfg, state, state, tokenizer_path, dvae_dir, {"step": 1})
    copied = sorted(p.relative_to(export / "dvae").as_posix() for p in (export / "dvae").rglob("*"))
    assert copied == ["config.yaml", "model.safetensors"]
    assert not any(p.is_symlink() for p in (export / "dvae").iterdir())
    assert load_prior(export).dvae is not None


def test_a_region_edit_redraws_the_box_keeps_the_rest_and_scores_the_fit(parts):
    from dalle_repro.sample.generate import Box

    model, dvae, tok = parts
    init = torch.rand(3, 16, 16)
    want = dvae.encode(init[None])[0].flatten()  # a 4x4 grid of 4-pixel cells
    box = Box(4, 4, 12, 8)  # columns 1-2 of row 1
    inside = box.mask(16, 4)
    assert inside.nonzero().flatten().tolist() == [5, 6]
    s = SampleSettings(candidates=6, keep=3, dedup=False, fit_share=0.5)
    res = generate(model, dvae, ["rocket"], tok, s, init_image=init, box=box, progress=False)[0]
    for t in res.tokens:
        assert torch.equal(t.flatten()[~inside], want[~inside])  # every token outside the box kept
    assert res.fit is not None and len(res.fit) == 3 and all(f <= 0 for f in res.fit)
    # the fit is the kept tokens' mean log-likelihood after the box, from the model's own forward
    text = torch.tensor([tok.encode("rocket")])
    with torch.no_grad():
        _, logits = model(text, res.tokens[0].flatten()[None])
    logp = torch.log_softmax(logits[0].float(), -1)
    after = [i for i in range(7, 16)]
    expect = float(sum(logp[i, res.tokens[0].flatten()[i]] for i in after) / len(after))
    assert res.fit[0] == pytest.approx(expect, abs=1e-4)
    # the kept ones are the best-fitting half (no CLIP: ranked by fit alone)
    every = model.edit(text.expand(6, -1), want[None].expand(6, -1), inside, generator=torch.Generator().manual_seed(0))
    assert every[0].shape == (6, 16)
    for bad, msg in ((Box(0, 0, 17, 8), "not inside the 16x16"), (Box(0, 0, 3, 8), "smaller than one token")):
        with pytest.raises(ValueError, match=msg):
            generate(model, dvae, ["rocket"], tok, s, init_image=init, box=bad, progress=False)
    with pytest.raises(ValueError, match="dVAE takes 16x16"):
        generate(model, dvae, ["rocket"], tok, s, init_image=torch.rand(3, 32, 32), box=box, progress=False)
    with pytest.raises(ValueError, match="two edits"):
        generate(model, dvae, ["rocket"], tok, dataclasses.replace(s, init_rows=1), init_image=init, box=box)


def test_generate_through_the_edit_loop_draws_what_it_drew_before(parts):
    """generate() now runs the loop that edits share: priming keeps the same random stream."""
    model, _, tok = parts
    text = torch.tensor([tok.encode("red heart")] * 2)
    prime = torch.tensor([[3, 1, 4, 1, 5]] * 2)
    g = model.generate(text, prime=prime, generator=torch.Generator().manual_seed(3), temperature=0.9)
    keep = torch.zeros(16, dtype=torch.bool)
    keep[:5] = True
    full = torch.nn.functional.pad(prime, (0, 11))
    e, fit = model.edit(text, full, ~keep, generator=torch.Generator().manual_seed(3), temperature=0.9)
    assert torch.equal(g, e) and torch.isnan(fit).all()  # nothing kept after the drawn part


def test_sample_cli_edits_write_the_input_beside_the_results_and_refuse_bad_boxes(
    parts, clip_dir, tokenizer_path, tmp_path, capsys
):
    from PIL import Image

    from dalle_repro.cli import sample as cli

    model, dvae, tok = parts
    dvae.save_pretrained(tmp_path / "dvae")
    export = tmp_path / "export"
    state = model.state_dict()
    cfg = {"model": model.args, "precision": {"dtype": "fp32"}}
    write_export(export, cfg, state, state, tokenizer_path, tmp_path / "dvae", {"step": 1, "caption_dropout": 0.1})
    img = tmp_path / "in.png"
    Image.fromarray((torch.rand(32, 32, 3) * 255).byte().numpy()).save(img)  # twice the dVAE's size
    base = ["--model", str(export), "--prompt", "rocket", "--candidates", "4", "--keep", "2", "--clip", str(clip_dir)]
    out = tmp_path / "box"
    assert cli.main([*base, "--init-image", str(img), "--edit-box", "8,8,24,16", "--output", str(out)]) == 0
    assert "resized to the dVAE's 16x16" in capsys.readouterr().err
    folder = out / "000-rocket"
    info = json.loads((folder / "result.json").read_text())
    assert info["edit_box"] == "8,8,24,16" and len(info["fit"]) == 2 and len(info["scores"]) == 2
    sheet = Image.open(folder / "edit.png")
    assert sheet.width > 3 * 128  # the input and two results side by side
    out = tmp_path / "rows"
    assert cli.main([*base, "--init-image", str(img), "--init-rows", "2", "--output", str(out)]) == 0
    assert (out / "000-rocket" / "edit.png").is_file()
    for argv, msg in (
        (["--init-image", str(img), "--edit-box", "0,0,40,8"], "not inside the 32x32"),  # the image's own pixels
        (["--init-image", str(img), "--edit-box", "0,0,4,30"], "smaller than one token"),
    ):
        assert cli.main([*base, *argv, "--output", str(tmp_path / "bad")]) == 2
        assert msg in capsys.readouterr().err
    for argv, msg in (
        (["--edit-box", "0,0,8,8"], "edit_box: needs init_image"),
        (["--init-image", str(img), "--edit-box", "1,2,3"], "four integers"),
    ):  # config errors: refused while the command line is read
        with pytest.raises(SystemExit) as e:
            cli.main([*base, *argv, "--output", str(tmp_path / "bad")])
        assert e.value.code == 2 and msg in capsys.readouterr().err
    wide = tmp_path / "wide.png"
    Image.fromarray((torch.rand(16, 32, 3) * 255).byte().numpy()).save(wide)
    assert cli.main([*base, "--init-image", str(wide), "--edit-box", "0,0,8,8", "--output", str(tmp_path / "w")]) == 2
    assert "needs a square --init-image" in capsys.readouterr().err


def test_groups_in_one_batched_call_draw_what_each_draws_alone(parts):
    from dalle_repro.models.transformer import SampleGroup

    model, _, tok = parts
    empty = torch.tensor([tok.encode("")])
    rows = [
        ("red heart", 3, 0.8, None, None, 1.0, 5),
        ("rocket", 2, 1.0, 5, None, 3.0, 9),
        ("dog", 2, 0.5, None, 0.9, 1.0, 1),
    ]
    alone = []
    for cap, n, t, k, p, g, seed in rows:
        text = torch.tensor([tok.encode(cap)] * n)
        gen = torch.Generator().manual_seed(seed)
        alone.append(model.generate(text, t, k, generator=gen, top_p=p, uncond=empty, guidance=g))
    text = torch.tensor([tok.encode(cap) for cap, n, *_ in rows for _ in range(n)])
    groups = [SampleGroup(n, t, k, p, g, torch.Generator().manual_seed(s)) for _, n, t, k, p, g, s in rows]
    together = model.generate_groups(text, groups, uncond=empty)
    assert torch.equal(together, torch.cat(alone))
    with pytest.raises(ValueError, match="needs uncond"):
        model.generate_groups(text, groups)
    with pytest.raises(ValueError, match="the groups hold 7 rows, the text 2"):
        model.generate_groups(text[:2], groups, uncond=empty)
