"""dalle-repro: a faithful, measured reproduction of OpenAI's DALL-E (Ramesh et al. 2021).

Modules, one concern each: ``config`` (layered typed config), ``data`` (reading shards),
``shards`` (writing them), ``emoji`` (the demo data set), ``tokenizer`` (BPE captions),
``demo`` (the main job's stages).
"""

__version__ = "0.1.0"
