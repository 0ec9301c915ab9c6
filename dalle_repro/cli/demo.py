"""The main job on the embedded demo data: scenes of coloured shapes rendered here (or the strokes set,
or the emoji: dataset=...) -> shards -> tokenizer -> dVAE -> token shards -> time plan -> prior
(deepspeed launcher, 2 CPU ranks) -> small CLIP -> reranked samples -> zero-shot evaluation -> report.

Usage: python launch/demo.py [--config configs/demo/demo.yaml] [key.sub=value ...]
Finished stages are skipped, so a rerun after an interruption continues where it stopped: SIGTERM or
Ctrl-C ends a training stage's update with a checkpoint (exit status 0), and the same command goes on
from it. Seeds of one run's training and sampling, e.g. the second of three:
  python launch/demo.py out_dir=outputs/demo-s1 tokens_output=data/shapes_tokens_s1
      'dvae_overrides=[run.seed=1]' 'prior_overrides=[run.seed=1]' clip.run.seed=1 evaluation.sample.seed=1
"""

from __future__ import annotations

import json
import logging
import sys

from dalle_repro.core.cli import parse_cli
from dalle_repro.core.config import ConfigError
from dalle_repro.demo.config import DemoConfig, data_dir
from dalle_repro.demo.pipeline import DemoStopped, run_demo
from dalle_repro.train.dvae import CodebookCollapsed
from dalle_repro.train.loop import StopRequested


def main(argv: list[str] | None = None) -> int:
    cfg, flags = parse_cli(DemoConfig, argv, __doc__ or "", default_config="configs/demo/demo.yaml")
    if cfg is None:
        return 0
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    stop = StopRequested()  # SIGTERM/SIGINT: the training stage ends with a checkpoint, the command exits 0
    stop.install()
    try:
        results = run_demo(cfg, allow_pipe=flags["allow_pipe"], stop=stop)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except DemoStopped as e:
        print(str(e), file=sys.stderr)
        return 0
    except CodebookCollapsed as e:  # a dead tokenizer: stop before the prior trains on nothing
        print(
            f"error: {e}\nThe demo resumes a dVAE run only with the same settings: a changed setting (for "
            "example 'dvae_overrides=[run.seed=1]') starts its dVAE again.",
            file=sys.stderr,
        )
        return 3
    for name, r in results.items():
        print(
            f"{name:10s} "
            + json.dumps({k: v for k, v in r.items() if k not in ("captions", "fingerprint", "prompts", "settings")})
        )
    data = data_dir(cfg)
    print(f"\noutputs:\n  shards     {data}/train/*.tar, {data}/val/*.tar")
    print(f"  summary    {data}/summary.json\n  tokenizer  {cfg.text.path}")
    print(f"  preview    {results['preview']['preview']}")
    print(f"  dVAE       {results['dvae']['model']}  (reconstructions: {results['dvae']['grid']})")
    print(f"  tokens     {results['tokens']['output']}/train/*.tar, {results['tokens']['output']}/val/*.tar")
    print(f"  prior      {results['prior']['model']}  (log: {results['prior']['log']})")
    print(f"  CLIP       {results['clip']['model']}")
    print(f"  samples    {cfg.out_dir}/samples/*.png, {cfg.out_dir}/samples/samples.json")
    print(f"  report     {cfg.out_dir}/report.md, {cfg.out_dir}/report.html")
    print(f"  config     {cfg.out_dir}/config.yaml")
    return 0


if __name__ == "__main__":
    sys.exit(main())
