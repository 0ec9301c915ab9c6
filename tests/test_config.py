"""Layered config: defaults <- YAML <- overrides, and the errors for bad keys, types and ranges."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import pytest
import yaml

from dalle_repro.core.config import ConfigError, arg, cli_help, load_config, save_config


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

    from dalle_repro.demo.pipeline import DemoConfig

    root = Path(__file__).resolve().parents[1] / "configs"
    from dalle_repro.train.dvae import DVAETrainConfig
    from dalle_repro.train.prior_config import PriorTrainConfig

    cfg = load_config(DemoConfig, root / "demo" / "demo.yaml")
    assert cfg.text.text_len == 16 and cfg.prior_ranks == 2 and cfg.dataset == "shapes"
    for path in sorted(root.glob("*/dvae.yaml")):
        load_config(DVAETrainConfig, path)
    priors = sorted(root.glob("*/prior*.yaml"))
    assert len(priors) == 4
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
    from dalle_repro.demo.pipeline import DemoConfig
    from dalle_repro.train.clip import ClipTrainConfig
    from dalle_repro.train.dvae import DVAETrainConfig

    cls = {"DVAETrainConfig": DVAETrainConfig, "ClipTrainConfig": ClipTrainConfig, "DemoConfig": DemoConfig}[config]
    with pytest.raises(ConfigError, match=new):
        load_config(cls, None, [override])
