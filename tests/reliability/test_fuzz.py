"""Fuzzing the readers a user's data goes through, beyond the per-function fuzz tests
(``tests/test_data.py``: image bytes and captions; ``tests/test_tokenizer.py``: any text).

- Whole shards with bytes flipped, cut or inserted anywhere: the loader skips and counts what it
  cannot read and never raises.
- ``KEY.tokens`` members of any bytes: only ``SampleError`` (counted as ``corrupt_tokens``).
- Raw caption bytes through cleaning and the BPE tokenizer, as the loader does it: always
  ``text_len`` ids inside the vocabulary.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
from helpers import png_bytes
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dalle_repro.data.loader import DataArgs, Loader
from dalle_repro.data.samples import SampleError, clean_caption, decode_tokens
from dalle_repro.data.tokenizer import TextTokenizer


def shard_bytes(n: int = 4) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        for i in range(n):
            for ext, data in (("png", png_bytes((10, 8), seed=i)), ("txt", f"caption {i}".encode())):
                info = tarfile.TarInfo(f"s{i:02d}.{ext}")
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


SHARD = shard_bytes()
EDITS = st.lists(
    st.tuples(
        st.sampled_from(["flip", "cut", "insert"]), st.integers(0, len(SHARD) - 1), st.binary(min_size=1, max_size=8)
    ),
    min_size=1,
    max_size=6,
)


def damage(data: bytes, edits: list[tuple[str, int, bytes]]) -> bytes:
    b = bytearray(data)
    for op, at, junk in edits:
        at = min(at, max(0, len(b) - 1))
        if op == "flip":
            b[at : at + len(junk)] = bytes(x ^ y for x, y in zip(b[at : at + len(junk)], junk, strict=False))
        elif op == "cut":
            del b[at:]
        else:
            b[at:at] = junk
    return bytes(b)


SLOW_OK = [HealthCheck.too_slow, HealthCheck.function_scoped_fixture]


@settings(max_examples=60, deadline=None, suppress_health_check=SLOW_OK)
@given(edits=EDITS)
def test_damaged_shards_never_raise_out_of_the_loader(tmp_path_factory, edits):
    root = tmp_path_factory.mktemp("fuzz")
    good = root / "00000.tar"
    good.write_bytes(SHARD)
    bad = root / "00001.tar"
    bad.write_bytes(damage(SHARD, edits))
    loader = Loader([str(good), str(bad)], DataArgs(image_size=8, batch_size=3, shuffle=False, num_workers=0), epochs=1)
    keys = [k for batch in loader for k in batch["key"]]
    assert len(keys) >= 4  # the intact shard always comes through whole
    assert keys.count("s00") <= 2 and len(keys) <= 8
    skipped = sum(loader.errors.values())
    assert len(keys) == 8 or skipped > 0  # whatever did not come through was counted


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.binary(max_size=300), st.binary(max_size=100).map(lambda b: b"\x93NUMPY\x01\x00" + b)))
def test_token_members_of_any_bytes_raise_only_sample_error(data):
    try:
        grid = decode_tokens(data)
    except SampleError as e:
        assert e.reason == "corrupt_tokens"
    else:
        assert grid.ndim == 2


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=600), st.floats(0, 0.5), st.integers(0, 2**32 - 1))
def test_raw_caption_bytes_always_tokenize(tokenizer_path: Path, raw, dropout, seed):
    tok = TextTokenizer(tokenizer_path, 12)
    ids = tok.encode(clean_caption(raw, 4096), dropout, np.random.default_rng(seed))
    assert len(ids) == 12 and all(0 <= i < tok.vocab_size for i in ids)
