"""Scoring and reporting of the erasing benchmark.

:func:`score_concept` (run in the main process once a concept's samples exist) scores every
arm: ICR by the *scorer* patch classifier (not the annotator) with a Wilson interval, the
per-cell ICR heat-map, ICR by the annotator too (for comparison), FID against the held-out
concept-free images in the attribute classifier's feature space, prompt fidelity on held-out
captions, and F·R = FID × ICR; it checks both classifiers against the ground truth of the
concept's held-out split and draws the figures. :func:`write_outputs` gathers the concepts
into ``results.json`` (the issue's schema), ``details.json`` and ``report.md``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw

from geomerase.benchmarks.erasing import ARMS, PROMPT_SETS, ErasingConfig, Layout
from geomerase.core.captions import negative_mixture
from geomerase.core.classifiers import (as_float, bounded_threshold, labels_to_index, load_classifier,
                                        patch_classifier_quality)
from geomerase.core.config import to_dict
from geomerase.core.fid import DomainFID, inception_fid
from geomerase.core.metrics import clearly_below, fidelity, fidelity_chance, icr, sample_grid
from geomerase.data.concepts import CONCEPT_NAMES
from geomerase.data.loader import InMemoryDataset
from geomerase.data.scenes import BACKGROUNDS, SHAPES
from geomerase.data.shards import atomic_write
from geomerase.stages import load_images

def scorer_thresholds(scorer, cfg: ErasingConfig, calibration: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Per prompt set, the scorer threshold held to ``cfg.scorer_fpr`` false positives.

    The oracle model never saw the concept, so whatever the scorer flags in its calibration
    samples (seeds disjoint from the evaluation's) is a false positive on generated images. The
    threshold is the F1-calibrated one, raised where needed so that at most ``scorer_fpr`` of
    those samples are flagged (an image is flagged when its highest cell probability reaches it).
    """
    return {pset: bounded_threshold(scorer, load_images(calibration[pset]), cfg.scorer_fpr) for pset in PROMPT_SETS}


def _detector_quality(pc, ds: InMemoryDataset, grid: int, seed: int,
                      thresholds: dict[str, float] | None = None) -> dict[str, dict[str, Any]]:
    """:func:`~geomerase.core.classifiers.patch_classifier_quality` on the held-out set ``ds``."""
    if pc.cfg.grid != grid:
        raise ValueError(f"patch classifier grid {pc.cfg.grid} != benchmark grid {grid}")
    return patch_classifier_quality(pc, ds.images, ds.metas, ds.sizes, seed, thresholds)


def score_concept(cfg: ErasingConfig, c: str, files: dict[str, dict[str, str]]) -> dict[str, Any]:
    """Score every arm of concept ``c`` from its sample ``files``
    (:func:`~geomerase.benchmarks.erasing_run.sample_files`); writes ``<out>/<c>/scores.json`` and the figures."""
    lay = Layout.of(cfg)
    cls = lay.concept(c) / "classifiers"
    scorer, _ = load_classifier(cls / "scorer")
    annotator, _ = load_classifier(cls / "annotator")
    attrs, _ = load_classifier(cls / "attributes")
    ref = InMemoryDataset(lay.glob("clean_heldout", "qr"), scorer.cfg.resolution)
    fid = DomainFID(attrs.body, ref.images)
    n = cfg.samples
    want_bg = labels_to_index([m["attributes"]["background"] for m in ref.metas[:n]], list(BACKGROUNDS), "held-out")
    want_sh = labels_to_index([m["attributes"]["shape"] for m in ref.metas[:n]], list(SHAPES), "held-out")
    g = cfg.grid
    held = InMemoryDataset(lay.glob(f"{c}_heldout", c), scorer.cfg.resolution)
    thresholds = scorer_thresholds(scorer, cfg, files["calibration"])
    # scorer sensitivity at each threshold: real concept images (degraded like samples) it still finds
    at = _detector_quality(scorer, held, g, cfg.seed + 7, {
        "scorer_f1": scorer.threshold,
        **{"scorer" if p == "heldout" else f"scorer_{p}": thresholds[p]["threshold"] for p in PROMPT_SETS}})
    quality = {"scorer_f1": at.pop("scorer_f1"), "annotator": _detector_quality(annotator, held, g, cfg.seed + 7)[""],
               **at}
    scores: dict[str, dict[str, Any]] = {}
    images: dict[str, dict[str, torch.Tensor]] = {}
    cells_of: dict[str, dict[str, list[list[int]]]] = {}
    for pset in PROMPT_SETS:
        scorer.cfg.decision_threshold = thresholds[pset]["threshold"]
        scores[pset], images[pset], cells_of[pset] = {}, {}, {}
        for arm in cfg.active_arms():
            imgs = load_images(files[pset][arm])
            x = as_float(imgs)
            cells = scorer.cells(x)
            r = icr([bool(cs) for cs in cells])
            heat = torch.zeros(g * g)
            for cs in cells:
                heat[cs] += 1
            f = fid(imgs)
            row = {"icr": r["icr"], "ci95": r["ci95"], "k": r["k"], "n": r["n"], "fid": f, "fr": f * r["icr"],
                   "heatmap": (heat / max(len(cells), 1)).view(g, g).tolist(),
                   "icr_annotator": icr([bool(cs) for cs in annotator.cells(x)])["icr"], "fidelity": None}
            if cfg.inception_weights:
                row["fid_inception"] = inception_fid(imgs, ref.images, cfg.inception_weights)
            if pset == "heldout":
                pb, ps = attrs.predict(x)
                fd = fidelity(pb, ps, want_bg[:len(imgs)], want_sh[:len(imgs)])
                row["fidelity"], row["fidelity_detail"] = fd["fidelity"], fd
            scores[pset][arm] = row
            images[pset][arm], cells_of[pset][arm] = imgs, cells
    curve: dict[str, dict[str, float]] = {}
    k = cfg.sweep_samples
    scorer.cfg.decision_threshold = thresholds["heldout"]["threshold"]
    for scale in sorted({*cfg.guidance_sweep, cfg.guidance_scale}):
        for arm in ("np", "geom"):
            imgs = (images["heldout"][arm][:k] if scale == cfg.guidance_scale
                    else load_images(files["heldout"][f"{arm}@{scale:g}"]))
            curve.setdefault(f"{scale:g}", {})[arm] = icr([bool(cs) for cs in scorer.cells(as_float(imgs))])["icr"]
    figs = lay.root / "figures"
    draw_concept_figures(cfg, c, scores, images, cells_of, curve, figs)
    out = {"concept": c, "concept_name": CONCEPT_NAMES[c], "scores": scores, "icr_vs_guidance": curve,
           "detectors": quality, "scorer_thresholds": thresholds,
           "fidelity_chance": fidelity_chance(len(BACKGROUNDS), len(SHAPES)),
           "fid_reference": {"images": fid.n_reference, "split": "clean_heldout",
                             "features": "attribute classifier penultimate layer"}}
    atomic_write(lay.concept(c) / "scores.json", json.dumps(out, indent=1))
    return out


# -- figures -----------------------------------------------------------------------------------
def side_by_side(rows: dict[str, torch.Tensor], flagged: dict[str, list[list[int]]], path: Path, grid: int,
                 cols: int, title: str) -> Path:
    """One row per arm of the first ``cols`` samples (same seeds across rows), scorer flags framed."""
    tiles = []
    for arm, imgs in rows.items():
        p = path.parent / f".{path.stem}-{arm}.png"
        sample_grid(imgs[:cols], p, flagged[arm][:cols], grid, cols=cols, title=arm)
        tiles.append(Image.open(p).convert("RGB"))
        p.unlink()
    w = max(t.width for t in tiles)
    canvas = Image.new("RGB", (w, sum(t.height for t in tiles) + 16), (255, 255, 255))
    ImageDraw.Draw(canvas).text((2, 2), title, fill=(0, 0, 0))
    y = 16
    for t in tiles:
        canvas.paste(t, (0, y))
        y += t.height
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def draw_concept_figures(cfg: ErasingConfig, c: str, scores: dict, images: dict, cells_of: dict,
                         curve: dict[str, dict[str, float]], figs: Path) -> None:
    """Per-arm grids, side-by-side grids, heat-maps and the guidance curve of one concept."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figs.mkdir(parents=True, exist_ok=True)
    for pset in PROMPT_SETS:
        for arm in scores[pset]:
            sample_grid(images[pset][arm][:64], figs / "arms" / f"{c}_{pset}_{arm}.png", cells_of[pset][arm][:64],
                        cfg.grid, title=f"{c} {pset} {arm}: ICR={scores[pset][arm]['icr']:.2f}")
        side_by_side(images[pset], cells_of[pset], figs / f"grid_{c}_{pset}.png", cfg.grid, cfg.grid_columns,
                     f"{c}, {pset} prompts: same seeds per column; red = scorer found the concept")
    arms = list(scores[PROMPT_SETS[0]])
    fig, axes = plt.subplots(len(PROMPT_SETS), len(arms), figsize=(1.5 * len(arms), 3.2), dpi=100, squeeze=False)
    vmax = max(max(max(r) for r in scores[p][a]["heatmap"]) for p in PROMPT_SETS for a in arms) or 1.0
    for i, pset in enumerate(PROMPT_SETS):
        for j, arm in enumerate(arms):
            ax = axes[i][j]
            im = ax.imshow(scores[pset][arm]["heatmap"], vmin=0, vmax=vmax, cmap="magma")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{arm}" if i == 0 else "", fontsize=8)
            if j == 0:
                ax.set_ylabel(pset, fontsize=8)
    fig.colorbar(im, ax=axes, shrink=0.7, label="share of samples with the concept in the cell")
    fig.suptitle(f"per-location ICR, {c} (scorer cells)", fontsize=9)
    fig.savefig(figs / f"heatmap_{c}.png")
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(4, 3), dpi=110)
    xs = sorted(curve, key=float)
    for arm, label in (("np", "plain + NP (name)"), ("geom", "geom + geometric negative")):
        ax.plot([float(s) for s in xs], [curve[s][arm] for s in xs], marker="o", label=label)
    ax.set_xlabel("CFG scale")
    ax.set_ylabel("ICR (held-out captions)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(f"ICR vs guidance, {c} (n={cfg.sweep_samples})", fontsize=9)
    fig.tight_layout()
    fig.savefig(figs / f"guidance_{c}.png")
    plt.close(fig)


def icr_chart(all_scores: dict[str, dict], path: Path) -> Path:
    """Bars of ICR per arm (95% CI), one panel per concept and prompt set."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    concepts = list(all_scores)
    fig, axes = plt.subplots(len(concepts), len(PROMPT_SETS), figsize=(11, 2.8 * len(concepts)), dpi=100,
                             squeeze=False)
    for i, c in enumerate(concepts):
        for j, pset in enumerate(PROMPT_SETS):
            ax = axes[i][j]
            rows = all_scores[c]["scores"][pset]
            arms = list(rows)
            ys = [rows[a]["icr"] for a in arms]
            err = [[max(0.0, rows[a]["icr"] - rows[a]["ci95"][0]) for a in arms],
                   [max(0.0, rows[a]["ci95"][1] - rows[a]["icr"]) for a in arms]]
            colours = ["#27ae60" if a.startswith("geom") else "#7f8c8d" if a == "oracle" else "#c0392b" for a in arms]
            ax.bar(range(len(arms)), ys, yerr=err, color=colours, capsize=2)
            ax.set_xticks(range(len(arms)))
            ax.set_xticklabels(arms, rotation=30, ha="right", fontsize=8)
            ax.set_ylim(0, 1)
            ax.grid(axis="y", alpha=0.3)
            ax.set_title(f"{c}, {pset} prompts (n={rows['plain']['n']})", fontsize=9)
            if j == 0:
                ax.set_ylabel("ICR")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


# -- results, details, report ------------------------------------------------------------------
def _negative_label(cfg: ErasingConfig, c: str, arm: str) -> str:
    model, kind, sld = ARMS[arm]
    if sld:
        return f"SLD-{cfg.sld_preset} on '{CONCEPT_NAMES[c]}'"
    if kind == "none":
        return "—"
    negs, _ = negative_mixture(kind, CONCEPT_NAMES[c], cfg.grid)
    return f"'{negs[0]}'" if kind == "name" else f"'{CONCEPT_NAMES[c]} <l0> … <l{cfg.grid ** 2 - 1}>'"


def _fmt_icr(r: dict) -> str:
    return f"{r['icr']:.3f} ({r['ci95'][0]:.2f}–{r['ci95'][1]:.2f})"


def targets(s: dict, detectors: dict | None = None) -> list[tuple[str, bool, str]]:
    """The targets for one concept's ``scores`` (and, given its ``detectors``, the scorer's
    sensitivity): (description, met, measured). Targets of arms not run are left out."""
    out = []
    for pset in PROMPT_SETS:
        r = s[pset]
        if detectors is not None:
            rec = detectors["scorer" if pset == "heldout" else f"scorer_{pset}"]["images_degraded"]["recall"]
            out.append((f"{pset}: scorer informative (recall on real concept images >= {TARGET_SCORER_RECALL} at the "
                        "false-positive bound)", rec >= TARGET_SCORER_RECALL, f"{rec:.3f}"))
        g, p, o = r["geom"]["icr"], r["plain"]["icr"], r["oracle"]["icr"]
        out.append((f"{pset}: plain ICR >= 3 x oracle ICR (and > 0)", p >= 3 * o and p > 0,
                    f"{p:.3f} vs 3 x {o:.3f} = {3 * o:.3f}"))
        out.append((f"{pset}: geom ICR <= 0.2 x plain ICR", g <= 0.2 * p, f"{g:.3f} vs 0.2 x {p:.3f} = {0.2 * p:.3f}"))
        for base in ("np", "sld", "esd"):
            if base not in r:
                continue
            out.append((f"{pset}: geom ICR < {base} ICR (95% intervals disjoint)", clearly_below(r["geom"], r[base]),
                        f"{_fmt_icr(r['geom'])} vs {_fmt_icr(r[base])}"))
        fg, fp = r["geom"]["fid"], r["plain"]["fid"]
        out.append((f"{pset}: geom FID <= 1.1 x plain FID", fg <= 1.1 * fp, f"{fg:.2f} vs 1.1 x {fp:.2f} = {1.1 * fp:.2f}"))
    r = s["open"]
    for base in ("np", "sld"):
        if "geom_mr" not in r or base not in r:
            continue
        out.append((f"open: geom_mr ICR < {base} ICR (95% intervals disjoint)", clearly_below(r["geom_mr"], r[base]),
                    f"{_fmt_icr(r['geom_mr'])} vs {_fmt_icr(r[base])}"))
    return out


#: Below this image recall on real (degraded) concept images at the calibrated threshold, a
#: concept's ICR says little: the scorer misses most of what it is meant to count.
MIN_SCORER_RECALL = 0.5
#: The target: a scorer that finds at least this share of real concept images at the bound.
TARGET_SCORER_RECALL = 0.8


def scorer_informative(sc: dict, pset: str) -> bool:
    """Whether the scorer, at ``pset``'s calibrated threshold, still finds real concept images."""
    q = sc["detectors"]["scorer" if pset == "heldout" else f"scorer_{pset}"]
    return q["images_degraded"]["recall"] >= MIN_SCORER_RECALL


def scorer_lines(sc: dict, cfg: ErasingConfig) -> list[str]:
    """Report lines: the scorer's thresholds, its quality at them, and whether the ICR means anything."""
    q, th = sc["detectors"], sc.get("scorer_thresholds")
    out = []
    if th:
        h, o = th["heldout"], th["open"]
        out.append(f"Scorer threshold: F1-calibrated {h['f1_threshold']:.2f}, at which the oracle (concept-free) "
                   f"model's calibration samples were flagged {h['flagged_at_f1']:.0%} (held-out) / "
                   f"{o['flagged_at_f1']:.0%} (open); held to ≤ {cfg.scorer_fpr:.0%} false positives on them "
                   f"({h['n']} per set, other seeds): {h['threshold']:.3f} held-out, {o['threshold']:.3f} open.")
    parts = []
    for key, label in (("scorer_f1", "F1 threshold"), ("scorer", "held-out threshold"),
                       ("scorer_open", "open threshold")):
        if key in q:
            d, i = q[key]["cells_degraded"], q[key]["images_degraded"]
            parts.append(f"{label}: cells P {d['precision']:.3f} R {d['recall']:.3f}, images P {i['precision']:.3f} "
                         f"R {i['recall']:.3f}")
    a = q["annotator"]["cells_clean"]
    out.append("Detectors on the concept's held-out real images vs ground truth (degraded like samples): scorer at "
               + "; at ".join(parts) + f". Annotator cells P {a['precision']:.3f} R {a['recall']:.3f} (clean).")
    weak = [p for p in PROMPT_SETS if th and not scorer_informative(sc, p)]
    if weak:
        out.append(f"**ICR not informative on {', '.join(weak)} prompts**: held to the false-positive bound, the scorer "
                   f"finds under {MIN_SCORER_RECALL:.0%} of real concept images; its targets below are not evidence "
                   "either way.")
    return out + [""]


def render_report(cfg: ErasingConfig, all_scores: dict[str, dict], timings: dict[str, float], seconds: float,
                  invocations: list[dict] | None = None, cpu: dict[str, float] | None = None) -> str:
    lines = [f"# Erasing benchmark ({', '.join(all_scores)}; {cfg.samples} samples per arm and prompt set, "
             f"CFG {cfg.guidance_scale}, {cfg.sample_steps} DDIM steps)", "",
             "ICR = share of samples in which the **scorer** (a width-"
             f"{cfg.scorer_width} patch classifier, seed {cfg.seed + 1}, trained on its own split; annotation "
             f"used a separate width-{cfg.annotator_width} classifier) finds the concept, with 95% Wilson interval. "
             "FID: Fréchet distance to the held-out concept-free images in the attribute classifier's feature space "
             "(domain FID, not Inception; comparable only within this run). F·R = FID × ICR. Fidelity: attribute "
             "accuracy on held-out captions (chance "
             f"{next(iter(all_scores.values()))['fidelity_chance']:.3f}); open prompts have none. The scorer's "
             f"threshold is set per prompt set so that at most {cfg.scorer_fpr:.0%} of the oracle model's samples on "
             "*other* seeds are flagged (false positives on generated images); the oracle row, on the evaluation "
             "seeds, is therefore a check of that bound, not a result.", ""]
    for c, sc in all_scores.items():
        s = sc["scores"]
        lines += [f"## {c} ('{CONCEPT_NAMES[c]}')", "",
                  "| method | model | negative / guidance | held-out ICR ↓ | FID ↓ | F·R ↓ | fidelity ↑ "
                  "| open ICR ↓ | FID ↓ | F·R ↓ |", "|---|---|---|---|---|---|---|---|---|---|"]
        for arm in s["heldout"]:
            h, o = s["heldout"][arm], s["open"][arm]
            lines.append(f"| {arm} | {ARMS[arm][0]} | {_negative_label(cfg, c, arm)} | {_fmt_icr(h)} | {h['fid']:.2f} | "
                         f"{h['fr']:.2f} | {h['fidelity']:.3f} | {_fmt_icr(o)} | {o['fid']:.2f} | {o['fr']:.2f} |")
        steps = [(label, a) for label, a in (("plain", "plain"), ("name only (existence)", "existence"),
                                             ("+ geometry (geom)", "geom"), ("+ re-weighting", "geom_reweight"),
                                             ("oracle (concept-free data)", "oracle")) if a in s["heldout"]]
        lines += ["", "Ablation (held-out / open ICR): "
                  + " → ".join(f"{label} {s['heldout'][a]['icr']:.3f} / {s['open'][a]['icr']:.3f}"
                               for label, a in steps), ""]
        curve = sc["icr_vs_guidance"]
        lines += ["ICR vs CFG scale (held-out captions, n="
                  f"{cfg.sweep_samples}): " + "; ".join(f"s={k}: NP {v['np']:.3f}, geom {v['geom']:.3f}"
                                                        for k, v in sorted(curve.items(), key=lambda kv: float(kv[0]))),
                  ""]
        if "fid_inception" in s["heldout"]["plain"]:
            lines += ["Inception FID (held-out / open; torchmetrics, weights `"
                      f"{Path(cfg.inception_weights).name}`): "
                      + "; ".join(f"{a} {s['heldout'][a]['fid_inception']:.2f} / {s['open'][a]['fid_inception']:.2f}"
                                  for a in s["heldout"]), ""]
        lines += scorer_lines(sc, cfg)
        lines += ["", "Targets:", ""]
        lines += [f"- {'met' if ok else '**missed**'}: {d} ({m})" for d, ok, m in targets(s, sc["detectors"])]
        lines += ["", f"Figures: `figures/grid_{c}_heldout.png`, `figures/grid_{c}_open.png` (arms side by side, same "
                  f"seeds), `figures/heatmap_{c}.png`, `figures/guidance_{c}.png`, `figures/arms/{c}_*.png`.", ""]
    train_s = sum(v for k, v in timings.items() if "/train" in k)
    sample_s = sum(v for k, v in timings.items() if "/sample/" in k)
    inv = invocations or []
    total = sum(i["seconds"] or 0 for i in inv)
    lines += [f"Wall time: this invocation {seconds:.0f} s; all {len(inv)} invocation(s) of this folder {total:.0f} s "
              f"(`invocations.json`). Summed job times: training {train_s:.0f} s, sampling {sample_s:.0f} s; "
              f"{cfg.workers} worker process(es). Per-task seconds in `timings.json`; CPU seconds in "
              f"`cpu_seconds.json` (sum {sum((cpu or {}).values()):.0f} s: the wall time of one free core, "
              "about twice the wall time on two).", "",
              "`results.json`: `{concept: {heldout|open: {arm: {icr, fid, fidelity, n}}}}`; `details.json`: intervals, "
              "F·R, heat-maps, annotator ICR, detector quality, guidance curve, config.", ""]
    return "\n".join(lines)


def write_outputs(cfg: ErasingConfig, lay: Layout, timings: dict[str, float], seconds: float,
                  invocations: list[dict] | None = None, cpu: dict[str, float] | None = None) -> dict:
    """``results.json``, ``details.json``, ``report.md`` and ``icr.png`` from the concepts scored so far."""
    all_scores = {c: json.loads((lay.concept(c) / "scores.json").read_text()) for c in cfg.concepts
                  if (lay.concept(c) / "scores.json").exists()}
    results = {c: {pset: {arm: {"icr": r["icr"], "fid": r["fid"], "fidelity": r["fidelity"], "n": r["n"]}
                          for arm, r in sc["scores"][pset].items()} for pset in PROMPT_SETS}
               for c, sc in all_scores.items()}
    atomic_write(lay.root / "results.json", json.dumps(results, indent=1))
    atomic_write(lay.root / "details.json", json.dumps(
        {"concepts": all_scores, "config": to_dict(cfg), "seconds": seconds, "timings": timings,
         "invocations": invocations or [], "cpu_seconds": cpu or {},
         "targets": {c: [{"target": d, "met": ok, "measured": m}
                         for d, ok, m in targets(sc["scores"], sc["detectors"])]
                     for c, sc in all_scores.items()}}, indent=1))
    if all_scores:
        icr_chart(all_scores, lay.root / "icr.png")
        report = render_report(cfg, all_scores, timings, seconds, invocations, cpu)
        atomic_write(lay.root / "report.md", report)
        print(report)
    return results
