"""The demo's ``report.md``: the arm table, the binding probes, the scorer's calibration and the targets,
rendered from ``metrics.json`` (:func:`geomerase.demo.run_demo`)."""
from __future__ import annotations

from types import SimpleNamespace


def render_report(m: dict) -> str:
    """``report.md`` from ``metrics.json``'s content (the run's settings are its ``config``)."""
    cfg = SimpleNamespace(**m["config"])
    return "\n".join(_arm_table(m, cfg) + _probe_lines(m, cfg) + _quality_lines(m)) + "\n"


def _arm_table(m: dict, cfg: SimpleNamespace) -> list[str]:
    """The title and one row per sampled arm: ICR with its interval, fidelity."""
    icr_ = m["icr_detail"]

    def row(arm: str, model: str, prompts: str, negative: str) -> str:
        r = icr_[arm]
        fid = m["fidelity"]["detail"].get(arm, {}).get("fidelity")
        return (f"| {arm} | {model} | {prompts} | {negative} | {r['icr']:.3f} "
                f"({r['ci95'][0]:.2f}–{r['ci95'][1]:.2f}) | {'' if fid is None else f'{fid:.3f}'} |")

    lines = [
        f"# Geom-Erasing demo ({cfg.concept_name}, {m['n_samples']} samples per arm, CFG {cfg.guidance_scale})",
        "",
        "| arm | model | prompts | negative prompt | ICR (95% CI) | fidelity |",
        "|---|---|---|---|---|---|",
        row("plain", "plain", "held-out", "—"),
        row("plain_np", "plain", "held-out", cfg.concept_name),
        row("geom_noneg", "geom", "held-out", "—"),
        row("geom", "geom", "held-out", f"Geom-Erasing ({cfg.geom_negative})"),
        row("open_noneg", "geom", "open", "—"),
        row("open_np", "geom", "open", cfg.concept_name),
        row("open_geom", "geom", "open", f"Geom-Erasing ({cfg.geom_negative})"),
    ]
    if "open_plain" in icr_:
        lines += [row("open_plain", "plain", "open", "—"), row("open_plain_np", "plain", "open", cfg.concept_name)]
    if "base" in icr_:
        lines.append(row("base", "base (concept-free)", "held-out + open", "—"))
    for arm in icr_:
        if "[" in arm:
            lines.append(row(arm, "geom", "open" if arm.startswith("open") else "held-out", arm.split("[")[1][:-1]))
    probes = {"probe_geom": "concept + seen cells", "probe_scene": "held-out caption + concept + seen cells"}
    for arm, what in probes.items():
        if arm in icr_:
            lines.append(row(arm, "geom", what, "—"))
    return lines


def _probe_lines(m: dict, cfg: SimpleNamespace) -> list[str]:
    """The token-binding probes: sampled cells vs asked-for cells, and the one-step tag localisation."""
    icr_, lines = m["icr_detail"], []
    if "probe_geom" in icr_:
        def cells(arm: str) -> str:
            pr = icr_[arm].get("cells_vs_asked", {})
            return (f"ICR {icr_[arm]['icr']:.3f}, flagged cells vs asked-for cells precision "
                    f"{pr.get('precision', float('nan')):.3f}, recall {pr.get('recall', float('nan')):.3f}")

        lines += ["", f"Token-binding probes (prompts `{cfg.concept_name} <l..>` with cell sets seen in training): "
                  f"bare (`probe_geom`) {cells('probe_geom')}"
                  + (f"; after a held-out caption (`probe_scene`) {cells('probe_scene')}" if "probe_scene" in icr_
                     else "")
                  + ". The geometric negative prompt can only steer away from what these tokens have learned to draw."]
    b = m.get("binding")
    if b:
        tl = b["tag_localisation"]
        lines += ["", f"Binding probe (one denoising step, {b['n']} clean held-out images, `core/probes.py`): appending "
                  f"`{cfg.concept_name} <l..>` for random cells changes the x0 prediction inside those cells vs "
                  "outside by (ratio; effect = in-cell change relative to the caption's own effect):",
                  "", "| t | ratio in/out | effect |", "|---|---|---|"]
        lines += [f"| {t} | {r['ratio']:.2f} | {r['effect']:.3g} |" for t, r in tl.items()]
        if "conditioning_paths" in b:
            lines += ["", "Conditioning paths (denoising loss; pooled text vs cross-attention):", "",
                      "| t | both | neither | pooled only | cross-attention only |", "|---|---|---|---|---|"]
            lines += [f"| {t} | {r['both']:.4f} | {r['neither']:.4f} | {r['pool_only']:.4f} | {r['xattn_only']:.4f} |"
                      for t, r in b["conditioning_paths"].items()]
    return lines


def _quality_lines(m: dict) -> list[str]:
    """Fidelity, the scorer's calibration and quality, the annotations' quality, differences, targets, time."""
    f = m["fidelity"]
    q, sc = m["quality"], m["scorer_calibration"]

    def pr(d: dict) -> str:
        return f"precision {d['precision']:.3f}, recall {d['recall']:.3f}"

    cal = (f"threshold {sc['threshold']:.3f} (F1-calibrated {sc['f1_threshold']:.2f}, raised to flag at most "
           f"{sc['fpr_bound']:.0%} of {sc['n_base_samples']} base-model samples: {sc['base_flagged']:.1%} flagged)"
           if sc.get("calibrated") else f"threshold {sc['threshold']:.3f} (NOT calibrated: no base model)")
    return [
        "",
        f"Fidelity (mean of background-colour and shape accuracy): plain {f['plain']:.3f}, geom {f['geom']:.3f}, "
        + (f"base {f['base']:.3f}, " if f.get("base") is not None else "") + f"chance {f['chance']:.3f}.",
        "",
        f"ICR scorer (a patch classifier trained on its own split, not the annotator): {cal}.",
        f"- on held-out real images at that threshold, cells clean: {pr(q['scorer_heldout']['cells_clean'])}; "
        f"images degraded: {pr(q['scorer_heldout']['images_degraded'])}",
        f"- annotations written on the training split vs ground truth, cells: {pr(q['annotations_written'])}",
        f"- annotator on held-out images, cells clean: {pr(q['annotator_heldout']['cells_clean'])}",
        f"- attribute classifier accuracy, clean {m['attribute_classifier']['clean']['fidelity']:.3f}, "
        f"degraded {m['attribute_classifier']['degraded']['fidelity']:.3f}",
        "",
        "ICR differences with their 95% intervals (Newcombe's hybrid score interval; the targets' "
        "\"intervals disjoint\" is the stricter test): " + "; ".join(
            f"{k} {d['diff']:+.3f} ({d['ci95'][0]:+.3f} to {d['ci95'][1]:+.3f})"
            for k, d in m.get("icr_differences", {}).items()),
        "",
        "Targets: " + "; ".join(f"{k}: {'met' if v else 'MISSED'}" for k, v in m.get("targets", {}).items()),
        "",
        f"Total {m['seconds']:.0f} s: " + ", ".join(f"{k} {v:.0f} s" for k, v in m["timings"].items()),
        "",
        "Grids: `grids/<arm>.png` (red frame = scorer found the concept; flagged cells outlined). Chart: `icr.png`.",
    ]
