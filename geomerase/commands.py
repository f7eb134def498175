"""What each ``geomerase`` sub-command does, given its parsed arguments (:mod:`geomerase.cli` builds
the parser and dispatches here). Every handler imports its subsystem on call, so parsing and
``--help`` stay light; each returns the process exit code.
"""
from __future__ import annotations

import argparse
import json

# ``geomerase demo --fast``: DemoConfig overrides placed before the user's own.
FAST_DEMO = ["n_train=600", "n_heldout=200", "n_aux=400", "steps=40", "samples=16", "classifier_steps=100",
             "sample_steps=10"]


def cmd_demo(a: argparse.Namespace) -> int:
    from geomerase.core.config import load_config
    from geomerase.demo import DemoConfig, run_demo

    overrides = ([f"out={a.out}"] if a.out is not None else []) + list(a.overrides)
    if a.fast:
        overrides = FAST_DEMO + overrides
    cfg = load_config(DemoConfig, a.config, overrides)
    run_demo(cfg)
    return 0


def cmd_build_icd(a: argparse.Namespace) -> int:
    from geomerase.data.icd import build_icd

    summary = build_icd(a.concept, a.n, a.ratio, a.size, a.seed, a.out, a.shard_size, sizes=a.sizes)
    print(json.dumps({k: v for k, v in summary.items() if k != "shards"}, sort_keys=True))
    return 0


def cmd_import_folder(a: argparse.Namespace) -> int:
    from geomerase.data.importer import import_folder

    manifest = import_folder(a.input, a.out, a.shard_size)
    print(json.dumps(manifest["counts"], sort_keys=True))
    return 0


def cmd_train_classifier(a: argparse.Namespace) -> int:
    from geomerase.core.classifiers import (PatchClassifierConfig, coverage_targets, save_classifier,
                                            train_patch_classifier)
    from geomerase.data.loader import InMemoryDataset

    pcfg = PatchClassifierConfig(resolution=a.resolution, grid=a.grid, width=a.width)
    ds = InMemoryDataset(a.input, a.resolution)
    cov = coverage_targets(ds.metas, ds.sizes, a.grid, pcfg.overlap_threshold)
    model = train_patch_classifier(pcfg, ds.images, cov, steps=a.steps, seed=a.seed)
    save_classifier(model, a.out, {"concept": a.concept})
    print(f"patch classifier saved to {a.out}")
    return 0


def annotate_options(items: list[str]) -> dict[str, str]:
    opts: dict[str, str] = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ValueError(f"--option {item!r}: expected key=value (e.g. require_decode=true, text.min_conf=50)")
        opts[key.strip()] = value.strip()
    return opts


def cmd_annotate(a: argparse.Namespace) -> int:
    import time

    from geomerase.core.annotate import annotate_shards, throughput_line
    from geomerase.core.geometry import GeometryConfig
    from geomerase.distributed.ray_annotate import AnnotatorSpec, RayAnnotateConfig, annotate_shards_ray

    geometry = GeometryConfig(grid=a.grid, overlap_threshold=a.overlap_threshold, mode=a.mode)
    geometry.validate()
    options = annotate_options(a.option)
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


def cmd_train(a: argparse.Namespace) -> int:
    from geomerase.train import main as train_main

    return train_main(["--config", a.config, *(["--resume", a.resume] if a.resume else []),
                       *(["--no-progress"] if a.no_progress else []), *a.overrides])


def cmd_base_build(a: argparse.Namespace) -> int:
    from geomerase.core.config import load_config
    from geomerase.core.pretrain import BaseBuildConfig, build_base

    cfg = load_config(BaseBuildConfig, a.config, list(a.overrides))
    record = build_base(cfg, until_step=a.until_step, progress=not a.no_progress)
    print(json.dumps(record, indent=1))
    return 0


def cmd_sample(a: argparse.Namespace) -> int:
    from geomerase.core.captions import NEGATIVE_KINDS, negative_mixture
    from geomerase.core.metrics import sample_grid
    from geomerase.core.sampling import SamplerConfig, sample, to_uint8
    from geomerase.data.loader import annotated_cells

    if a.negative == "geom-seen" and not a.seen_cells:
        raise ValueError("--negative geom-seen needs --seen-cells GLOB: the annotated training shards it weights")
    if a.seen_cells and a.negative != "geom-seen":
        raise ValueError("--seen-cells is only used by --negative geom-seen")
    model = sampling_model(a)
    seen = annotated_cells(a.seen_cells, model.grid) if a.seen_cells else []
    if a.seen_cells and not seen:
        raise ValueError(f"--seen-cells {a.seen_cells!r}: no sample in those shards has annotated cells")
    negs, weights = (negative_mixture(a.negative, a.concept_name, model.grid, seen, tokenizer=model.tokenizer)
                     if a.negative in NEGATIVE_KINDS else ([a.negative], [1.0]))
    prompts = [a.prompt] * a.n
    imgs = sample(model, prompts, negs, range(a.seed, a.seed + a.n),
                  SamplerConfig(scheduler=a.scheduler, steps=a.steps, guidance_scale=a.guidance_scale), progress=True,
                  neg_weights=weights)
    path = sample_grid(to_uint8(imgs), a.out, grid=model.grid, cols=min(8, a.n), title=f"{a.prompt!r} neg={negs}")
    print(f"wrote {path}")
    return 0


def sampling_model(a: argparse.Namespace):
    """``--model`` (a folder, ``builtin:NAME`` or a single file with ``--config-dir``), with ``--tokens`` rows and
    a ``--lora`` adapter on top."""
    import tempfile
    from pathlib import Path

    from geomerase.core.builtin import resolve_pretrained
    from geomerase.core.export import load_location_tokens
    from geomerase.core.lora import load_unet_lora
    from geomerase.core.models import load_model

    grid = a.grid
    if a.tokens and grid is None:
        from safetensors import safe_open

        with safe_open(a.tokens, "pt") as f:
            grid = int((f.metadata() or {}).get("grid", 0)) or None
    if a.model.endswith(".safetensors"):
        from geomerase.core.single_file import single_file_folder

        if not a.config_dir:
            raise ValueError(f"--model {a.model}: a single file needs --config-dir (geomerase export --format "
                             "single-file --config-dir DIR writes it)")
        with tempfile.TemporaryDirectory() as tmp:
            model = load_model(single_file_folder(a.model, a.config_dir, Path(tmp) / "model"), grid=grid)
    elif a.config_dir:
        raise ValueError("--config-dir applies to a single-file --model (.safetensors)")
    else:
        model = load_model(resolve_pretrained(a.model), grid=grid)
    if a.tokens:
        load_location_tokens(model, a.tokens)
    if a.lora:
        load_unet_lora(model.unet, Path(a.lora))
    return model


DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def cmd_export(a: argparse.Namespace) -> int:
    import torch

    from geomerase.core.models import load_model

    if a.format != "single-file" and (a.dtype or a.config_dir):
        raise ValueError("--dtype and --config-dir apply to --format single-file")
    model = load_model(a.model, grid=a.grid)
    if a.format != "single-file":
        from geomerase.core.export import export_lora, export_pipeline, save_location_tokens

        writers = {"diffusers": export_pipeline, "lora": export_lora, "tokens": save_location_tokens}
        print(f"wrote {writers[a.format](model, a.out)}")
        return 0
    from geomerase.core.lora import merge_unet_lora
    from geomerase.core.single_file import export_single_file, write_pipeline_config

    merge_unet_lora(model.unet)  # a LoRA fine-tune's full weights

    dtype = getattr(torch, DTYPES[a.dtype]) if a.dtype else None
    print(f"wrote {export_single_file(model, a.out, dtype)}")
    if a.config_dir:
        print(f"wrote {write_pipeline_config(model, a.config_dir)}")
    return 0


def cmd_bench_erasing(a: argparse.Namespace) -> int:
    from geomerase.benchmarks.erasing import erasing_config
    from geomerase.benchmarks.erasing_run import run_erasing

    concepts = [c.strip() for c in a.concepts.split(",") if c.strip()] if a.concepts else None
    cfg = erasing_config(a.preset, list(a.overrides), out=a.out, concepts=concepts)
    run_erasing(cfg)
    return 0


def cmd_bench_compare(a: argparse.Namespace) -> int:
    from geomerase.benchmarks.compare_results import main

    return main(a.a, a.b, a.tol)


def cmd_fetch_tokenizer(a: argparse.Namespace) -> int:
    from geomerase.core.tokenizer import main

    main()
    return 0
