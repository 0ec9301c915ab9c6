"""Sharding: each input kind, every bad-input class, atomic writes and resuming a killed run."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from helpers import bomb_png, make_folder, odd_mode_image, png_bytes
from PIL import Image

from dalle_repro.data.make_shards import make_shards, process_file
from dalle_repro.data.samples import decode_image
from dalle_repro.data.sources import expand_shards
from dalle_repro.data.tar import iter_shard_samples
from dalle_repro.data.writer import Record, Sample, ShardWriter, sanitize_key, split_of, write_dataset

ROOT = Path(__file__).resolve().parents[1]


def keys_in(out: Path) -> list[str]:
    return [k for k, _ in iter_shard_samples(sorted(str(p) for p in out.rglob("*.tar")))]


def test_folder_input_layout_and_summary(tmp_path):
    src = make_folder(tmp_path / "src", 10)
    s = make_shards(src, tmp_path / "out", shard_size=4)
    assert s["written"] == 10 and s["skipped"] == {}
    assert [x["count"] for x in s["shards"]] == [4, 4, 2]
    assert sorted(p.name for p in (tmp_path / "out").glob("*.tar")) == ["00000.tar", "00001.tar", "00002.tar"]
    with tarfile.open(tmp_path / "out" / "00000.tar") as t:
        names = t.getnames()
    assert names[:3] == ["img_000.png", "img_000.txt", "img_000.json"]
    samples = dict(iter_shard_samples([str(tmp_path / "out" / "00000.tar")]))
    assert samples["img_001"]["txt"] == b"a picture number 1"
    meta = json.loads(samples["img_001"]["json"])
    assert meta["key"] == "img_001" and meta["width"] == 24 and meta["height"] == 20
    # no resize asked and the input is an RGB PNG: the bytes are kept as they were
    assert samples["img_001"]["png"] == (src / "img_001.png").read_bytes()
    on_disk = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert on_disk["written"] == 10 and len(on_disk["shards"]) == 3


@pytest.mark.parametrize("kind", ["csv", "tsv", "parquet"])
def test_table_inputs(tmp_path, kind):
    src = make_folder(tmp_path / "imgs", 6)
    rows = [{"file": f"imgs/img_{i:03d}.png", "text": f"caption {i}", "id": f"k{i}"} for i in range(6)]
    table = tmp_path / f"t.{kind}"
    if kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), table)
    else:
        with open(table, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["file", "text", "id"], delimiter="\t" if kind == "tsv" else ",")
            w.writeheader()
            w.writerows(rows)
    s = make_shards(table, tmp_path / "out", image_col="file", caption_col="text", key_col="id", image_size=8)
    assert s["written"] == 6
    got = dict(iter_shard_samples(expand_shards(str(tmp_path / "out" / "*.tar"))))
    assert sorted(got) == [f"k{i}" for i in range(6)]
    assert got["k3"]["txt"] == b"caption 3"
    im, _ = decode_image(got["k3"]["jpg"])
    assert im.size == (8, 8)
    assert src.exists()


def test_table_with_wrong_column_names_the_column(tmp_path):
    table = tmp_path / "t.csv"
    table.write_text("path,caption\nx.png,hi\n")
    with pytest.raises(ValueError, match="no column 'image'.*columns are"):
        make_shards(table, tmp_path / "out")


def _truncated_png() -> bytes:
    return png_bytes((40, 40), seed=3)[:-60]


def test_every_bad_input_is_skipped_and_counted(tmp_path):
    src = make_folder(tmp_path / "src", 3)
    bad = {
        "trunc.png": _truncated_png(),
        "notimg.jpg": b"this is plain text, not a JPEG",
        "zero.png": b"",
        "bomb.png": bomb_png(),
    }
    for name, data in bad.items():
        (src / name).write_bytes(data)
        (src / name).with_suffix(".txt").write_text("a caption")
    (src / "nocap.png").write_bytes(png_bytes(seed=9))
    (src / "blank.png").write_bytes(png_bytes(seed=10))
    (src / "blank.txt").write_text("   \n\t ")
    (src / "img_000.jpg").write_bytes(png_bytes(seed=11, fmt="JPEG"))  # same key as img_000.png
    (src / "img_000.jpg").with_suffix(".txt").write_text("dup")
    s = make_shards(src, tmp_path / "out", max_pixels=10_000_000)
    assert s["written"] == 3
    assert s["skipped"] == {
        "corrupt_image": 1,
        "not_an_image": 1,
        "empty_file": 1,
        "image_bomb": 1,
        "missing_caption": 1,
        "empty_caption": 1,
        "duplicate_key": 1,
    }
    assert sorted(keys_in(tmp_path / "out")) == ["img_000", "img_001", "img_002"]


@pytest.mark.parametrize("mode", ["L", "LA", "P", "PA", "RGBA", "CMYK", "I;16", "I", "F", "1", "YCbCr", "RGBX"])
def test_odd_modes_become_rgb(mode):
    im = odd_mode_image(mode, 12, 10)
    fmt = {"CMYK": "JPEG", "YCbCr": "JPEG", "F": "TIFF", "I": "TIFF", "PA": "PNG"}.get(mode, "PNG")
    buf = io.BytesIO()
    try:
        im.save(buf, format=fmt, **({"transparency": 0} if mode == "P" else {}))
    except (OSError, ValueError, KeyError):
        buf = io.BytesIO()
        im.save(buf, format="TIFF")
    out, facts = decode_image(buf.getvalue())
    assert facts["mode"] == mode or mode in ("YCbCr", "RGBX")  # the odd mode really was decoded
    assert out.mode == "RGB" and out.size == (10, 12)


def test_transparent_pixels_become_white():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    rgba.putpixel((0, 0), (0, 0, 255, 255))
    buf = io.BytesIO()
    rgba.save(buf, format="PNG")
    out, _ = decode_image(buf.getvalue())
    assert out.getpixel((1, 1)) == (255, 255, 255) and out.getpixel((0, 0)) == (0, 0, 255)


def test_val_split_is_deterministic_by_key(tmp_path):
    src = make_folder(tmp_path / "src", 40)
    s = make_shards(src, tmp_path / "out", val_fraction=0.25, shard_size=5)
    train, val = keys_in(tmp_path / "out" / "train"), keys_in(tmp_path / "out" / "val")
    assert len(train) + len(val) == 40 and not set(train) & set(val)
    assert set(val) == {f"img_{i:03d}" for i in range(40) if split_of(f"img_{i:03d}", 0.25) == "val"}
    assert 0 < len(val) < 40 and s["splits"]["val"]["written"] == len(val)


def test_rerun_of_finished_job_is_a_noop_and_foreign_output_is_refused(tmp_path):
    src = make_folder(tmp_path / "src", 5)
    make_shards(src, tmp_path / "out", shard_size=2)
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "out").glob("*.tar")}
    make_shards(src, tmp_path / "out", shard_size=2)
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "out").glob("*.tar")} == mtimes
    with pytest.raises(FileExistsError, match="--overwrite"):
        make_shards(src, tmp_path / "out", shard_size=3)
    s = make_shards(src, tmp_path / "out", shard_size=3, overwrite=True)
    assert [x["count"] for x in s["shards"]] == [3, 2]
    assert sorted(p.name for p in (tmp_path / "out").glob("*.tar")) == ["00000.tar", "00001.tar"]


class Crash(Exception):
    pass


class CrashAfter:
    """A process function that dies after ``n`` records, as a killed run would."""

    def __init__(self, n: int, inner):
        self.n, self.inner, self.seen = n, inner, 0

    def __call__(self, rec):
        if self.seen == self.n:
            raise Crash
        self.seen += 1
        return self.inner(rec)


def test_killed_run_resumes_to_the_same_shards(tmp_path):
    recs = [
        Record(f"k{i:03d}", str(p), f"cap {i}")
        for i, p in enumerate(sorted(make_folder(tmp_path / "s", 23).glob("*.png")))
    ]
    recs.insert(5, Record("bad", str(tmp_path / "missing.png"), "gone"))
    kw = dict(shard_size=4, val_fraction=0.3, fp="x")
    clean = write_dataset(recs, process_file, tmp_path / "clean", **kw)
    with pytest.raises(Crash):
        write_dataset(recs, CrashAfter(13, process_file), tmp_path / "out", **kw)
    finals = list((tmp_path / "out").rglob("*.tar"))
    assert finals and not (tmp_path / "out" / "summary.json").exists()
    assert not list((tmp_path / "out").rglob("*.tmp*"))  # the open shard was dropped, not renamed
    # a kill -9 leaves a temporary file behind: the rerun must clean it
    (tmp_path / "out" / "train" / "00009.tar.tmp123").write_bytes(b"half a shard")
    resumed = write_dataset(recs, process_file, tmp_path / "out", **kw)
    assert resumed["written"] == clean["written"] == 23 and resumed["skipped"] == clean["skipped"] == {
        "unreadable_file": 1
    }
    assert resumed["shards"] == clean["shards"]
    for s in clean["shards"]:  # byte-identical shards
        assert (tmp_path / "out" / s["path"]).read_bytes() == (tmp_path / "clean" / s["path"]).read_bytes()
    assert not list((tmp_path / "out").rglob("*.tmp*"))
    assert Counter(keys_in(tmp_path / "out")) == Counter(keys_in(tmp_path / "clean"))


def test_writer_never_shows_a_partial_shard(tmp_path):
    w = ShardWriter(tmp_path, shard_size=3)
    from dalle_repro.data.writer import Sample

    for i in range(2):
        w.add(Sample(f"k{i}", png_bytes(seed=i), "png", "c", {}))
    assert not list(tmp_path.glob("*.tar"))  # still under a temporary name
    w.abort()
    assert not list(tmp_path.iterdir())


def test_long_and_control_captions_are_cleaned(tmp_path):
    src = make_folder(tmp_path / "src", 2)
    (src / "img_000.txt").write_bytes(b"a\x00b\x07c \xff\xfe end\n\n")
    (src / "img_001.txt").write_text("x" * 100_000)
    s = make_shards(src, tmp_path / "out", max_caption_chars=1000)
    assert s["written"] == 2
    got = dict(iter_shard_samples(sorted(str(p) for p in (tmp_path / "out").glob("*.tar"))))
    # not UTF-8 and no UTF-8 sequence in it: read as Latin-1 (data.decode_caption), controls as spaces
    assert got["img_000"]["txt"].decode() == "a b c \u00ff\u00fe end"
    assert len(got["img_001"]["txt"]) == 1000 and json.loads(got["img_001"]["json"])["caption_truncated"]


def test_sanitize_key():
    assert sanitize_key("dir/sub/a.b c") == "dir_sub_a_b_c"
    assert "." not in sanitize_key("...") and sanitize_key("...")


def test_parallel_workers_write_the_same_shards(tmp_path):
    src = make_folder(tmp_path / "src", 12)
    a = make_shards(src, tmp_path / "a", shard_size=5, image_size=8)
    b = make_shards(src, tmp_path / "b", shard_size=5, image_size=8, workers=2)
    assert a["shards"] == b["shards"]
    for s in a["shards"]:
        assert (tmp_path / "a" / s["path"]).read_bytes() == (tmp_path / "b" / s["path"]).read_bytes()


def test_kill_9_mid_run_then_rerun_loses_and_duplicates_nothing(tmp_path):
    """A real SIGKILL of the CLI while it writes, then a rerun: the key set equals a clean run's."""
    import os
    import signal
    import subprocess
    import sys
    import time

    src = make_folder(tmp_path / "src", 300, size=(160, 120))
    tool = Path(__file__).resolve().parents[1] / "tools" / "make_shards.py"
    cmd = [sys.executable, str(tool), "--input", str(src), "--shard-size", "10", "--image-size", "64"]
    clean = make_shards(src, tmp_path / "clean", shard_size=10, image_size=64)
    out = tmp_path / "out"
    proc = subprocess.Popen([*cmd, "--output", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline and len(list(out.glob("*.tar"))) < 3:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "summary.json").exists(), "the run finished before it could be killed"
    for shard in out.glob("*.tar"):  # every shard under a final name is whole
        assert len(keys_in_shard(shard)) == 10
    r = subprocess.run([*cmd, "--output", str(out)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert not list(out.glob("*.tmp*"))
    assert Counter(keys_in(out)) == Counter(keys_in(tmp_path / "clean")) == Counter(f"img_{i:03d}" for i in range(300))
    for s in clean["shards"]:
        assert (out / s["path"]).read_bytes() == (tmp_path / "clean" / s["path"]).read_bytes()


def keys_in_shard(path: Path) -> list[str]:
    return [k for k, _ in iter_shard_samples([str(path)])]


def test_kill_between_a_shard_rename_and_its_progress_record(tmp_path, monkeypatch):
    """The first shard is in place but the record of it is not: the rerun still knows the folder is its own."""
    import dalle_repro.data.writer as shards_mod

    src = make_folder(tmp_path / "src", 9)
    clean = make_shards(src, tmp_path / "clean", shard_size=4)
    real = shards_mod.atomic_write_text

    def dies_recording_the_first_shard(path, text):
        if (tmp_path / "out" / "00000.tar").exists():
            raise Crash
        real(path, text)

    monkeypatch.setattr(shards_mod, "atomic_write_text", dies_recording_the_first_shard)
    with pytest.raises(Crash):
        make_shards(src, tmp_path / "out", shard_size=4)
    assert (tmp_path / "out" / "00000.tar").exists()
    monkeypatch.setattr(shards_mod, "atomic_write_text", real)
    again = make_shards(src, tmp_path / "out", shard_size=4)
    assert again["shards"] == clean["shards"] and again["written"] == 9


def test_a_long_file_name_is_written_and_read_back(tmp_path):
    """USTAR keeps 100 characters of a member name: a 150-character file name raised 'name is too
    long' and ended the job, on every rerun. Shards are PAX tars now."""
    src = make_folder(tmp_path / "src", 3)
    stem = "a_very_long_name_" + "x" * 133
    (src / "img_000.png").rename(src / f"{stem}.png")
    (src / "img_000.txt").rename(src / f"{stem}.txt")
    s = make_shards(src, tmp_path / "out", shard_size=8)
    assert s["written"] == 3 and s["skipped"] == {}
    samples = dict(iter_shard_samples(sorted(str(p) for p in (tmp_path / "out").glob("*.tar"))))
    assert samples[stem]["txt"] == b"a picture number 0" and len(stem) == 150


def _jpeg_with_metadata(orientation: int = 1) -> bytes:
    im = Image.new("RGB", (24, 16), (200, 30, 30))
    im.paste((10, 10, 250), (0, 0, 8, 16))
    exif = Image.Exif()
    exif[0x010F] = "CameraMaker"
    exif[0x0112] = orientation
    exif.get_ifd(0x8825)[2] = (52.0, 31.0, 12.0)  # a GPS latitude
    buf = io.BytesIO()
    im.save(buf, "JPEG", exif=exif.tobytes(), comment=b"shot at home", quality=90)
    return buf.getvalue()


def test_table_inputs_read_regular_files_only_within_a_size_cap_and_optionally_inside(tmp_path):
    """Issue 18 item 7: a table row naming /dev/zero grew until memory ran out; absolute and ..
    paths were read as any other; nothing bounded a file's size."""
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "ok.png").write_bytes(png_bytes(seed=1))
    (tmp_path / "t" / "big.png").write_bytes(png_bytes((64, 64), seed=2))
    (tmp_path / "outside.png").write_bytes(png_bytes(seed=3))
    (tmp_path / "t" / "link.png").symlink_to(tmp_path / "outside.png")
    rows = [("ok.png", "fine"), ("/dev/zero", "a device"), ("../outside.png", "up and out"), ("big.png", "large")]
    rows += [("link.png", "a link out"), (str(tmp_path / "t"), "a folder")]
    table = tmp_path / "t" / "table.csv"
    with open(table, "w", newline="") as f:
        csv.writer(f).writerows([("image", "caption"), *rows])
    cap = len((tmp_path / "t" / "ok.png").read_bytes()) + 10
    s = make_shards(table, tmp_path / "out", max_file_bytes=cap, paths_inside=False)
    assert s["written"] == 3  # ok, ../outside and the link: allowed with --no-paths-inside
    assert s["skipped"] == {"not_a_regular_file": 2, "file_too_large": 1}
    s = make_shards(table, tmp_path / "inside", max_file_bytes=cap)  # confined by default
    assert s["written"] == 1
    assert s["skipped"] == {"not_a_regular_file": 1, "file_too_large": 1, "outside_table_folder": 3}


def test_inputs_are_confined_by_default_and_a_folders_captions_are_read_capped(tmp_path):
    """A folder's caption linked to a credentials file was read whole into the shards; a table's
    absolute, .. and linked paths were read unless --paths-inside (ignored for folders)."""
    from dalle_repro.cli.make_shards import main
    from dalle_repro.data.make_shards import list_folder

    cap = 1 << 20  # make_shards.MAX_CAPTION_BYTES

    secret = tmp_path / "credentials"
    secret.write_text("aws_secret_access_key = s3cret")
    (tmp_path / "elsewhere.png").write_bytes(png_bytes(seed=9))
    src = tmp_path / "src"
    src.mkdir()
    (src / "ok.png").write_bytes(png_bytes(seed=1))
    (src / "ok.txt").write_text("a fine caption")
    (src / "leak.png").write_bytes(png_bytes(seed=2))
    (src / "leak.txt").symlink_to(secret)
    (src / "linked.png").symlink_to(tmp_path / "elsewhere.png")
    (src / "linked.txt").write_text("an image from elsewhere")
    (src / "long.png").write_bytes(png_bytes(seed=3))
    (src / "long.txt").write_bytes(b"word " * (cap // 2))
    records, skipped = list_folder(src)
    assert {r.key for r in records} == {"ok", "linked", "long"} and skipped == {"outside_input_folder": 1}
    assert max(len(r.caption) for r in records) <= cap
    s = make_shards(src, tmp_path / "out")
    assert s["written"] == 2 and s["skipped"] == {"outside_input_folder": 2}
    text = b"".join(p.read_bytes() for p in (tmp_path / "out").glob("*.tar"))
    assert b"s3cret" not in text
    table = src / "table.csv"
    with open(table, "w", newline="") as f:
        csv.writer(f).writerows([("image", "caption"), ("ok.png", "in"), (str(tmp_path / "elsewhere.png"), "abs")])
    assert main(["--input", str(table), "--output", str(tmp_path / "t1")]) == 0
    assert json.loads((tmp_path / "t1" / "summary.json").read_text())["skipped"] == {"outside_table_folder": 1}
    assert main(["--input", str(table), "--output", str(tmp_path / "t2"), "--no-paths-inside"]) == 0
    assert json.loads((tmp_path / "t2" / "summary.json").read_text())["written"] == 2


def test_metadata_is_dropped_from_kept_files_unless_asked_and_the_image_bytes_stay(tmp_path):
    """Issue 18 item 7: EXIF (with GPS), comments and PNG text were copied into the shards."""
    src = tmp_path / "src"
    src.mkdir()
    original = _jpeg_with_metadata()
    (src / "a.jpg").write_bytes(original)
    (src / "a.txt").write_text("a red and blue picture")
    (src / "r.jpg").write_bytes(_jpeg_with_metadata(orientation=6))  # EXIF says: rotate 90
    (src / "r.txt").write_text("a turned picture")
    png = io.BytesIO()
    info = __import__("PIL.PngImagePlugin", fromlist=["PngInfo"]).PngInfo()
    info.add_text("Author", "someone")
    Image.new("RGB", (8, 8), (1, 2, 3)).save(png, "PNG", pnginfo=info)
    (src / "p.png").write_bytes(png.getvalue())
    (src / "p.txt").write_text("a png with text")
    make_shards(src, tmp_path / "out")
    stored = {key: members for key, members in iter_shard_samples(expand_shards(str(tmp_path / "out" / "*.tar")))}
    a = stored["a"]["jpg"]
    assert b"Exif" not in a and b"shot at home" not in a and len(a) < len(original)
    assert Image.open(io.BytesIO(a)).tobytes() == Image.open(io.BytesIO(original)).tobytes()  # same pixels
    assert a.endswith(original[original.index(b"\xff\xda") :])  # the scan data, byte for byte
    r, _ = decode_image(stored["r"]["jpg"])
    assert r.size == (16, 24) and b"Exif" not in stored["r"]["jpg"]  # re-encoded upright
    assert b"Author" not in stored["p"]["png"] and decode_image(stored["p"]["png"])[0].getpixel((0, 0)) == (1, 2, 3)
    make_shards(src, tmp_path / "kept", keep_metadata=True)
    kept = dict(iter_shard_samples(expand_shards(str(tmp_path / "kept" / "*.tar"))))
    assert kept["a"]["jpg"] == original


def test_a_link_swapped_between_check_and_open_cannot_leave_the_table_folder(tmp_path, monkeypatch):
    """A review of item 7: --paths-inside resolved the name, then opened it; a link re-pointed in
    between read a file outside the folder. The check is now made on the opened file."""
    from dalle_repro.data import make_shards as shards

    table = tmp_path / "table"
    table.mkdir()
    (table / "in.jpg").write_bytes(b"inside")
    (tmp_path / "secret.jpg").write_bytes(b"outside")
    link = table / "link.jpg"
    link.symlink_to(table / "in.jpg")
    real_open = os.open

    def swap_then_open(path, *args, **kwargs):
        if str(path) == str(link):  # the attacker wins the race: the link moves just before the open
            link.unlink()
            link.symlink_to(tmp_path / "secret.jpg")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(shards.os, "open", swap_then_open)
    got = shards.read_source(str(link), inside=table)
    assert isinstance(got, tuple) and got[0] == "outside_table_folder", got


def test_metadata_between_progressive_scans_and_after_the_end_is_dropped():
    """A review of item 7: the strip stopped at the first scan, so a progressive JPEG's comment
    between scans, and bytes appended after the end marker, were kept."""
    from dalle_repro.data.make_shards import strip_metadata

    buf = io.BytesIO()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (32, 48, 3), dtype=np.uint8)).save(buf, "JPEG", progressive=True)
    clean = buf.getvalue()
    scans = [i for i in range(len(clean) - 1) if clean[i : i + 2] == b"\xff\xda"]
    assert len(scans) > 2  # progressive: several scans
    comment = b"\xff\xfe" + (2 + 16).to_bytes(2, "big") + b"secret location!"
    tainted = clean[: scans[2]] + comment + clean[scans[2] :] + b"appended payload"
    assert Image.open(io.BytesIO(tainted)).tobytes() == Image.open(io.BytesIO(clean)).tobytes()
    stripped = strip_metadata(tainted, "JPEG")
    assert stripped == clean  # the comment and the tail gone, every image byte kept
    assert strip_metadata(clean[:-40], "JPEG") is None  # a cut file cannot be walked: re-encoded instead


def test_captions_in_other_encodings_and_extensions_are_read_and_counted(tmp_path):
    """Issue 18 item 16: Latin-1, UTF-16 and UTF-8-with-BOM captions were kept garbled and not
    counted; captions in .caption files gave 0 written and no word about why."""
    src = tmp_path / "src"
    src.mkdir()
    captions = {
        "a": "café au lait".encode("cp1252"),
        "b": "naïve crème".encode("utf-16"),
        "c": "\ufeffplain with a mark".encode("utf-8"),
        "d": "déjà vu".encode(),
    }
    for i, (stem, raw) in enumerate(captions.items()):
        (src / f"{stem}.png").write_bytes(png_bytes(seed=i))
        (src / f"{stem}.caption").write_bytes(raw)
    r = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "make_shards.py"), "--input", str(src), "--output", str(tmp_path / "o")],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 1 and "STEM.txt" in r.stderr and "4 .caption files: --caption-ext caption?" in r.stderr
    s = make_shards(src, tmp_path / "out", caption_ext="caption")
    assert s["written"] == 4 and s["captions_recoded"] == {"latin-1": 1, "utf-16": 1, "utf-8-sig": 1}
    got = {k: m["txt"].decode() for k, m in iter_shard_samples(expand_shards(str(tmp_path / "out" / "*.tar")))}
    assert got == {"a": "café au lait", "b": "naïve crème", "c": "plain with a mark", "d": "déjà vu"}
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["captions_recoded"]["latin-1"] == 1


def test_a_latin_1_table_keeps_its_accents(tmp_path):
    (tmp_path / "x.png").write_bytes(png_bytes(seed=1))
    (tmp_path / "t.csv").write_bytes("image,caption\nx.png,un été à Noël\n".encode("cp1252"))
    make_shards(tmp_path / "t.csv", tmp_path / "out")
    ((_, m),) = list(iter_shard_samples(expand_shards(str(tmp_path / "out" / "*.tar"))))
    assert m["txt"].decode() == "un été à Noël"


def test_a_sample_that_cannot_be_written_is_skipped_and_counted_and_the_shard_stays_whole(tmp_path):
    """Issue 18 item 6: one sample whose write fails (a caption with a lone surrogate, metadata that is
    not JSON) ended the whole job, on every rerun."""
    good = [Record(f"k{i}", f"src{i}", f"caption {i}") for i in range(5)]
    bad_caption = Record("k5", "src5", "broken \udcff caption")
    bad_meta = Record("k6", "src6", "fine caption", {"when": {1, 2}})

    def process(rec: Record):
        return Sample(rec.key, png_bytes(seed=int(rec.key[1:])), "png", rec.caption, dict(rec.meta))

    s = write_dataset([*good, bad_caption, bad_meta], process, tmp_path / "out", shard_size=3, fp="x")
    assert s["written"] == 5 and s["skipped"] == {"write_failed": 2}
    keys = [k for k, _ in iter_shard_samples(expand_shards(str(tmp_path / "out" / "*.tar")))]
    assert keys == [f"k{i}" for i in range(5)]
    with tarfile.open(tmp_path / "out" / "00001.tar") as t:
        assert sorted(t.getnames()) == ["k3.json", "k3.png", "k3.txt", "k4.json", "k4.png", "k4.txt"]


def test_skipped_files_are_listed_with_their_reasons_and_orphan_captions_counted(tmp_path):
    """summary.json counted skips without saying which files; a caption with no image was not counted."""
    src = make_folder(tmp_path / "src", 4)
    (src / "orphan.txt").write_text("a caption whose image is missing")
    (src / "broken.png").write_bytes(b"not a png")
    (src / "broken.txt").write_text("a caption")
    (src / "nocap.png").write_bytes((src / next(p.name for p in src.glob("*.png") if p.stem != "broken")).read_bytes())
    s = make_shards(src, tmp_path / "out")
    assert s["written"] == 4
    assert s["skipped"] == {"caption_without_image": 1, "missing_caption": 1, "not_an_image": 1}
    rows = [json.loads(line) for line in (tmp_path / "out" / "skipped.jsonl").read_text().splitlines()]
    assert sorted((Path(r["path"]).name, r["reason"]) for r in rows) == [
        ("broken.png", "not_an_image"),
        ("nocap.png", "missing_caption"),
        ("orphan.txt", "caption_without_image"),
    ]


def test_a_small_set_gets_shards_for_eight_readers(tmp_path):
    """1000 samples per shard gave a 40-image set one shard: one loader reader busy, the rest idle."""
    from dalle_repro.data.make_shards import READERS, auto_shard_size

    s = make_shards(make_folder(tmp_path / "src", 40), tmp_path / "out")
    assert s["options"]["shard_size"] == 5 and s["splits"]["train"]["shards"] == READERS
    assert auto_shard_size(3) == 1 and auto_shard_size(10**6) == 1000


def test_a_csv_cell_over_the_field_limit_skips_its_row_and_counts_it(tmp_path):
    """A caption cell over 128 KiB ended make_shards with a _csv.Error traceback."""
    (tmp_path / "a.png").write_bytes(png_bytes(seed=1))
    (tmp_path / "c.png").write_bytes(png_bytes(seed=2))
    table = tmp_path / "table.csv"
    table.write_text("image,caption\na.png,a fine one\nb.png," + "x" * 200_000 + "\nc.png,another\n")
    s = make_shards(table, tmp_path / "out")
    assert s["written"] == 2 and s["skipped"] == {"unreadable_row": 1}


def test_the_pattern_folder_goes_through_make_shards_with_its_broken_files_named(tmp_path):
    from dalle_repro.cli.make_pattern_folder import main as make_folder
    from dalle_repro.cli.make_shards import main as make_shards

    assert make_folder(["--output", str(tmp_path / "imgs"), "--count", "30", "--image-size", "32"]) == 0
    captions = sorted(p.read_text().strip() for p in (tmp_path / "imgs").glob("0*.txt"))
    assert len(captions) == 30 and len(set(captions)) > 20
    assert make_shards(["--input", str(tmp_path / "imgs"), "--output", str(tmp_path / "out")]) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["written"] == 30
    skipped = [json.loads(line) for line in (tmp_path / "out" / "skipped.jsonl").read_text().splitlines()]
    assert len(skipped) == 4 and all(s["reason"] for s in skipped)
    assert any("broken_no_image" in json.dumps(s) for s in skipped)
