"""evaluation/evaluate.py: the Fréchet distance against scipy, FID's Inception end to end with random weights,
the blur, best-of-N, attribute accuracy and the dVAE's reconstruction metrics."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dalle_repro.data.shapes import random_scene, render
from dalle_repro.evaluation.evaluate import (
    attribute_accuracy,
    best_of_n,
    blur,
    clip_score,
    dvae_reconstructions,
    features,
    fid_by_blur,
    frechet_distance,
    powers_of_two,
)
from dalle_repro.evaluation.inception import FIDInception


def scipy_frechet(a: np.ndarray, b: np.ndarray) -> float:
    from scipy import linalg

    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def test_the_frechet_distance_equals_a_scipy_sqrtm_reference():
    pytest.importorskip("scipy")
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 16))
    b = rng.normal(0.3, 1.5, size=(300, 16)) @ rng.normal(size=(16, 16)) * 0.5
    ours = frechet_distance(torch.from_numpy(a), torch.from_numpy(b))
    assert ours == pytest.approx(scipy_frechet(a, b), rel=1e-6)
    assert frechet_distance(torch.from_numpy(a), torch.from_numpy(a)) == pytest.approx(0, abs=1e-6)
    with pytest.raises(ValueError, match="same D"):
        frechet_distance(torch.zeros(4, 3), torch.zeros(4, 2))


def test_fid_inception_runs_the_whole_path_with_random_weights(tmp_path):
    torch.manual_seed(0)
    net = FIDInception()
    path = tmp_path / "weights.pth"
    torch.save(net.state_dict(), path)
    loaded = FIDInception.from_file(path)  # strict: every tensor has its place
    rng = np.random.default_rng(1)  # 299 x 299 inputs cost ~6 GFLOP an image: few images
    shapes = torch.stack([torch.tensor(np.asarray(render(random_scene(rng, False), 32, seed=i))) for i in range(2)])
    shapes = shapes.permute(0, 3, 1, 2)
    noise = torch.randint(0, 256, shapes.shape, dtype=torch.uint8)
    f = features(shapes, loaded, batch_size=1)
    assert f.shape == (2, 2048) and f.dtype == torch.float64
    assert torch.equal(f, features(shapes, net, batch_size=2))  # batching and reloading change nothing
    assert frechet_distance(f, f) == pytest.approx(0, abs=1e-6)
    fids = fid_by_blur(shapes, noise, loaded, radii=(2,))
    assert set(fids) == {"2"} and fids["2"] > 0
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not FID's Inception"):
        FIDInception.from_file(tmp_path / "other.pth")
    with pytest.raises(FileNotFoundError, match="nothing here downloads"):
        FIDInception.from_file(tmp_path / "missing.pth")


def test_blur_keeps_flat_images_and_the_mean_and_smooths_an_edge():
    flat = torch.full((2, 3, 16, 16), 0.4)
    assert torch.allclose(blur(flat, 2), flat, atol=1e-6)
    x = torch.rand(2, 3, 16, 16)
    assert torch.equal(blur(x, 0), x)
    edge = torch.zeros(1, 1, 16, 16)
    edge[..., 8:] = 1
    row = blur(edge, 1.5)[0, 0, 8]
    assert 0 < row[7] < 0.5 < row[8] < 1 and bool((row[1:] >= row[:-1] - 1e-6).all())
    assert blur(torch.rand(1, 3, 8, 8), 8).shape == (1, 3, 8, 8)  # the kernel is cut to the image


def test_best_of_n_picks_the_top_score_among_the_first_n():
    scores = torch.tensor([[0.1, 0.5, 0.2, 0.9], [0.7, 0.1, 0.3, 0.2]])
    picks = best_of_n(scores, powers_of_two(4))
    assert powers_of_two(4) == [1, 2, 4] and powers_of_two(6) == [1, 2, 4, 6]
    assert picks[1].tolist() == [0, 0] and picks[2].tolist() == [1, 0] and picks[4].tolist() == [3, 0]
    with pytest.raises(ValueError, match="only 4 candidates"):
        best_of_n(scores, [8])


def test_attribute_accuracy_reads_renders_and_catches_wrong_captions():
    rng = np.random.default_rng(2)
    scenes = [random_scene(rng, bool(i % 2)) for i in range(40)]
    images = torch.stack([torch.tensor(np.asarray(render(s, 32, seed=i))) for i, s in enumerate(scenes)])
    images = images.permute(0, 3, 1, 2)
    right = attribute_accuracy(images, [s.caption() for s in scenes])
    assert right["all"] == 1.0 and right["n"] == 40
    wrong = attribute_accuracy(images, [s.caption() for s in scenes[1:] + scenes[:1]])  # each image, another caption
    assert wrong["all"] < 0.2
    assert attribute_accuracy(images.float() / 255, [s.caption() for s in scenes])["all"] == 1.0


def test_dvae_reconstruction_metrics(tmp_path):
    from dalle_repro.models.dvae import DVAE, DVAEArgs

    torch.manual_seed(0)
    dvae = DVAE(DVAEArgs(image_size=16, n_hid=8, n_blk_per_group=1, group_count=3, vocab_size=32, n_init=8)).eval()
    batches = [torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8) for _ in range(2)]
    out = dvae_reconstructions(dvae, batches)
    assert out["reconstructions"].shape == (8, 3, 16, 16) and out["reconstructions"].dtype == torch.uint8
    assert torch.equal(out["originals"], torch.cat(batches))
    assert 0 < out["psnr"] < 40 and 0 < out["bits_per_dim"] < 16
    with pytest.raises(ValueError, match="no image"):
        dvae_reconstructions(dvae, [])


def test_clip_score_is_the_mean_cosine(clip_dir):
    from dalle_repro.sample.rerank import Reranker

    r = Reranker(clip_dir)
    images = torch.rand(5, 3, 16, 16)
    captions = ["a", "b", "c", "d", "e"]
    expected = torch.cat([r.scores(images[i : i + 1], [captions[i]]) for i in range(5)]).mean()
    assert clip_score(images, captions, r, batch_size=2) == pytest.approx(float(expected), abs=1e-5)
    with pytest.raises(ValueError, match="5 images for 4 captions"):
        clip_score(images, captions[:4], r)


def test_evaluate_reads_the_folder_launch_sample_writes(tmp_path):
    """--images wanted flat KEY.png + KEY.txt files, so sample.py's NNN-caption/ folders had to be
    flattened with a shell loop; it now reads them as written (grid.png left out)."""
    import json

    from dalle_repro.cli.evaluate import main
    from dalle_repro.cli.sample import write_prompt
    from dalle_repro.data.shapes import build_shapes_dataset
    from dalle_repro.sample.generate import PromptResult

    build_shapes_dataset(tmp_path / "ref", n_train=12, n_heldout=2, image_size=32, shard_size=6)
    rng = np.random.default_rng(0)
    scenes = [random_scene(rng, held_out=False) for _ in range(2)]
    for i, scene in enumerate(scenes):
        ims = torch.stack([torch.tensor(np.asarray(render(scene, 32, seed=j))).permute(2, 0, 1) for j in range(3)])
        r = PromptResult(scene.caption(), ims.float() / 255, torch.zeros(3, 4, 4), None, None, [0, 1, 2])
        write_prompt(tmp_path / "samples" / f"{i:03d}-x", r, {"seed": 0})
    argv = ["--images", str(tmp_path / "samples"), "--reference", str(tmp_path / "ref" / "train" / "*.tar")]
    assert main([*argv, "--attributes", "--output", str(tmp_path / "ev")]) == 0
    result = json.loads((tmp_path / "ev" / "evaluation.json").read_text())
    assert result["generated_images"] == 6  # 3 a prompt, not the grids
    assert result["attributes"]["all"] == 1.0  # each image read back as its prompt folder's caption
    # one prompt folder on its own reads too
    assert main(["--images", str(tmp_path / "samples" / "001-x"), *argv[2:], "--output", str(tmp_path / "e2")]) == 0
    assert json.loads((tmp_path / "e2" / "evaluation.json").read_text())["generated_images"] == 3


def test_the_evaluate_tool_names_a_broken_image_and_mixed_reference_sizes(tmp_path, capsys):
    """A zero-byte PNG gave a traceback without the file's name; reference images of mixed sizes a
    ``stack`` RuntimeError."""
    import io
    import tarfile

    from helpers import png_bytes

    from dalle_repro.cli.evaluate import main

    def shard(path, sizes):
        with tarfile.open(path, "w") as t:
            for i, size in enumerate(sizes):
                for ext, data in (("png", png_bytes(size, seed=i)), ("txt", b"a red circle")):
                    info = tarfile.TarInfo(f"{i:03d}.{ext}")
                    info.size = len(data)
                    t.addfile(info, io.BytesIO(data))
        return str(path)

    same, mixed = shard(tmp_path / "same.tar", [(16, 16)] * 2), shard(tmp_path / "mixed.tar", [(16, 16), (24, 20)])
    gen = tmp_path / "gen"
    gen.mkdir()
    (gen / "000.png").write_bytes(b"")
    (gen / "000.txt").write_text("a red circle")
    out = str(tmp_path / "out")
    assert main(["--images", str(gen), "--reference", mixed, "--output", out]) == 2
    assert "images of several sizes" in capsys.readouterr().err
    assert main(["--images", str(gen), "--reference", same, "--output", out]) == 2
    assert f"{gen / '000.png'}: not a readable image" in capsys.readouterr().err
