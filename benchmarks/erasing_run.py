"""Planning and running ``geomerase bench erasing``: every stage as a task of one DAG.

:func:`plan` lists the tasks of a :class:`~geomerase.benchmarks.erasing.ErasingConfig` (data
splits, classifiers and annotation, fine-tunes, oracles, sampling, scoring) with their inputs,
outputs and relative costs; :func:`run_erasing` runs them with
:func:`geomerase.distributed.dag.run_dag` (one 1-thread process per core; a task whose outputs
exist is skipped, so a rerun resumes) and writes the report.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch

from geomerase.benchmarks.erasing import PROMPT_SETS, ErasingConfig, Layout
from geomerase.benchmarks.erasing_report import score_concept, write_outputs
from geomerase.core.captions import CaptionConfig, negative_mixture
from geomerase.core.config import to_dict
from geomerase.core.guidance import SLD_PRESETS
from geomerase.core.models import ModelConfig
from geomerase.core.trainer import RunConfig, TrainConfig, resolve_device
from geomerase.data.concepts import CONCEPT_NAMES
from geomerase.data.loader import DataConfig
from geomerase.data.scenes import BACKGROUNDS, SHAPES
from geomerase.data.shards import atomic_write
from geomerase.distributed.dag import Job, Task, pool_shape, run_dag
from geomerase.stages import (ArmSpec, annotate_job, attribute_classifier_job, build_icd_job, esd_job,
                              patch_classifier_job, progress_file, sample_job, samples_path, train_model_job)


def _train_rc(cfg: ErasingConfig, run_dir: Path, shards: str, captions: CaptionConfig, *, mode: str = "data-removal",
              steps: int | None = None, lr: float | None = None, pretrained: str | None = None,
              alpha: float | None = None, align: float = 0.0) -> RunConfig:
    steps = steps or cfg.steps
    # From the given base (not a base this run trained): frozen text encoder, base unconditional branch.
    from_base = pretrained is not None and pretrained in cfg.pretrained.values() and mode == "data-removal"
    return RunConfig(
        out_dir=str(run_dir),
        model=ModelConfig(size=cfg.model_size, grid=cfg.grid, seed=cfg.seed, attention_backend=cfg.attention_backend,
                          pretrained=pretrained),
        data=DataConfig(shards=shards, batch_size=cfg.batch_size),
        captions=captions,
        train=TrainConfig(mode=mode, max_steps=steps, lr=cfg.lr, loc_lr=lr or cfg.loc_lr, seed=cfg.seed, reweight_alpha=alpha,
                          attn_align_weight=align, warmup_steps=min(50, max(steps // 10, 1)), device=cfg.device,
                          log_every=max(1, min(25, steps)),
                          save_every=max(steps // 2, 1), train_text_encoder=not from_base,
                          uncond_prior=from_base and cfg.uncond_prior),
        resume="latest")


def geom_captions() -> CaptionConfig:
    """The geom models' caption variants (the demo's: varied order, concept-only captions, shuffled cells)."""
    return CaptionConfig(mode="geom", concept_first_prob=0.2, concept_only_prob=0.1, shuffle_cells=True, dropout=0.1)


def held_out_prompts(cfg: ErasingConfig, lay: Layout) -> list[str]:
    """The first ``samples`` captions of the concept-free held-out split (unseen scenes)."""
    from geomerase.data.shards import iter_samples

    caps = [s.meta.get("caption_clean", s.caption) for s in iter_samples(lay.glob("clean_heldout", "qr"))]
    if len(caps) < cfg.samples:
        raise ValueError(f"held-out split has {len(caps)} captions, need {cfg.samples}")
    return caps[:cfg.samples]


def sampling_arms(cfg: ErasingConfig, c: str, prompts: dict[str, list[str]]) -> dict[tuple[str, str], list[ArmSpec]]:
    """``{(model, prompt set): [ArmSpec]}`` of one concept (oracle arms are concept-free)."""
    name = CONCEPT_NAMES[c]
    sld = {**asdict(SLD_PRESETS[cfg.sld_preset]), "mu_rule": cfg.sld_mu_rule}
    out: dict[tuple[str, str], list[ArmSpec]] = {}
    for pset in PROMPT_SETS:
        for arm, (model, kind, use_sld) in cfg.active_arms().items():
            negs, w = negative_mixture(kind, name, cfg.grid)
            out.setdefault((model, pset), []).append(
                ArmSpec(arm, prompts[pset], negs, w, cfg.guidance_scale, name if use_sld else None,
                        sld if use_sld else {}))
    k = cfg.sweep_samples
    for scale in cfg.guidance_sweep:
        for arm, model, kind in (("np", "plain", "name"), ("geom", "geom", "geom")):
            negs, w = negative_mixture(kind, name, cfg.grid)
            out[(model, "heldout")].append(ArmSpec(f"{arm}@{scale:g}", prompts["heldout"][:k], negs, w, scale))
    return out


def plan(cfg: ErasingConfig, lay: Layout, prompts_fn: Callable[[], dict[str, list[str]]]) -> dict[str, Task]:
    """Every task of the run, in priority order (concept by concept). ``prompts_fn()``: the prompt
    sets (read lazily: the held-out split may not exist yet when the plan is first made)."""
    tasks = _shared_data_tasks(cfg, lay)
    trained_base = _base_task(cfg, lay, tasks)
    oracles: set[str] = set()
    for c in cfg.concepts:
        base_model = cfg.pretrained.get(c) or trained_base
        base_deps = ("base/train",) if trained_base else ()
        tasks.update(_concept_data_tasks(cfg, lay, c))
        tasks.update(_classifier_tasks(cfg, lay, c))
        tasks.update(_fine_tune_tasks(cfg, lay, c, base_model, base_deps))
        ok = f"oracle-{cfg.base_key(c)}"
        files = sample_files(cfg, lay, c, prompts_fn())
        if ok not in oracles:
            tasks.update(_oracle_tasks(cfg, lay, c, ok, base_model, base_deps, prompts_fn(), files))
        tasks.update(_sample_tasks(cfg, lay, c, ok, ok in oracles, prompts_fn(), files))
        sample_deps = [k for k in tasks if k.startswith((f"{c}/sample/", f"{ok}/sample/"))]
        tasks[f"{c}/score"] = Task(Job(score_concept, (cfg, c, files)), inline=True,
                                   deps=(*sample_deps, f"{c}/scorer", f"{c}/attributes", f"{c}/data/heldout",
                                         f"{c}/annotator"),
                                   outputs=(str(lay.concept(c) / "scores.json"),))
        oracles.add(ok)
    return tasks


def _meta(lay: Layout, split: str, c: str) -> tuple[str]:
    return (str(lay.icd(split) / f"icd-{c}-meta.json"),)


def _shared_data_tasks(cfg: ErasingConfig, lay: Layout) -> dict[str, Task]:
    """The concept-free splits, shared: the same scenes as every concept's splits (same seeds)."""
    return {
        "data/clean_heldout": Task(Job(build_icd_job, ("qr", cfg.n_heldout, 0.0, cfg.image_size, cfg.seed + 1000,
                                                       str(lay.icd("clean_heldout")))),
                                   outputs=_meta(lay, "clean_heldout", "qr")),
        "data/clean_train": Task(Job(build_icd_job, ("qr", cfg.n_train, 0.0, cfg.image_size, cfg.seed,
                                                     str(lay.icd("clean_train")))),
                                 outputs=_meta(lay, "clean_train", "qr"), cost=3)}


def _base_task(cfg: ErasingConfig, lay: Layout, tasks: dict[str, Task]) -> str | None:
    """With ``base_steps``: the shared base trained on the concept-free split; returns its model folder."""
    if not cfg.base_steps:
        return None
    rc = _train_rc(cfg, lay.model_dir("", "base"), lay.glob("clean_train", "qr"),
                   CaptionConfig(mode="clean", dropout=0.1), steps=cfg.base_steps)
    tasks["base/train"] = Task(Job(train_model_job, (rc, False), progress_file(rc.out_dir), cfg.base_steps),
                               deps=("data/clean_train",), outputs=(f"{rc.out_dir}/model/geomerase.json",),
                               cost=cfg.base_steps / 10)
    return f"{rc.out_dir}/model"


def _concept_data_tasks(cfg: ErasingConfig, lay: Layout, c: str) -> dict[str, Task]:
    """Concept ``c``'s training and held-out splits, and the annotator's and scorer's own splits."""
    seed = cfg.seed
    out = {}
    for split, n, seed_offset, cost in (("train", cfg.n_train, 0, 3), ("heldout", cfg.n_heldout, 1000, 1),
                                        ("annot", cfg.n_aux, 2000, 1), ("scorer", cfg.n_aux, 3000, 1)):
        name = f"{c}_{split}"
        out[f"{c}/data/{split}"] = Task(Job(build_icd_job, (c, n, cfg.ratio, cfg.image_size, seed + seed_offset,
                                                            str(lay.icd(name)), cfg.sizes(c))),
                                        outputs=_meta(lay, name, c), cost=cost)
    return out


def _classifier_tasks(cfg: ErasingConfig, lay: Layout, c: str) -> dict[str, Task]:
    """The annotator (and annotation of the training split), the ICR scorer and the attribute
    classifier, each on its own split, at the concept's resolution."""
    res, seed, cls, cd = cfg.resolution(c), cfg.seed, lay.concept(c) / "classifiers", lay.concept(c)
    return {
        f"{c}/annotator": Task(Job(patch_classifier_job, (lay.glob(f"{c}_annot", c), res, cfg.grid,
                                                          cfg.classifier_steps, seed, str(cls / "annotator"), c,
                                                          cfg.annotator_width)),
                               deps=(f"{c}/data/annot",), outputs=(str(cls / "annotator" / "model.safetensors"),)),
        f"{c}/annotate": Task(Job(annotate_job, (lay.glob(f"{c}_train", c), str(cls / "annotator"), c, CONCEPT_NAMES[c],
                                                 cfg.grid, str(cd / "annotated"))),
                              deps=(f"{c}/annotator", f"{c}/data/train"),
                              outputs=(str(cd / "annotated" / "_manifest.json"),)),
        f"{c}/scorer": Task(scorer_job(cfg, lay, c, cfg.scorer_width, cfg.classifier_steps, cls / "scorer"),
                            deps=(f"{c}/data/scorer",), outputs=(str(cls / "scorer" / "model.safetensors"),)),
        f"{c}/attributes": Task(Job(attribute_classifier_job, (lay.glob(f"{c}_scorer", c), res, cfg.classifier_steps,
                                                               seed, str(cls / "attributes"), list(BACKGROUNDS),
                                                               list(SHAPES))),
                                deps=(f"{c}/data/scorer",), outputs=(str(cls / "attributes" / "model.safetensors"),))}


def scorer_job(cfg: ErasingConfig, lay: Layout, c: str, width: int, steps: int, out: Path) -> Job:
    """Training of concept ``c``'s ICR scorer (a patch classifier of ``width``, ``steps``) on its own split,
    seed ``seed + 1``, its threshold calibrated on the first tenth held back (half degraded)."""
    return Job(patch_classifier_job, (lay.glob(f"{c}_scorer", c), cfg.resolution(c), cfg.grid, steps, cfg.seed + 1,
                                      str(out), c, width, "icr-scorer", 0.1, "first", cfg.seed + 1))


def _fine_tune_tasks(cfg: ErasingConfig, lay: Layout, c: str, base_model: str | None,
                     base_deps: tuple[str, ...]) -> dict[str, Task]:
    """The data-removal fine-tunes of the active arms, then ESD and model removal from plain."""
    models = {spec[0] for spec in cfg.active_arms().values()}
    ann = str(lay.concept(c) / "annotated" / "*.tar")
    captions = {"plain": CaptionConfig(mode="clean", dropout=0.1), "geom": geom_captions(),
                "existence": CaptionConfig(mode="existence", concept_first_prob=0.2, concept_only_prob=0.1,
                                           dropout=0.1),
                "geom_reweight": geom_captions()}
    out: dict[str, Task] = {}
    for model, caps in captions.items():
        if model not in models:
            continue
        rc = _train_rc(cfg, lay.model_dir(c, model), ann, caps, pretrained=base_model,
                       alpha=cfg.reweight_alpha if model == "geom_reweight" else None,
                       align=cfg.attn_align_weight if caps.mode == "geom" else 0.0)
        out[f"{c}/train/{model}"] = Task(Job(train_model_job, (rc, False), progress_file(rc.out_dir), cfg.steps),
                                         deps=(f"{c}/annotate", *base_deps),
                                         outputs=(f"{rc.out_dir}/model/geomerase.json",), cost=cfg.steps / 10)
    plain_model = str(lay.model_dir(c, "plain") / "model")
    if "esd" in models:
        esd_cfg = dict(concept=CONCEPT_NAMES[c], method=cfg.esd_method, eta=cfg.esd_eta, steps=cfg.esd_steps,
                       lr=cfg.esd_lr, batch_size=cfg.esd_batch, xt_source=cfg.esd_source, ddim_steps=cfg.sample_steps,
                       guidance_scale=cfg.guidance_scale, seed=cfg.seed)
        out[f"{c}/train/esd"] = Task(
            Job(esd_job, (plain_model, lay.glob(f"{c}_train", c), esd_cfg, str(lay.model_dir(c, "esd")), cfg.device)),
            deps=(f"{c}/train/plain", f"{c}/data/train"),
            outputs=(str(lay.model_dir(c, "esd") / "model" / "geomerase.json"),),
            cost=cfg.esd_steps * 1.6 * cfg.esd_batch / cfg.batch_size / 10)
    if "geom_mr" in models:
        rc = _train_rc(cfg, lay.model_dir(c, "geom_mr"), ann, geom_captions(), mode="model-removal",
                       steps=cfg.mr_steps, lr=cfg.mr_lr, pretrained=plain_model, align=cfg.attn_align_weight)
        out[f"{c}/train/geom_mr"] = Task(Job(train_model_job, (rc, False)), deps=(f"{c}/train/plain", f"{c}/annotate"),
                                         outputs=(f"{rc.out_dir}/model/geomerase.json",), cost=cfg.mr_steps / 10)
    return out


def _oracle_tasks(cfg: ErasingConfig, lay: Layout, c: str, ok: str, base_model: str | None,
                  base_deps: tuple[str, ...], prompts: dict[str, list[str]],
                  files: dict[str, dict[str, str]]) -> dict[str, Task]:
    """The oracle of ``c``'s base (prefix ``ok``): its fine-tune on concept-free data and its
    scorer-calibration samples (``files["calibration"]``); shared by every concept with that base."""
    rc = _train_rc(cfg, lay.model_dir(c, "oracle"), lay.glob("clean_train", "qr"),
                   CaptionConfig(mode="clean", dropout=0.1), pretrained=base_model)
    k = cfg.calibration_samples
    return {
        f"{ok}/train": Task(Job(train_model_job, (rc, False), progress_file(rc.out_dir), cfg.steps),
                            deps=("data/clean_train", *base_deps), outputs=(f"{rc.out_dir}/model/geomerase.json",),
                            cost=cfg.steps / 10),
        f"{ok}/sample/calibration": Task(
            Job(sample_job, (str(lay.model_dir(c, "oracle") / "model"), cfg.device, cfg.attention_backend,
                             calibration_arms(cfg, prompts), calibration_seeds(cfg), cfg.sample_steps,
                             cfg.sample_batch, str(lay.calibration(c)))),
            deps=(f"{ok}/train", "data/clean_heldout"),
            outputs=tuple(files["calibration"].values()),
            cost=2 * k * cfg.sample_steps / 1000)}


def _sample_tasks(cfg: ErasingConfig, lay: Layout, c: str, ok: str, oracle_sampled: bool,
                  prompts: dict[str, list[str]], files: dict[str, dict[str, str]]) -> dict[str, Task]:
    """One sampling job per (model, prompt set), writing ``files`` (:func:`sample_files`); the
    oracle's are made once per base."""
    out: dict[str, Task] = {}
    for (model, pset), arms in sampling_arms(cfg, c, prompts).items():
        if model == "oracle" and oracle_sampled:
            continue
        key = f"{ok}/sample/{pset}" if model == "oracle" else f"{c}/sample/{model}/{pset}"
        train_key = f"{ok}/train" if model == "oracle" else f"{c}/train/{model}"
        model_dir = str(lay.model_dir(c, model) / "model")
        out[key] = Task(Job(sample_job, (model_dir, cfg.device, cfg.attention_backend, arms, seeds(cfg),
                                         cfg.sample_steps, cfg.sample_batch, str(lay.samples(c, model, pset)))),
                        deps=(train_key, "data/clean_heldout"), outputs=tuple(files[pset][a.name] for a in arms),
                        cost=sum(a.cost for a in arms) * cfg.sample_steps / 2000)
    return out


def calibration_arms(cfg: ErasingConfig, prompts: dict[str, list[str]]) -> list[ArmSpec]:
    """The oracle's scorer-calibration arms: per prompt set, its prompts cycled, no negative."""
    k = cfg.calibration_samples
    return [ArmSpec(pset, [prompts[pset][j % cfg.samples] for j in range(k)], [""], [1.0], cfg.guidance_scale)
            for pset in PROMPT_SETS]


def sample_files(cfg: ErasingConfig, lay: Layout, c: str, prompts: dict[str, list[str]]) -> dict[str, dict[str, str]]:
    """Where concept ``c``'s samples are: ``{prompt set: {arm (or "arm@scale"): file}}`` and
    ``{"calibration": {prompt set: file}}`` (the oracle's calibration samples)."""
    out: dict[str, dict[str, str]] = {pset: {} for pset in PROMPT_SETS}
    for (model, pset), arms in sampling_arms(cfg, c, prompts).items():
        model_dir = str(lay.model_dir(c, model) / "model")
        for a in arms:
            out[pset][a.name] = str(samples_path(lay.samples(c, model, pset), a, model_dir, seeds(cfg),
                                                 cfg.sample_steps))
    oracle = str(lay.model_dir(c, "oracle") / "model")
    out["calibration"] = {a.name: str(samples_path(lay.calibration(c), a, oracle, calibration_seeds(cfg),
                                                   cfg.sample_steps)) for a in calibration_arms(cfg, prompts)}
    return out


def seeds(cfg: ErasingConfig) -> list[int]:
    """Noise seeds, one per sample, shared by every arm and prompt set."""
    return list(range(10_000 + cfg.seed, 10_000 + cfg.seed + cfg.samples))


def calibration_seeds(cfg: ErasingConfig) -> list[int]:
    """Noise seeds of the scorer-calibration samples: disjoint from :func:`seeds`."""
    return list(range(20_000 + cfg.seed, 20_000 + cfg.seed + cfg.calibration_samples))


def prompt_sets(cfg: ErasingConfig, lay: Layout) -> dict[str, list[str]]:
    """``{"heldout": held-out captions, "open": open prompts cycled}`` (``samples`` each)."""
    return {"heldout": held_out_prompts(cfg, lay),
            "open": [cfg.open_prompts[i % len(cfg.open_prompts)] for i in range(cfg.samples)]}


def run_erasing(cfg: ErasingConfig) -> dict:
    """Run (or resume) the whole benchmark; returns ``results.json``'s content."""

    t0 = time.time()
    cfg.validate()
    lay = Layout.of(cfg)
    lay.root.mkdir(parents=True, exist_ok=True)
    atomic_write(lay.root / "bench_config.json", json.dumps(to_dict(cfg), indent=1))
    workers, threads = pool_shape(resolve_device(cfg.device), cfg.workers, cfg.threads)
    torch.set_num_threads(max(1, cfg.threads))
    cache: dict[str, dict] = {}

    def prompts() -> dict[str, list[str]]:
        # Read lazily: the held-out split may not exist when the plan is made; sampling tasks
        # re-read it through their args, so the plan is rebuilt once the data stage is done.
        if "p" not in cache:
            cache["p"] = prompt_sets(cfg, lay)
        return cache["p"]

    timings_path = lay.root / "timings.json"
    timings: dict[str, float] = json.loads(timings_path.read_text()) if timings_path.exists() else {}
    inv_path = lay.root / "invocations.json"
    invocations: list[dict] = json.loads(inv_path.read_text()) if inv_path.exists() else []
    invocations.append({"start": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t0)), "seconds": None,
                        "workers": workers, "threads_per_worker": threads})

    cpu_path = lay.root / "cpu_seconds.json"
    cpu: dict[str, float] = json.loads(cpu_path.read_text()) if cpu_path.exists() else {}

    def save_progress(_: str = "") -> None:
        invocations[-1]["seconds"] = round(time.time() - t0, 1)
        atomic_write(timings_path, json.dumps(timings, indent=1))
        atomic_write(cpu_path, json.dumps(cpu, indent=1))
        atomic_write(inv_path, json.dumps(invocations, indent=1))

    # Data first (the sampling plan needs the held-out captions), then everything else.
    data_plan = {k: v for k, v in plan(cfg, lay, lambda: {"heldout": [""] * cfg.samples, "open": [""] * cfg.samples}).items()
                 if k == "data/clean_heldout"}
    try:
        run_dag(data_plan, 1, cfg.threads, desc="held-out split", timings=timings, on_finish=save_progress,
                cpu_times=cpu)
        run_dag(plan(cfg, lay, prompts), workers, threads, desc="erasing bench", timings=timings,
                on_finish=save_progress, cpu_times=cpu)
    finally:
        save_progress()
    return write_outputs(cfg, lay, timings, time.time() - t0, invocations, cpu)
