"""The DeepSpeed adapter (dalle_repro.train.deepspeed): every DeepSpeed private name the project uses
still exists in the installed DeepSpeed, and no other module reaches into DeepSpeed's privates."""

from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path

import pytest

deepspeed = pytest.importorskip("deepspeed")

from dalle_repro.train.deepspeed import PRIVATE_NAMES  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _defines(cls: type, name: str) -> bool:
    """A class attribute or method, or an attribute its methods assign (``self.NAME =``)."""
    if hasattr(cls, name):
        return True
    for klass in cls.__mro__:
        try:
            src = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        if re.search(rf"self\.{re.escape(name)}\s*(:[^=]*)?=", src):
            return True
    return False


@pytest.mark.parametrize(
    ("where", "name", "why"), PRIVATE_NAMES, ids=[f"{w.rsplit('.', 1)[1]}.{n}" for w, n, _ in PRIVATE_NAMES]
)
def test_each_deepspeed_private_we_use_still_exists(where, name, why):
    module, cls_name = where.rsplit(".", 1)
    cls = getattr(importlib.import_module(module), cls_name)
    assert _defines(cls, name), (
        f"DeepSpeed {deepspeed.__version__} has no {where}.{name}, which dalle_repro/train/deepspeed.py uses "
        f"({why}); adapt that module, then the range pinned in pyproject.toml"
    )


def test_the_pinned_range_holds_the_installed_version():
    text = (ROOT / "pyproject.toml").read_text()
    pin = re.search(r'"deepspeed>=([\d.]+),<([\d.]+)"', text)
    assert pin, "pyproject.toml pins deepspeed to a range (>=A,<B)"

    def v(s: str) -> tuple[int, ...]:
        return tuple(int(x) for x in re.findall(r"\d+", s)[:3])

    assert v(pin.group(1)) <= v(deepspeed.__version__) < v(pin.group(2)), (deepspeed.__version__, pin.groups())


def test_no_other_module_uses_a_deepspeed_private():
    """Private attributes of engines and optimizers (``engine._x``, ``optimizer._x``) only in the adapter."""
    pattern = re.compile(r"\b(engine|opt|optimizer)\._[a-z]\w*")
    hits = []
    for path in sorted((ROOT / "dalle_repro").rglob("*.py")):
        if path.name == "deepspeed.py" and path.parent.name == "train":
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line):
                hits.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()}")
    assert not hits, "\n".join(hits)


def test_torch_dataloader_private_used_by_the_loader_exists():
    """The loader shuts its worker processes down through the iterator's ``_shutdown_workers``
    (dalle_repro/data/loader.py); it must still be there."""
    from torch.utils.data.dataloader import _MultiProcessingDataLoaderIter

    assert _defines(_MultiProcessingDataLoaderIter, "_shutdown_workers")
