"""Layered config: defaults <- YAML <- overrides, and the errors for bad keys, types and ranges."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

import pytest
import yaml

from dalle_repro.core.cli import cli_help, flag_aliases, parse_cli
from dalle_repro.core.config import ConfigError, arg, load_config, save_config


@dataclass
class Inner:
    """A nested section."""

    depth: int = arg(4, "Layers.", gt=0)
    rate: float = arg(0.5, "A rate.", ge=0, le=1)
    kind: Literal["row", "column"] = arg("row", "A mask kind.")
    sizes: tuple[int, ...] = arg((1, 2), "Some sizes.", gt=0)


@dataclass
class Outer:
    """The top."""

    name: str = arg("run", "Run name.")
    flag: bool = arg(False, "A switch.")
    path: str | None = arg(None, "Optional path.")
    model: Inner = arg(factory=Inner, doc="The model.")


def test_defaults_yaml_overrides_layer(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("name: from_yaml\nmodel:\n  depth: 8\n  rate: 0.25\n")
    cfg = load_config(Outer, y, ["model.depth=2", "flag=true", "model.sizes=[3,4,5]"])
    assert cfg.name == "from_yaml"
    assert cfg.model.depth == 2  # override beats YAML
    assert cfg.model.rate == 0.25  # YAML beats default
    assert cfg.model.kind == "row"  # default
    assert cfg.flag is True and cfg.model.sizes == (3, 4, 5)


@pytest.mark.parametrize(
    "override, words",
    [
        (["model.depht=3"], ["model.depht", "did you mean model.depth"]),
        (["nmae=x"], ["nmae", "did you mean name"]),
        (["model.depth=abc"], ["model.depth", "'abc'", "int"]),
        (["model.depth=0"], ["model.depth", "0", "> 0"]),
        (["model.rate=1.5"], ["model.rate", "1.5", "<= 1"]),
        (["model.kind=diagonal"], ["model.kind", "diagonal", "'row'", "'column'"]),
        (["flag=1"], ["flag", "bool"]),
        (["model.sizes=[1,-2]"], ["model.sizes", "-2", "> 0"]),
        (["model=3"], ["model", "mapping"]),
        (["model.depth"], ["model.depth", "key.sub=value"]),
    ],
)
def test_bad_values_name_the_dotted_key(override, words):
    with pytest.raises(ConfigError) as e:
        load_config(Outer, None, override)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_int_accepted_for_float_and_bool_not_for_int():
    assert load_config(Outer, None, ["model.rate=1"]).model.rate == 1.0
    with pytest.raises(ConfigError):
        load_config(Outer, None, ["model.depth=true"])


def test_bad_yaml_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Outer, tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(Outer, bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(Outer, listy)


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(Outer, None, ["model.depth=7", "path=/x"])
    path = save_config(cfg, tmp_path / "run")
    again = load_config(Outer, path)
    assert again == cfg
    assert yaml.safe_load(path.read_text())["model"]["depth"] == 7


def test_help_lists_every_key_with_doc():
    text = cli_help(Outer, "usage: x")
    for key in ("name", "flag", "path", "model.depth", "model.rate", "model.kind", "model.sizes"):
        assert f"  {key} (" in text
    assert "Layers." in text and "[> 0]" in text


def test_arg_refuses_undocumented_and_mutable_defaults():
    with pytest.raises(TypeError):
        arg(1)
    with pytest.raises(TypeError):
        arg([1], "a list")


def test_every_shipped_config_validates():
    from pathlib import Path

    from dalle_repro.demo.config import DemoConfig

    root = Path(__file__).resolve().parents[1] / "configs"
    from dalle_repro.train.dvae import DVAETrainConfig
    from dalle_repro.train.prior_config import PriorTrainConfig

    cfg = load_config(DemoConfig, root / "demo" / "demo.yaml")
    assert cfg.text.text_len == 16 and cfg.prior_ranks == 2 and cfg.dataset == "shapes"
    for path in sorted(root.glob("*/dvae.yaml")):
        load_config(DVAETrainConfig, path)
    priors = sorted(root.glob("*/prior*.yaml"))
    assert len(priors) == 5  # demo, paper, gpu 350m and 1.3b, start
    for path in priors:
        load_config(PriorTrainConfig, path)


def test_files_written_atomically_honour_the_umask(tmp_path):
    """Temporary files keep their 0600 (folders 0700) through the rename: weights, configs,
    tokenizers and pictures came out readable by their owner only, whatever the umask said."""
    import os

    import torch
    from PIL import Image

    from dalle_repro.core.files import atomic_write_text
    from dalle_repro.core.images import save_png
    from dalle_repro.core.pretrained import write_folder

    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.yaml", "x: 1\n")
        save_png(Image.new("RGB", (2, 2)), tmp_path / "a.png")
        folder = write_folder(tmp_path / "model", {"model": {"w": torch.zeros(2)}}, {"config.yaml": "x: 1\n"})
        os.umask(0o077)
        atomic_write_text(tmp_path / "private.yaml", "x: 1\n")
    finally:
        os.umask(old)
    mode = {p: (tmp_path / p).stat().st_mode & 0o777 for p in ("a.yaml", "a.png", "private.yaml")}
    assert mode == {"a.yaml": 0o644, "a.png": 0o644, "private.yaml": 0o600}
    assert folder.stat().st_mode & 0o777 == 0o755
    assert (folder / "model.safetensors").stat().st_mode & 0o777 == 0o644


def test_a_config_resolves_no_environment_variable_without_the_flag(tmp_path, monkeypatch):
    """A shared config used to copy ${oc.env:...} (a wandb key, say) into config.yaml and wandb."""
    import subprocess
    import sys
    from pathlib import Path

    from dalle_repro.core.config import ConfigError, load_config
    from dalle_repro.train.dvae import DVAETrainConfig

    monkeypatch.setenv("DALLE_REPRO_TEST_SECRET", "s3cret")
    path = tmp_path / "shared.yaml"
    path.write_text("model:\n  image_size: 64\nrun:\n  run_dir: ${oc.env:DALLE_REPRO_TEST_SECRET}\n")
    with pytest.raises(ConfigError, match="run.run_dir.*--config-env"):
        load_config(DVAETrainConfig, path)
    assert load_config(DVAETrainConfig, path, allow_env=True).run.run_dir == "s3cret"
    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, str(root / "launch/train_dvae.py"), "--config", str(path), "run.steps=0"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--config-env" in r.stderr and "s3cret" not in r.stderr + r.stdout


@dataclass
class _Sub:
    n: int = arg(3, "a number", ge=1)
    word: str = arg("x", "a word")


@dataclass
class _Tool:
    out: str = arg(doc="where")
    fraction: float = arg(0.0, "a fraction", ge=0, lt=1)
    on: bool = arg(True, "a switch")
    words: list[str] = arg(factory=list, doc="repeatable words")
    radii: list[float] = arg(factory=lambda: [0.0], doc="comma list", sep=",")
    rest: list[str] = arg(factory=list, doc="bare words")
    sub: _Sub = arg(factory=lambda: _Sub(n=5), doc="a section with its own defaults")


_FLAGS = flag_aliases(_Tool) | flag_aliases(_Sub, "sub.") | {"--word-list": "words"}


def test_flags_are_spellings_of_config_keys():
    argv = ["bare", "--out", "o", "--fraction", "0.5", "--no-on", "--words", "a=b", "c", "--words", "d, e"]
    argv += ["--radii", "1,2.5", "--n=7", "sub.word=hi", "--word-list", "f"]
    cfg, _ = parse_cli(_Tool, argv, "doc", aliases=_FLAGS, positional="rest")
    assert cfg.out == "o" and cfg.fraction == 0.5 and cfg.on is False
    assert cfg.words == ["a=b", "c", "d, e", "f"] and cfg.radii == [1.0, 2.5] and cfg.rest == ["bare"]
    assert cfg.sub.n == 7 and cfg.sub.word == "hi"
    cfg, _ = parse_cli(_Tool, ["--out", "123", "--word", "456"], "doc", aliases=_FLAGS)
    # a text key's flag keeps its value as text; a section set in part keeps its factory's defaults
    assert cfg.out == "123" and cfg.sub.word == "456" and cfg.sub.n == 5


def test_flag_errors_name_the_flag(capsys):
    for argv, expected in [
        (["--out", "o", "--fraction", "1.5"], "fraction: got 1.5; allowed: < 1 (--fraction)"),
        ([], "out: required, no default (--out)"),
        (["--out", "o", "--fractoin", "0.1"], "unknown flag --fractoin; did you mean --fraction?"),
        (["--out"], "--out (out) needs a value"),
    ]:
        with pytest.raises(SystemExit) as e:
            parse_cli(_Tool, argv, "doc", aliases=_FLAGS)
        assert e.value.code == 2 and expected in capsys.readouterr().err, argv


def test_help_shows_each_keys_flag_and_the_sections_defaults(capsys):
    assert parse_cli(_Tool, ["--help"], "doc", aliases=_FLAGS) == (None, {})
    text = capsys.readouterr().out
    assert "fraction (float [>= 0, < 1]) = 0.0  [--fraction]" in text
    assert "on (bool) = True  [--on | --no-on]" in text
    assert "sub.n (int [>= 1]) = 5  [--n]" in text


@pytest.mark.parametrize(
    "cls_name, yaml_text, key",
    [
        ("dvae", "data:\n  shards: 'pipe:touch {marker}'\n", "data.shards"),
        ("dvae", "run:\n  val_shards: 'a.tar,pipe:touch {marker}'\n", "run.val_shards"),
        ("clip", "data:\n  shards: '{{pipe:touch {marker},x}}.tar'\n", "data.shards"),
        ("demo", "dvae_overrides: ['data.shards=pipe:touch {marker}']\n", "dvae_overrides.0"),
    ],
)
def test_a_config_file_runs_no_pipe_command_without_the_flag(tmp_path, cls_name, yaml_text, key):
    """A shared YAML whose shards are ``pipe:curl ...|sh`` ran the command on the first read; a
    pipe: shard is taken from the command line only, or from a file with --allow-pipe."""
    from dalle_repro.core.config import load_config
    from dalle_repro.demo.config import DemoConfig
    from dalle_repro.train.clip import ClipTrainConfig
    from dalle_repro.train.dvae import DVAETrainConfig

    cls = {"dvae": DVAETrainConfig, "clip": ClipTrainConfig, "demo": DemoConfig}[cls_name]
    path = tmp_path / "shared.yaml"
    path.write_text(yaml_text.format(marker=tmp_path / "ran"))
    with pytest.raises(ConfigError, match=rf"{re.escape(key)}: config file .*shared.yaml.*command line.*--allow-pipe"):
        load_config(cls, path)
    load_config(cls, path, allow_pipe=True)
    if cls_name != "demo":  # typed on the command line, it needs no flag
        assert "pipe:" in str(load_config(cls, None, [f"{key}=pipe:cat x"]))


def test_the_trainers_refuse_a_pipe_from_their_config_file(tmp_path, capsys):
    """launch/train_dvae.py --config shared.yaml ran the file's command before any update."""
    from dalle_repro.cli.train_clip import main as clip_main
    from dalle_repro.cli.train_dvae import main as dvae_main
    from dalle_repro.cli.train_prior import main as prior_main

    marker = tmp_path / "ran"
    path = tmp_path / "shared.yaml"
    path.write_text(f"data:\n  shards: 'pipe:touch {marker}'\nrun:\n  steps: 1\n")
    for main in (dvae_main, prior_main, clip_main):
        with pytest.raises(SystemExit) as e:
            main(["--config", str(path)])
        assert e.value.code == 2 and "--allow-pipe" in capsys.readouterr().err
    assert not marker.exists()


def test_the_demos_own_config_files_hold_no_pipe_without_the_flag(tmp_path):
    """The demo's dvae_config and prior_config name YAML files: their shards are a file's too."""
    from dalle_repro.core.config import from_dict
    from dalle_repro.demo import pipeline as demo

    shared = tmp_path / "dvae.yaml"
    shared.write_text(f"run:\n  val_shards: 'pipe:touch {tmp_path / 'ran'}'\n")
    cfg = from_dict(demo.DemoConfig, {"out_dir": str(tmp_path / "out"), "dvae_config": str(shared)})
    with pytest.raises(ConfigError, match="run.val_shards: config file .*dvae.yaml"):
        demo.dvae_config(cfg, plan=False)
    token = demo.ALLOW_PIPE.set(True)
    try:
        demo.dvae_config(cfg, plan=False)  # run_demo(allow_pipe=True), the command line's --allow-pipe
    finally:
        demo.ALLOW_PIPE.reset(token)
    with pytest.raises(ConfigError, match="--allow-pipe"):
        demo.run_demo(cfg, log=lambda _: None)


def test_an_environment_variable_read_through_a_built_resolver_name_is_refused(tmp_path, monkeypatch):
    """``${oc.${run.val_shards}:NAME}`` builds the resolver name ``oc.env`` from another value and
    passed the pattern check: the resolver itself refuses while a file is loaded."""
    from dalle_repro.core.config import load_config, load_yaml
    from dalle_repro.train.dvae import DVAETrainConfig

    monkeypatch.setenv("DALLE_REPRO_TEST_SECRET", "s3cret")
    path = tmp_path / "shared.yaml"
    path.write_text("run:\n  val_shards: env\n  run_dir: ${oc.${run.val_shards}:DALLE_REPRO_TEST_SECRET}\n")
    with pytest.raises(ConfigError, match="DALLE_REPRO_TEST_SECRET.*--config-env") as e:
        load_config(DVAETrainConfig, path)
    assert "s3cret" not in str(e.value)
    assert load_yaml(path, allow_env=True)["run"]["run_dir"] == "s3cret"
    from omegaconf import OmegaConf

    assert OmegaConf.create({"a": "${oc.env:DALLE_REPRO_TEST_SECRET}"}).a == "s3cret"  # elsewhere: unchanged


@pytest.mark.parametrize(
    "config, override, new",
    [
        ("DVAETrainConfig", "run.precision=bf16", "is now precision.dtype"),
        ("ClipTrainConfig", "run.precision=bf16", "is now precision.dtype"),
        ("ClipTrainConfig", "run.output=x", "is now run.run_dir"),
        ("ClipTrainConfig", "data.val_shards=x", "is now run.val_shards"),
        ("DemoConfig", "clip.run.output=x", "clip.run.output is now clip.run.run_dir"),
    ],
)
def test_renamed_keys_name_the_new_key(config, override, new):
    """A user's YAML with a key the trainers' shared sections replaced fails with the key to use."""
    from dalle_repro.demo.config import DemoConfig
    from dalle_repro.train.clip import ClipTrainConfig
    from dalle_repro.train.dvae import DVAETrainConfig

    cls = {"DVAETrainConfig": DVAETrainConfig, "ClipTrainConfig": ClipTrainConfig, "DemoConfig": DemoConfig}[config]
    with pytest.raises(ConfigError, match=new):
        load_config(cls, None, [override])
