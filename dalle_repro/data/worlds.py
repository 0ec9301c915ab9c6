"""The synthetic worlds the evaluation can read back: the shapes set and the strokes set.

Each world is a module with the same grammar and reader interface (``parse_caption``, ``read_scene``,
``score``, ``similarity``, ``ATTRIBUTES``), so the evaluation (evaluation/tasks.py, evaluate.py)
takes either by name. Their vocabularies differ (sizes small/big against thin/thick, shapes against
stroke forms), so a caption belongs to one world at most: :func:`world_of` tells which.
"""

from __future__ import annotations

import importlib
from types import ModuleType

WORLDS = {"shapes": "dalle_repro.data.shapes", "strokes": "dalle_repro.data.strokes"}


def world_of(caption_or_name: str | ModuleType) -> ModuleType:
    """The world module of a name in :data:`WORLDS` (or a world module itself), else the world whose
    grammar parses the caption; ValueError naming the worlds for anything else."""
    if isinstance(caption_or_name, ModuleType):
        if caption_or_name.__name__ not in WORLDS.values():
            raise ValueError(f"{caption_or_name.__name__} is not a world; the worlds are {sorted(WORLDS)}")
        return caption_or_name
    if caption_or_name in WORLDS:
        return importlib.import_module(WORLDS[caption_or_name])
    for module in WORLDS.values():
        world = importlib.import_module(module)
        try:
            world.parse_caption(caption_or_name)
        except ValueError:
            continue
        return world
    raise ValueError(f"{caption_or_name!r} is neither a world ({', '.join(WORLDS)}) nor a caption of one")


def world_name(world: str | ModuleType) -> str:
    """The name in :data:`WORLDS` of a world given by name, module or caption."""
    module = world_of(world).__name__
    return next(name for name, m in WORLDS.items() if m == module)
