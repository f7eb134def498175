"""The ``geomerase`` command line.

Sub-commands::

    geomerase demo --out DIR                         whole method on the embedded default
    geomerase data build-icd --concept qr --n N ...  Implicit Concept Dataset shards
    geomerase classifier train --input GLOB --out D  patch classifier from ground-truth boxes
    geomerase annotate --input GLOB --detector NAME --grid G --out DIR
    geomerase train --config C [key.sub=value ...]   fine-tune (same as python -m geomerase.train)
    geomerase sample --model DIR --prompt P --negative geom --out grid.png
    geomerase fetch-tokenizer                        cache CLIP's BPE table (set-up does this)
    geomerase bench erasing --preset cpu --concepts qr,watermark,text --out DIR   erasing benchmark
    geomerase bench compare RUN_A RUN_B [--tol 0]                                 same table twice?
"""
from __future__ import annotations

import argparse
import json
import logging
import sys

from geomerase.core.config import ConfigError


def _demo(a: argparse.Namespace) -> int:
    from geomerase.core.config import load_config
    from geomerase.demo import DemoConfig, run_demo

    overrides = [f"out={a.out}"] + list(a.overrides)
    if a.fast:
        overrides = ["n_train=600", "n_heldout=200", "n_aux=400", "steps=40", "samples=16", "classifier_steps=100",
                     "sample_steps=10"] + overrides
    cfg = load_config(DemoConfig, a.config, overrides)
    run_demo(cfg)
    return 0


def _build_icd(a: argparse.Namespace) -> int:
    from geomerase.data.icd import build_icd

    summary = build_icd(a.concept, a.n, a.ratio, a.size, a.seed, a.out, a.shard_size, sizes=a.sizes)
    print(json.dumps({k: v for k, v in summary.items() if k != "shards"}, sort_keys=True))
    return 0


def _train_classifier(a: argparse.Namespace) -> int:
    import torch

    from geomerase.core.classifiers import PatchClassifierConfig, save_classifier, train_patch_classifier
    from geomerase.core.geometry import GeometryConfig, GridEncoder
    from geomerase.data.loader import InMemoryDataset

    pcfg = PatchClassifierConfig(resolution=a.resolution, grid=a.grid, width=a.width)
    ds = InMemoryDataset(a.input, a.resolution)
    enc = GridEncoder(GeometryConfig(grid=a.grid, overlap_threshold=pcfg.overlap_threshold))
    cov = torch.stack([torch.from_numpy(enc.coverage(m.get("boxes", []), w, h)).float()
                       for m, (w, h) in zip(ds.metas, ds.sizes)])
    model = train_patch_classifier(pcfg, ds.images, cov, steps=a.steps, seed=a.seed)
    save_classifier(model, a.out, {"concept": a.concept})
    print(f"patch classifier saved to {a.out}")
    return 0


def _annotate_options(items: list[str]) -> dict[str, str]:
    opts: dict[str, str] = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ValueError(f"--option {item!r}: expected key=value (e.g. require_decode=true, text.min_conf=50)")
        opts[key.strip()] = value.strip()
    return opts


def _annotate(a: argparse.Namespace) -> int:
    import time

    from geomerase.core.annotate import annotate_shards, throughput_line
    from geomerase.core.geometry import GeometryConfig
    from geomerase.distributed.ray_annotate import AnnotatorSpec, RayAnnotateConfig, annotate_shards_ray

    geometry = GeometryConfig(grid=a.grid, overlap_threshold=a.overlap_threshold, mode=a.mode)
    geometry.validate()
    options = _annotate_options(a.option)
    if a.classifier:
        options["classifier"] = a.classifier
    spec = AnnotatorSpec(detector=a.detector, concept=a.concept, options=options, concept_name=a.concept_name,
                         geometry=geometry)
    if a.engine == "ray":
        cfg = RayAnnotateConfig(num_workers=a.num_workers, address=a.address, batch_size=a.batch_size)
        manifest = annotate_shards_ray(spec, a.input, a.out, cfg)
    else:
        if a.address is not None:
            raise ValueError("--address needs --engine ray")
        t0 = time.perf_counter()
        manifest = annotate_shards(spec.build(), a.input, a.out, a.batch_size)
        run = manifest.get("last_run", {})
        if run.get("shards_done"):
            print(throughput_line(run["images"], run["seconds"], "local") +
                  f" (+{time.perf_counter() - t0 - run['seconds']:.1f} s loading the detector)")
    print(json.dumps(manifest["totals"], sort_keys=True))
    return 0


def _train(a: argparse.Namespace) -> int:
    from geomerase.train import main as train_main

    return train_main(["--config", a.config, *(["--resume", a.resume] if a.resume else []),
                       *(["--no-progress"] if a.no_progress else []), *a.overrides])


def _base_build(a: argparse.Namespace) -> int:
    from geomerase.core.config import load_config
    from geomerase.core.pretrain import BaseBuildConfig, build_base

    cfg = load_config(BaseBuildConfig, a.config, list(a.overrides))
    record = build_base(cfg, until_step=a.until_step, progress=not a.no_progress)
    print(json.dumps(record, indent=1))
    return 0


def _sample(a: argparse.Namespace) -> int:

    from geomerase.core.captions import NEGATIVE_KINDS, negative_mixture
    from geomerase.core.metrics import sample_grid
    from geomerase.core.models import load_model
    from geomerase.core.sampling import SamplerConfig, sample, to_uint8

    model = load_model(a.model)
    negs, weights = (negative_mixture(a.negative, a.concept_name, model.grid) if a.negative in NEGATIVE_KINDS
                     else ([a.negative], [1.0]))
    prompts = [a.prompt] * a.n
    imgs = sample(model, prompts, negs, range(a.seed, a.seed + a.n),
                  SamplerConfig(scheduler=a.scheduler, steps=a.steps, guidance_scale=a.guidance_scale), progress=True,
                  neg_weights=weights)
    path = sample_grid(to_uint8(imgs), a.out, grid=model.grid, cols=min(8, a.n), title=f"{a.prompt!r} neg={negs}")
    print(f"wrote {path}")
    return 0


def _bench_erasing(a: argparse.Namespace) -> int:
    from geomerase.benchmarks.erasing import erasing_config, run_erasing

    concepts = [c.strip() for c in a.concepts.split(",") if c.strip()] if a.concepts else None
    cfg = erasing_config(a.preset, list(a.overrides), out=a.out, concepts=concepts)
    run_erasing(cfg)
    return 0


def _bench_compare(a: argparse.Namespace) -> int:
    from geomerase.benchmarks.compare_results import main

    return main(a.a, a.b, a.tol)


def _fetch_tokenizer(a: argparse.Namespace) -> int:
    from geomerase.core.tokenizer import main

    main()
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="geomerase", description="Geom-Erasing: implicit concept removal")
    ap.add_argument("-v", "--verbose", action="store_true")
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("demo", help="the whole method on the embedded default (CPU)")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--config", default=None, help="YAML overriding DemoConfig fields")
    p.add_argument("--fast", action="store_true", help="a minutes-long smoke version (no meaningful numbers)")
    p.add_argument("overrides", nargs="*", help="DemoConfig overrides, key=value")
    p.set_defaults(fn=_demo)

    p = sub.add_parser("data", help="datasets")
    dsub = p.add_subparsers(dest="data_cmd", required=True)
    q = dsub.add_parser("build-icd", help="write Implicit Concept Dataset shards")
    q.add_argument("--concept", choices=["qr", "watermark", "text"], required=True)
    q.add_argument("--n", type=int, required=True)
    q.add_argument("--ratio", type=float, default=0.5)
    q.add_argument("--size", type=int, default=256)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--shard-size", type=int, default=1000)
    q.add_argument("--out", required=True)
    q.add_argument("--sizes", choices=["default", "wide"], default="default",
                   help="overlay size profile; 'wide' reaches below what OpenCV/Tesseract detect")
    q.set_defaults(fn=_build_icd)

    p = sub.add_parser("classifier", help="detectors trained on project data")
    csub = p.add_subparsers(dest="classifier_cmd", required=True)
    q = csub.add_parser("train", help="train a patch classifier on ICD shards (ground-truth boxes)")
    q.add_argument("--input", required=True)
    q.add_argument("--out", required=True)
    q.add_argument("--concept", default="qr")
    q.add_argument("--grid", type=int, default=4)
    q.add_argument("--resolution", type=int, default=32)
    q.add_argument("--width", type=int, default=16)
    q.add_argument("--steps", type=int, default=800)
    q.add_argument("--seed", type=int, default=0)
    q.set_defaults(fn=_train_classifier)

    p = sub.add_parser("annotate", help="detect the concept and rewrite captions with location tokens")
    p.add_argument("--input", required=True, help="glob of input shards")
    p.add_argument("--out", required=True)
    p.add_argument("--detector", default="patch-classifier",
                   help="qr, text, watermark, oracle, patch-classifier, module:Class, or several joined by commas")
    p.add_argument("--classifier", default=None, help="patch-classifier folder")
    p.add_argument("--concept", default="qr", choices=["qr", "watermark", "text"])
    p.add_argument("--concept-name", default=None)
    p.add_argument("--grid", type=int, default=4)
    p.add_argument("--overlap-threshold", type=float, default=0.25)
    p.add_argument("--mode", choices=["cells", "corner"], default="cells")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--engine", default="local", choices=["local", "ray"])
    p.add_argument("--address", default=None,
                   help="ray engine: 'auto' or HOST:PORT of a running cluster (default: embedded local Ray)")
    p.add_argument("--num-workers", type=int, default=2, help="ray engine: actors (one CPU each)")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="detector option, repeatable (require_decode=true, min_conf=50, text.min_height=8)")
    p.set_defaults(fn=_annotate)

    p = sub.add_parser("train", help="fine-tune (python -m geomerase.train; torchrun/deepspeed launch that module)")
    p.add_argument("--config", required=True)
    p.add_argument("--resume", default=None, help="'latest' or a checkpoint folder")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("overrides", nargs="*", help="key.sub=value")
    p.set_defaults(fn=_train)

    p = sub.add_parser("base", help="the shipped base models (pretrained stand-ins for Stable Diffusion)")
    bsub = p.add_subparsers(dest="base_cmd", required=True)
    q = bsub.add_parser("build", help="corpus + pretraining (resumable) + export of a builtin base model")
    q.add_argument("--config", default="base32_cpu.yaml", help="BaseBuildConfig YAML or the name of a shipped config")
    q.add_argument("--until-step", type=int, default=None, help="stop after this training step (rerun to continue)")
    q.add_argument("--no-progress", action="store_true", help="no progress bars")
    q.add_argument("overrides", nargs="*", help="BaseBuildConfig overrides, key.sub=value")
    q.set_defaults(fn=_base_build)

    p = sub.add_parser("sample", help="generate a grid with a negative prompt")
    p.add_argument("--model", required=True)
    p.add_argument("--prompt", default="")
    p.add_argument("--negative", default="geom", help="none, name, geom, geom-multi, geom-cells, geom-seen, or a literal prompt")
    p.add_argument("--concept-name", default="qr code")
    p.add_argument("--n", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--scheduler", choices=["ddim", "dpm"], default="ddim")
    p.add_argument("--guidance-scale", type=float, default=3.0)
    p.add_argument("--out", default="samples.png")
    p.set_defaults(fn=_sample)

    p = sub.add_parser("bench", help="benchmarks")
    bsub = p.add_subparsers(dest="bench_cmd", required=True)
    q = bsub.add_parser("erasing", help="Geom-Erasing vs plain fine-tuning, NP, SLD and ESD (ICR, FID, fidelity)")
    q.add_argument("--preset", default="cpu", help="smoke, cpu or gpu (geomerase.benchmarks.erasing.PRESETS)")
    q.add_argument("--concepts", default=None, help="comma-separated subset of qr,watermark,text (default: all)")
    q.add_argument("--out", default=None, help="output folder (default: the preset's)")
    q.add_argument("overrides", nargs="*", help="ErasingConfig overrides, key=value")
    q.set_defaults(fn=_bench_erasing)
    q = bsub.add_parser("compare", help="are two erasing runs the same table? (exit 1 listing differences)")
    q.add_argument("a", help="run folder or results.json")
    q.add_argument("b", help="run folder or results.json")
    q.add_argument("--tol", type=float, default=0.0, help="absolute tolerance on fid and fidelity (icr exact)")
    q.set_defaults(fn=_bench_compare)

    p = sub.add_parser("fetch-tokenizer", help="cache CLIP's BPE table offline use")
    p.set_defaults(fn=_fetch_tokenizer)
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
