"""The ``geomerase`` command line.

Sub-commands::

    geomerase demo --out DIR                         whole method on the embedded default
    geomerase data build-icd --concept qr --n N ...  Implicit Concept Dataset shards
    geomerase data import --input FOLDER --out DIR   image folder + captions -> img2dataset-style shards
    geomerase classifier train --input GLOB --out D  patch classifier from ground-truth boxes
    geomerase annotate --input GLOB --detector NAME --grid G --out DIR
    geomerase train --config C [key.sub=value ...]   fine-tune (same as python -m geomerase.train)
    geomerase sample --model DIR|FILE --prompt P --negative geom --out grid.png
    geomerase export [--format single-file] MODEL OUT   diffusers folder or one original-layout .safetensors
    geomerase export --format lora|tokens MODEL OUT     a fine-tune's LoRA / location-token rows (plain diffusers)
    geomerase fetch-tokenizer                        cache CLIP's BPE table (set-up does this)
    geomerase bench erasing --preset cpu --concepts qr,watermark,text --out DIR   erasing benchmark
    geomerase bench compare RUN_A RUN_B [--tol 0]                                 same table twice?

``geomerase CMD --help`` describes every flag; the flags that set a config field take their type,
default and description from that field, and the commands that take ``key=value`` overrides
list every key with its default. The handlers are in :mod:`geomerase.commands`.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import textwrap
from typing import Any, Callable

from geomerase.commands import (DTYPES, FAST_DEMO, cmd_annotate, cmd_base_build, cmd_bench_compare, cmd_bench_erasing,
                                cmd_build_icd, cmd_demo, cmd_export, cmd_fetch_tokenizer, cmd_import_folder, cmd_sample,
                                cmd_train, cmd_train_classifier)
from geomerase.core.config import ConfigError

class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose options are added by ``fill(parser)`` the first time it parses or
    prints help: a sub-command's options come from config classes whose modules import torch, and
    ``geomerase --help`` (which shows no sub-command's options) imports none of them."""

    def __init__(self, *args: Any, fill: Callable[[argparse.ArgumentParser], None] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._fill = fill

    def _filled(self) -> None:
        fill, self._fill = self._fill, None
        if fill is not None:
            fill(self)

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> tuple[argparse.Namespace, list[str]]:
        self._filled()
        return super().parse_known_args(args, namespace)

    def format_help(self) -> str:
        self._filled()
        return super().format_help()


def _keys_epilog(p: argparse.ArgumentParser, cfg: Any, intro: str) -> None:
    """List every ``key=value`` override of ``cfg`` (a config class or instance) under ``p --help``."""
    from geomerase.core.config import config_keys_help

    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = f"{intro}\n{config_keys_help(cfg)}"


def _out_arg(p: argparse.ArgumentParser, cls: type, fallback: str) -> None:
    """``--out``: sets the config's ``out`` field when given."""
    from geomerase.core.config import field_docs

    p.add_argument("--out", default=None, help=f"{field_docs(cls)['out']} (default: {fallback})")


def _fill_demo(p: argparse.ArgumentParser) -> None:
    from geomerase.demo import DemoConfig

    _out_arg(p, DemoConfig, f"out of --config, else {DemoConfig.out}")
    p.add_argument("--config", default=None, help="YAML overriding DemoConfig fields")
    p.add_argument("--fast", action="store_true",
                   help=f"a minutes-long smoke version (no meaningful numbers): {' '.join(FAST_DEMO)}")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="DemoConfig overrides (keys below)")
    _keys_epilog(p, DemoConfig, "DemoConfig keys (key=default without --config, then what it sets):")


def _fill_data(p: argparse.ArgumentParser) -> None:
    dsub = p.add_subparsers(dest="data_cmd", required=True)
    q = dsub.add_parser("build-icd", help="write Implicit Concept Dataset shards")
    q.add_argument("--concept", choices=["qr", "watermark", "text"], required=True, help="concept overlaid on images")
    q.add_argument("--n", type=int, required=True, help="images to write")
    q.add_argument("--ratio", type=float, default=0.5, help="share of images carrying the concept (default: 0.5)")
    q.add_argument("--size", type=int, default=256, help="image side in pixels (default: 256)")
    q.add_argument("--seed", type=int, default=0, help="dataset seed; every image is a function of it (default: 0)")
    q.add_argument("--shard-size", type=int, default=1000, help="images per tar shard (default: 1000)")
    q.add_argument("--out", required=True, help="output folder of the shards")
    q.add_argument("--sizes", choices=["default", "wide"], default="default",
                   help="overlay size profile; 'wide' reaches below what OpenCV/Tesseract detect (default: default)")
    q.set_defaults(fn=cmd_build_icd)
    q = dsub.add_parser("import", help="turn an image folder with captions into img2dataset-style shards")
    q.add_argument("--input", required=True,
                   help="folder of png/jpg/jpeg/webp images (walked recursively); captions from a metadata.jsonl "
                        "(file_name, text; it wins) or a same-name .txt beside each image")
    q.add_argument("--out", required=True,
                   help="new or empty output folder: shards 00000.tar, ... and _manifest.json (every file's outcome)")
    q.add_argument("--shard-size", type=int, default=1000, help="images per tar shard, at most 10000 (default: 1000)")
    q.set_defaults(fn=cmd_import_folder)


def _fill_classifier_train(q: argparse.ArgumentParser) -> None:
    from geomerase.core.classifiers import PatchClassifierConfig
    from geomerase.core.config import add_config_args

    q.add_argument("--input", required=True, help="glob of ICD shards (their ground-truth boxes are the labels)")
    q.add_argument("--out", required=True, help="folder the classifier is saved to")
    q.add_argument("--concept", default="qr", help="concept recorded with the classifier (default: qr)")
    add_config_args(q, PatchClassifierConfig, ["resolution", "grid", "width"])
    q.add_argument("--steps", type=int, default=800, help="training steps (default: 800)")
    q.add_argument("--seed", type=int, default=0, help="seed of initialisation and batches (default: 0)")


def _fill_classifier(p: argparse.ArgumentParser) -> None:
    csub = p.add_subparsers(dest="classifier_cmd", required=True)
    q = csub.add_parser("train", help="train a patch classifier on ICD shards (ground-truth boxes)",
                        fill=_fill_classifier_train)
    q.set_defaults(fn=cmd_train_classifier)


def _fill_annotate(p: argparse.ArgumentParser) -> None:
    from geomerase.core.config import add_config_args
    from geomerase.core.geometry import GeometryConfig
    from geomerase.distributed.ray_annotate import RayAnnotateConfig

    p.add_argument("--input", required=True, help="glob of input shards")
    p.add_argument("--out", required=True, help="output folder of the annotated shards and their manifest")
    p.add_argument("--detector", default="patch-classifier",
                   help="qr, text, watermark, oracle, patch-classifier, module:Class, or several joined by commas "
                        "(default: patch-classifier)")
    p.add_argument("--classifier", default=None, help="patch-classifier folder")
    p.add_argument("--concept", default="qr", choices=["qr", "watermark", "text"],
                   help="concept for detectors that take one (oracle, patch-classifier) (default: qr)")
    p.add_argument("--concept-name", default=None, help="caption phrase of the concept (default: the ICD's name)")
    add_config_args(p, GeometryConfig, ["grid", "overlap_threshold", "mode"])
    p.add_argument("--engine", default="local", choices=["local", "ray"],
                   help="local: this process; ray: a pool of Ray actors (default: local)")
    add_config_args(p, RayAnnotateConfig, ["batch_size", "address", "num_workers"])
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="detector option, repeatable (require_decode=true, working_size=512, max_side=2048, "
                        "text-tesseract.min_conf=50)")


def _fill_train(p: argparse.ArgumentParser) -> None:
    from geomerase.train import add_arguments

    add_arguments(p)


def _fill_base_build(q: argparse.ArgumentParser) -> None:
    from geomerase.core.pretrain import BaseBuildConfig

    q.add_argument("--config", default="base32_cpu.yaml", help="BaseBuildConfig YAML or the name of a shipped config")
    q.add_argument("--until-step", type=int, default=None, help="stop after this training step (rerun to continue)")
    q.add_argument("--no-progress", action="store_true", help="no progress bars")
    q.add_argument("overrides", nargs="*", metavar="key.sub=value", help="BaseBuildConfig overrides (keys below)")
    _keys_epilog(q, BaseBuildConfig, "BaseBuildConfig keys (key=default without --config's YAML, then what it sets):")


def _fill_base(p: argparse.ArgumentParser) -> None:
    bsub = p.add_subparsers(dest="base_cmd", required=True)
    q = bsub.add_parser("build", help="corpus + pretraining (resumable) + export of a builtin base model",
                        fill=_fill_base_build)
    q.set_defaults(fn=cmd_base_build)


def _fill_sample(p: argparse.ArgumentParser) -> None:
    from geomerase.core.config import add_config_args
    from geomerase.core.sampling import SamplerConfig

    p.add_argument("--model", required=True,
                   help="model folder (a diffusers folder or a fine-tune's model/), builtin:NAME, or a single "
                        ".safetensors file (with --config-dir)")
    p.add_argument("--config-dir", default=None, metavar="DIR",
                   help="with a single-file --model: its configs and tokenizer (geomerase export --config-dir)")
    p.add_argument("--lora", default=None, metavar="DIR",
                   help="a LoRA adapter in diffusers' format (geomerase export --format lora) added to --model")
    p.add_argument("--tokens", default=None, metavar="FILE",
                   help="location-token rows (geomerase export --format tokens) written into --model's text encoder")
    p.add_argument("--grid", type=int, default=None,
                   help="G for a --model without location tokens (default: the model's, or --tokens' grid)")
    p.add_argument("--prompt", default="", help="prompt of every sample (default: the empty prompt)")
    p.add_argument("--negative", default="geom",
                   help="none, name, geom, geom-multi, geom-cells, geom-seen, or a literal prompt (default: geom)")
    p.add_argument("--concept-name", default="qr code", help="concept phrase of the negative prompt (default: qr code)")
    p.add_argument("--seen-cells", default=None, metavar="GLOB",
                   help="annotated training shards whose cell sets --negative geom-seen weights (required by it)")
    p.add_argument("--n", type=int, default=16, help="samples (default: 16)")
    p.add_argument("--seed", type=int, default=0, help="sample i uses seed + i (default: 0)")
    add_config_args(p, SamplerConfig, ["steps", "scheduler", "guidance_scale"])
    p.add_argument("--out", default="samples.png", help="grid image to write (default: samples.png)")


def _fill_export(p: argparse.ArgumentParser) -> None:
    p.add_argument("model",
                   help="model folder: a fine-tune's model/ (geomerase.json) or a diffusers SD folder with --grid")
    p.add_argument("out", help="diffusers, lora: output folder; single-file, tokens: output .safetensors file")
    p.add_argument("--format", choices=["diffusers", "single-file", "lora", "tokens"], default="diffusers",
                   help="diffusers: a StableDiffusionPipeline (SDXL: StableDiffusionXLPipeline) folder; single-file: "
                        "one .safetensors in the original Stable Diffusion key layout (model.diffusion_model., "
                        "first_stage_model., cond_stage_model.transformer.; SDXL: conditioner.embedders.0.transformer. "
                        "and OpenCLIP's conditioner.embedders.1.model.) (a LoRA merged in both); lora: the UNet "
                        "adapter of a train.lora run, for pipe.load_lora_weights(OUT); tokens: the location-token "
                        "rows as a textual-inversion file for pipe.load_textual_inversion (default: diffusers)")
    p.add_argument("--grid", type=int, default=None,
                   help="G of a folder without geomerase.json (adds G^2 location tokens) (default: the folder's)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="single-file: cast floating tensors to this type (default: as stored)")
    p.add_argument("--config-dir", default=None, metavar="DIR",
                   help="single-file: also write a weightless diffusers folder (configs, tokenizers with the location "
                        "tokens) for from_single_file(OUT, config=DIR)")


def _fill_bench_erasing(q: argparse.ArgumentParser) -> None:
    from geomerase.benchmarks.erasing import PRESETS, ErasingConfig

    q.add_argument("--preset", default="cpu", choices=sorted(PRESETS),
                   help="field overrides applied before the key=value ones (listed below) (default: cpu)")
    q.add_argument("--concepts", default=None, help="comma-separated subset of qr,watermark,text (default: all)")
    _out_arg(q, ErasingConfig, ErasingConfig.out)
    q.add_argument("overrides", nargs="*", metavar="key=value", help="ErasingConfig overrides (keys below)")
    presets = "\n".join(textwrap.fill(f"{name}: " + " ".join(f"{k}={_compact(v)}" for k, v in tree.items()), 96,
                                       initial_indent="  ", subsequent_indent=" " * 6)
                         for name, tree in PRESETS.items())
    _keys_epilog(q, ErasingConfig,
                 f"presets:\n{presets}\n\nErasingConfig keys (key=default without a preset, then what it sets):")


def _compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":")) if isinstance(value, (list, dict)) else str(value)


def _fill_bench(p: argparse.ArgumentParser) -> None:
    bsub = p.add_subparsers(dest="bench_cmd", required=True)
    q = bsub.add_parser("erasing", help="Geom-Erasing vs plain fine-tuning, NP, SLD and ESD (ICR, FID, fidelity)",
                        fill=_fill_bench_erasing)
    q.set_defaults(fn=cmd_bench_erasing)
    q = bsub.add_parser("compare", help="are two erasing runs the same table? (exit 1 listing differences)")
    q.add_argument("a", help="run folder or results.json")
    q.add_argument("b", help="run folder or results.json")
    q.add_argument("--tol", type=float, default=0.0, help="absolute tolerance on fid and fidelity (icr exact)")
    q.set_defaults(fn=cmd_bench_compare)


def build_parser() -> argparse.ArgumentParser:
    """The ``geomerase`` parser; a sub-command's options are added when it is parsed or helped."""
    ap = _Parser(prog="geomerase", description="Geom-Erasing: implicit concept removal")
    ap.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = ap.add_subparsers(dest="cmd", required=True)
    commands = [
        ("demo", "the whole method on the embedded default (CPU)", _fill_demo, cmd_demo),
        ("data", "datasets", _fill_data, None),
        ("classifier", "detectors trained on project data", _fill_classifier, None),
        ("annotate", "detect the concept and rewrite captions with location tokens", _fill_annotate, cmd_annotate),
        ("train", "fine-tune (python -m geomerase.train; torchrun/deepspeed launch that module)", _fill_train, cmd_train),
        ("base", "the shipped base models (pretrained stand-ins for Stable Diffusion)", _fill_base, None),
        ("sample", "generate a grid with a negative prompt", _fill_sample, cmd_sample),
        ("export", "write a model as a diffusers folder or one original-layout .safetensors", _fill_export, cmd_export),
        ("bench", "benchmarks", _fill_bench, None),
        ("fetch-tokenizer", "cache CLIP's BPE table for offline use", None, cmd_fetch_tokenizer),
    ]
    for name, text, fill, fn in commands:
        p = sub.add_parser(name, help=text, description=text, fill=fill)
        if fn is not None:
            p.set_defaults(fn=fn)
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO if a.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return a.fn(a)
    except (ConfigError, FileNotFoundError, KeyError, ValueError) as e:
        print(f"geomerase {a.cmd}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
