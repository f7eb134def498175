"""``python -m geomerase.train --config configs/tiny_cpu.yaml [key.sub=value ...] [--resume latest]``.

Loads a :class:`~geomerase.core.trainer.RunConfig` strictly (unknown keys and wrong
types are errors naming the file and key) and runs the loop on the configured backend:
one process (``train.backend=local``) or DeepSpeed ZeRO (``train.backend=deepspeed``),
launched as one process or by ``torchrun`` / ``deepspeed``::

    torchrun --nproc_per_node 2 -m geomerase.train --config configs/tiny_cpu_zero2.yaml out_dir=runs/z2
    deepspeed --hostfile hostfile --num_gpus 8 -m geomerase.train --config configs/sd15_h100_zero2.yaml
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

from geomerase.core.config import ConfigError, add_config_args, config_keys_help, load_config
from geomerase.core.trainer import RunConfig, Trainer


def add_arguments(ap: argparse.ArgumentParser) -> None:
    """The options of ``geomerase train`` and ``python -m geomerase.train``; ``--help`` lists every
    RunConfig key with its default."""
    ap.add_argument("--config", required=True, help="RunConfig YAML or the name of a shipped config")
    add_config_args(ap, RunConfig, ["resume"])
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    # The deepspeed launcher appends --local_rank=N; LOCAL_RANK in the environment says the same.
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*", metavar="key.sub=value", help="RunConfig overrides (keys below)")
    ap.formatter_class = argparse.RawDescriptionHelpFormatter
    ap.epilog = f"RunConfig keys (key=default, then what it sets):\n{config_keys_help(RunConfig)}"


def parse(argv: list[str] | None = None) -> tuple[RunConfig, argparse.Namespace]:
    ap = argparse.ArgumentParser(prog="geomerase train", description=__doc__.splitlines()[0])
    add_arguments(ap)
    a = ap.parse_args(argv)
    if a.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(a.local_rank))
    overrides = list(a.overrides) + ([f"resume={a.resume}"] if a.resume else [])
    return load_config(RunConfig, a.config, overrides), a


def main(argv: list[str] | None = None) -> int:
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(levelname)s %(name)s[{rank}]: %(message)s")
    try:
        cfg, a = parse(argv)
    except ConfigError as e:
        print(f"geomerase train: config error: {e}", file=sys.stderr)
        return 2
    if cfg.train.backend == "deepspeed":
        try:
            import geomerase.distributed.deepspeed_engine  # noqa: F401  (registers the backend)
        except ImportError as e:
            print(f"geomerase train: train.backend=deepspeed needs the 'distributed' extra "
                  f"(pip install -e .[distributed]): {e}", file=sys.stderr)
            return 2
    try:
        trainer = Trainer(cfg)
        try:
            trainer.fit(progress=not a.no_progress)
        finally:
            trainer.backend.shutdown()
    except (ConfigError, FileNotFoundError, KeyError, ValueError) as e:
        # Bad input (a missing shard, a wrong value): one line, from rank 0 only.
        if rank == 0:
            print(f"geomerase train: error: {e}", file=sys.stderr)
        return 2
    if trainer.is_main:
        print(f"model saved to {cfg.out_dir}/model")
    return 0


if __name__ == "__main__":
    rc = main()
    # Interpreter teardown (a full GC over torch/diffusers/DeepSpeed objects) took minutes per rank
    # on a loaded 2-core machine; every file is closed by now, so leave directly.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)
