"""``python -m geomerase.train --config configs/tiny_cpu.yaml [key.sub=value ...] [--resume latest]``.

Loads a :class:`~geomerase.core.trainer.RunConfig` strictly (unknown keys and wrong
types are errors naming the file and key) and runs the single-process loop.
"""
from __future__ import annotations

import argparse
import logging
import sys

from geomerase.core.config import ConfigError, load_config
from geomerase.core.trainer import RunConfig, Trainer


def parse(argv: list[str] | None = None) -> tuple[RunConfig, argparse.Namespace]:
    ap = argparse.ArgumentParser(prog="geomerase train", description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True, help="YAML file or the name of a shipped config")
    ap.add_argument("--resume", default=None, help="'latest' or a checkpoint folder")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("overrides", nargs="*", help="key.sub=value")
    a = ap.parse_args(argv)
    overrides = list(a.overrides) + ([f"resume={a.resume}"] if a.resume else [])
    return load_config(RunConfig, a.config, overrides), a


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg, a = parse(argv)
    except ConfigError as e:
        print(f"geomerase train: config error: {e}", file=sys.stderr)
        return 2
    Trainer(cfg).fit(progress=not a.no_progress)
    print(f"model saved to {cfg.out_dir}/model")
    return 0


if __name__ == "__main__":
    sys.exit(main())
