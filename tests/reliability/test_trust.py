"""Inputs from someone else: shard paths that are not files, and other data that crosses a trust
boundary. Each case is recorded in the ledger; a reader must count the bad input and go on, never
hang, run a command or read outside what it was given."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from helpers import ROOT


def write_shard(path: Path, samples: dict[str, dict[str, bytes]]) -> Path:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as t:
        for key, members in samples.items():
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
    return path


def run_bounded(code: str, timeout: float = 120) -> dict:
    """Run ``code`` (which prints one JSON line last) in a child, so that a hang fails the test
    instead of the suite."""
    try:
        r = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=ROOT,
            env=os.environ | {"PYTHONPATH": str(ROOT)},
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running after {timeout} s (a reader hung)")
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_shard_paths_that_are_no_regular_file_are_counted_not_waited_on(tmp_path, ledger):
    """A FIFO blocked open() forever; 00001.tar linked to /dev/zero or /dev/urandom made the tar walk
    (ignore_zeros) loop forever. Each is counted unreadable_shard and the good shard is read."""
    good = write_shard(tmp_path / "00000.tar", {"a": {"txt": b"a cat", "png": b"x"}, "b": {"txt": b"a dog"}})
    os.mkfifo(tmp_path / "00001.tar")
    (tmp_path / "00002.tar").symlink_to("/dev/zero")
    (tmp_path / "00003.tar").symlink_to("/dev/urandom")
    bad = 3
    ledger.injected("shard_not_a_regular_file", bad)
    code = f"""
import json
from collections import Counter
from dalle_repro.data.tar import Shard, iter_shard_samples
errors = Counter()
paths = [{str(good)!r}] + [{str(tmp_path)!r} + f"/0000{{i}}.tar" for i in (1, 2, 3)]
keys = [k for k, _ in iter_shard_samples(paths, errors)]
refused = 0
for p in paths[1:]:
    try:
        Shard(p)
    except OSError as e:
        refused += "not a regular file" in str(e)
print(json.dumps({{"keys": keys, "errors": dict(errors), "refused": refused}}))
"""
    out = run_bounded(code)
    assert out["keys"] == ["a", "b"]
    assert out["errors"] == {"unreadable_shard": bad} and out["refused"] == bad
    ledger.survived("shard_not_a_regular_file", bad)


def test_tokenizer_training_and_pre_encoding_cut_a_huge_caption_and_count_it(tmp_path, ledger):
    """BPE training is quadratic in a space-free caption (400k characters took 33 s) and
    encode_tokens kept a 10 MB caption whole: both cut at the loader's limit, counted."""
    from collections import Counter

    from helpers import png_bytes

    from dalle_repro.data.loader import DataArgs
    from dalle_repro.data.pre_encode import _samples
    from dalle_repro.data.tokenizer import train_from_shards

    huge = b"abcdefghij" * 40_000  # 400k characters, no space
    shard = write_shard(
        tmp_path / "00000.tar",
        {"a": {"txt": b"a red cat", "png": png_bytes()}, "b": {"txt": huge, "png": png_bytes(seed=1)}},
    )
    ledger.injected("huge_caption", 2)
    _, stats = train_from_shards([str(shard)], vocab_size=300, progress=False)
    assert stats["captions_read"] == 2 and stats["skipped"] == {"caption_truncated": 1}
    ledger.survived("huge_caption")
    errors: Counter = Counter()
    captions = {key: caption for key, caption, _, _ in _samples(str(shard), 16, errors, 10**6)}
    assert len(captions["b"]) == DataArgs().max_caption_chars and captions["a"] == "a red cat"
    assert errors == {"caption_truncated": 1}
    ledger.survived("huge_caption")


def test_every_fsspec_failure_and_an_endless_source_count_as_an_unreadable_shard(tmp_path, ledger):
    """A ``zip://`` entry that is no zip raised BadZipFile and ended the loader; ``file:///dev/zero``
    spooled into $TMPDIR without end. Run with a file-size limit, so that a spool without a cap
    ends the child instead of filling the disk."""
    good = write_shard(tmp_path / "00000.tar", {"a": {"txt": b"a cat"}, "b": {"txt": b"a dog"}})
    (tmp_path / "notazip.zip").write_bytes(b"not a zip at all" * 10)
    bad = [f"zip://00000.tar::file://{tmp_path}/notazip.zip", "file:///dev/zero", "pipe:cat /dev/zero"]
    ledger.injected("remote_shard_failure", len(bad))
    code = f"""
import json, resource
from collections import Counter
resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 20, 64 << 20))
from dalle_repro.data import sources
from dalle_repro.data.tar import iter_shard_samples
sources.MAX_SPOOL_BYTES = 8 << 20
errors = Counter()
keys = [k for k, _ in iter_shard_samples([{str(good)!r}, *{bad!r}], errors)]
print(json.dumps({{"keys": keys, "errors": dict(errors)}}))
"""
    out = run_bounded(code)
    assert out == {"keys": ["a", "b"], "errors": {"unreadable_shard": len(bad)}}
    ledger.survived("remote_shard_failure", len(bad))


def test_renamed_unsafe_keys_never_take_the_key_of_another_sample(tmp_path, ledger):
    """pre_encode renamed ``../x`` to ``x`` beside an existing ``x``: two samples under one key."""
    from collections import Counter

    from helpers import png_bytes

    from dalle_repro.data.pre_encode import _samples

    samples = {k: {"txt": k.encode(), "png": png_bytes(seed=i)} for i, k in enumerate(["../x", "/x", "x", "x_2"])}
    shard = write_shard(tmp_path / "00000.tar", samples)
    ledger.injected("unsafe_key_collision", 2)
    errors: Counter = Counter()
    got = {key: caption for key, caption, _, _ in _samples(str(shard), 16, errors, 10**6)}
    assert len(got) == 4 and got["x"] == "x" and got["x_2"] == "x_2"
    assert sorted(got[k] for k in got if k not in ("x", "x_2")) == ["../x", "/x"]
    assert errors == {"unsafe_key_renamed": 2}
    ledger.survived("unsafe_key_collision", 2)


def test_a_token_summary_cannot_size_the_prior_beyond_bounds_or_against_its_shards(tmp_path, ledger):
    """A data set's summary.json sized the prior with no bound (grid 100000, image vocab 2e9),
    before its grid was checked against the tokens."""
    import numpy as np

    from dalle_repro.core.config import ConfigError, load_config
    from dalle_repro.data.tokenizer import save_tokenizer, train_bpe
    from dalle_repro.train.prior_config import PriorTrainConfig, resolve_sizes

    tok = tmp_path / "tok.json"
    save_tokenizer(train_bpe(["a red cat", "a blue dog"] * 4, 300), tok)
    grid = io.BytesIO()
    np.save(grid, np.zeros((4, 4), np.uint16), allow_pickle=False)
    (tmp_path / "tokens").mkdir()
    write_shard(tmp_path / "tokens" / "00000.tar", {"a": {"tokens": grid.getvalue(), "txt": b"a red cat"}})
    summary = tmp_path / "tokens" / "summary.json"
    cfg = load_config(
        PriorTrainConfig, None, [f"text.path={tok}", f"data.shards={tmp_path}/tokens/*.tar", "data.kind=tokens"]
    )
    bad = [({"grid": 100000, "vocab_size": 64}, "model.grid"), ({"grid": 4, "vocab_size": 2 * 10**9}, "image_vocab")]
    bad += [({"grid": "4", "vocab_size": 64}, "model.grid"), ({"grid": 8, "vocab_size": 64}, "hold \\(4, 4\\) grids")]
    ledger.injected("token_summary_out_of_bounds", len(bad))
    for values, match in bad:
        summary.write_text(json.dumps(values))
        with pytest.raises(ConfigError, match=match):
            resolve_sizes(cfg)
        ledger.survived("token_summary_out_of_bounds")
    summary.write_text(json.dumps({"grid": 4, "vocab_size": 64}))
    m = resolve_sizes(cfg)[0].model
    assert (m.grid, m.image_vocab) == (4, 64)


def test_a_prior_folders_depth_is_checked_against_the_files_tensor_count_before_probing(tmp_path, ledger):
    """Loading probed every block of the config's depth on the meta device first, unbounded (a
    config.yaml saying 1000 blocks: seconds per load); the header's tensor count is compared first."""
    import yaml

    from dalle_repro.core.pretrained import build_pretrained, save_pretrained
    from dalle_repro.models.transformer import Transformer, TransformerArgs

    args = TransformerArgs(dim=32, depth=3, heads=4, text_len=8, text_vocab=300, grid=4, image_vocab=32)
    save_pretrained(tmp_path / "prior", args, {"model": Transformer(args).state_dict()})
    built = []

    def probe(a):
        built.append(a.depth)
        return Transformer(a)

    assert build_pretrained(tmp_path / "prior", TransformerArgs, probe).args.depth == 3
    config = yaml.safe_load((tmp_path / "prior" / "config.yaml").read_text())
    config["model"]["depth"] = 1000
    (tmp_path / "prior" / "config.yaml").write_text(yaml.safe_dump(config))
    ledger.injected("model_depth_beyond_its_file")
    built.clear()
    with pytest.raises(ValueError, match="depth 1000 means .* tensors, the file holds"):
        build_pretrained(tmp_path / "prior", TransformerArgs, probe)
    assert max(built) <= 2
    ledger.survived("model_depth_beyond_its_file")


def test_encode_tokens_skips_and_counts_a_missing_shard_as_it_says(tmp_path, ledger, capsys):
    """A missing shard in the list was announced as "will be skipped", then the tool exited 2."""
    from helpers import png_bytes

    from dalle_repro.cli.encode_tokens import main
    from dalle_repro.models.dvae import DVAE, DVAEArgs

    DVAE(DVAEArgs(image_size=16, n_hid=8, vocab_size=32)).save_pretrained(tmp_path / "dvae")
    (tmp_path / "shards").mkdir()
    good = write_shard(tmp_path / "shards" / "00000.tar", {"a": {"png": png_bytes((16, 16)), "txt": b"a cat"}})
    ledger.injected("missing_shard")
    argv = ["--dvae", str(tmp_path / "dvae"), "--shards", f"{good},{tmp_path / 'shards' / '00001.tar'}"]
    assert main([*argv, "--output", str(tmp_path / "tokens"), "--device", "cpu"]) == 0
    summary = json.loads((tmp_path / "tokens" / "summary.json").read_text())
    assert summary["written"] == 1 and summary["skipped"] == {"missing_shard": 1}
    ledger.survived("missing_shard")


def test_a_caption_of_bytes_that_are_no_text_is_skipped_with_its_own_count(tmp_path, ledger):
    """Binary garbage as a caption (an image's bytes in KEY.txt) was read as Latin-1 and trained on;
    a real Latin-1 or cp1251 caption is still read."""
    import random
    from collections import Counter

    from helpers import png_bytes

    from dalle_repro.data.make_shards import list_folder
    from dalle_repro.data.pre_encode import _samples
    from dalle_repro.data.tokenizer import train_from_shards

    garbage = [random.Random(i).randbytes(300) for i in range(3)] + [png_bytes()]
    garbage = [g for g in garbage if not g.startswith((b"\xff\xfe", b"\xfe\xff", b"\xef\xbb\xbf"))]
    texts = {"latin": "un café très élégant".encode("cp1252"), "cyrillic": "красный круг".encode("cp1251")}
    samples = {f"g{i}": {"txt": g, "png": png_bytes(seed=i)} for i, g in enumerate(garbage)}
    samples |= {k: {"txt": v, "png": png_bytes(seed=9)} for k, v in texts.items()}
    shard = write_shard(tmp_path / "00000.tar", samples)
    ledger.injected("binary_caption", len(garbage))
    _, stats = train_from_shards([str(shard)], vocab_size=300, progress=False)
    assert stats["captions_read"] == 2 and stats["skipped"] == {"binary_caption": len(garbage)}
    errors: Counter = Counter()
    assert sorted(k for k, *_ in _samples(str(shard), 16, errors, 10**6)) == ["cyrillic", "latin"]
    assert errors == {"binary_caption": len(garbage)}
    src = tmp_path / "src"
    src.mkdir()
    for key, members in samples.items():
        (src / f"{key}.png").write_bytes(members["png"])
        (src / f"{key}.txt").write_bytes(members["txt"])
    records, skipped = list_folder(src)
    assert sorted(r.key for r in records) == ["cyrillic", "latin"] and skipped == {"binary_caption": len(garbage)}
    ledger.survived("binary_caption", len(garbage))


def test_the_samples_a_truncated_tar_loses_are_counted(tmp_path, ledger):
    """A cut shard's readable samples were delivered and the truncated_shard counted, but the
    samples dropped at the cut were counted nowhere."""
    from collections import Counter

    from dalle_repro.data.tar import iter_shard_samples

    samples = {f"{i:03d}": {"txt": f"caption {i}".encode(), "png": bytes(3000)} for i in range(10)}
    whole = write_shard(tmp_path / "whole.tar", samples)
    data = whole.read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: int(len(data) * 0.6)])
    with tarfile.open(whole) as t:  # samples with a header in what is left
        headed = {m.name.split(".")[0] for m in t.getmembers() if m.offset + 512 <= int(len(data) * 0.6)}
    errors: Counter = Counter()
    got = {k for k, _ in iter_shard_samples([str(cut)], errors)}
    lost = headed - got
    ledger.injected("truncated_tar_samples", len(lost))
    assert lost and errors["truncated_shard"] == 1 and errors["truncated_sample"] == len(lost)
    ledger.survived("truncated_tar_samples", len(lost))
    ledger.lost("truncated_tar_samples", len(lost))
