"""Small CNNs trained on the project's own data: the patch classifier and the attribute classifier.

* :class:`PatchClassifier` scores each grid cell (with some context around it) for
  the concept. Scanned over the G x G grid it is the paper's "accessible
  classifier": it annotates training images with location tokens and, trained with
  degradations, scores generated images for the implicit-concept ratio.
* :class:`AttributeClassifier` reads a scene's background colour and main shape,
  for prompt fidelity.

Generated images are blurrier and noisier than training images; a scorer trained on
clean images only flags most of them. Both are therefore trained with
:func:`degrade` applied to part of each batch. Weights are saved as safetensors
beside a JSON config; nothing is unpickled.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm


def degrade(x: torch.Tensor, gen: torch.Generator, strength: float = 1.0, noise_std: float = 0.2) -> torch.Tensor:
    """Random blur, resampling, noise and colour shifts, per image.

    Args:
        x: ``(B, 3, H, W)`` float in [-1, 1].
        strength: scales every degradation (0 returns ``x``).
        noise_std: largest standard deviation of the additive per-pixel noise (drawn per image
            uniformly from ``[0, noise_std]``, times ``strength``).
    Returns:
        Same shape, float, clamped to [-1, 1].
    """
    b, _, h, w = x.shape
    u = torch.rand(b, 6, generator=gen)
    out = x
    # Gaussian blur with a per-image sigma in [0, 1.2] px (separable 5-tap).
    sigma = (u[:, 0] * 1.2 * strength).clamp(min=1e-3)
    taps = torch.arange(-2, 3, dtype=x.dtype)
    k = torch.exp(-taps.view(1, -1) ** 2 / (2 * sigma.view(-1, 1) ** 2))
    k = k / k.sum(1, keepdim=True)  # (B, 5)
    pad = F.pad(out, (2, 2, 2, 2), mode="replicate")
    kx = k.view(b, 1, 1, 1, 5)
    rows = (pad.unfold(3, 5, 1) * kx).sum(-1)  # (B,3,H+4,W)
    out = (rows.unfold(2, 5, 1) * kx).sum(-1)  # (B,3,H,W)
    # Down-up resampling for a third of the images (softens edges like a small denoiser).
    resample = u[:, 1] < 0.33 * strength
    if resample.any():
        small = F.interpolate(out[resample], scale_factor=0.5, mode="bilinear", align_corners=False)
        out = out.clone()
        out[resample] = F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)
    # Additive Gaussian noise, std in [0, noise_std] (images span 2.0).
    noise = torch.randn(out.shape, generator=gen) * (u[:, 2] * noise_std * strength).view(-1, 1, 1, 1)
    # Contrast / brightness / saturation shifts.
    contrast = 1 + (u[:, 3] - 0.5) * 0.5 * strength
    bright = (u[:, 4] - 0.5) * 0.3 * strength
    mean = out.mean(1, keepdim=True)
    sat = 1 + (u[:, 5] - 0.5) * 0.6 * strength
    out = mean + (out - mean) * sat.view(-1, 1, 1, 1)
    out = out * contrast.view(-1, 1, 1, 1) + bright.view(-1, 1, 1, 1) + noise
    return out.clamp(-1, 1)


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.GroupNorm(8, cout), nn.SiLU())


@dataclass
class PatchClassifierConfig:
    resolution: int = 32
    """Images are resized to this before scanning."""
    grid: int = 4
    """G: cells per side; each cell is classified."""
    context: int = 4
    """Pixels of context around each cell fed to the classifier."""
    width: int = 32
    """Channels of the first conv layer."""
    overlap_threshold: float = 0.25
    """A cell counts as concept when a box covers this share of it (the classifier regresses that share)."""
    decision_threshold: float | None = None
    """Predicted coverage at which a cell is flagged; None: ``overlap_threshold``. The regression
    overshoots on cells that a box only grazes, so :func:`calibrate_threshold` sets this on a
    calibration split held back from training (F1-maximising)."""

    @property
    def patch(self) -> int:
        return self.resolution // self.grid + 2 * self.context

    def build(self) -> "PatchClassifier":
        if self.resolution % self.grid:
            raise ValueError(f"patch classifier: grid {self.grid} must divide resolution {self.resolution}")
        return PatchClassifier(self)


class PatchClassifier(nn.Module):
    """Cell-with-context patches ``(N, 3, P, P)`` -> logit of the cell's concept coverage ``(N,)``."""

    def __init__(self, cfg: PatchClassifierConfig):
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        self.net = nn.Sequential(_conv(3, w), _conv(w, w, 2), _conv(w, 2 * w), _conv(2 * w, 2 * w, 2),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * w, 1))

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        return self.net(patches).squeeze(-1)

    def patches(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, R, R)`` -> ``(B*G*G, 3, P, P)`` in row-major cell order."""
        c, g = self.cfg.context, self.cfg.grid
        cell = self.cfg.resolution // g
        padded = F.pad(images, (c, c, c, c), mode="replicate")
        p = cell + 2 * c
        cols = F.unfold(padded, kernel_size=p, stride=cell)  # (B, 3*p*p, G*G)
        return cols.transpose(1, 2).reshape(-1, 3, p, p)

    @torch.no_grad()
    def cell_probs(self, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
        """``(B, 3, R, R)`` float in [-1,1] -> ``(B, G, G)`` predicted coverage in [0, 1]."""
        self.eval()
        g = self.cfg.grid
        out = []
        for i in range(0, images.shape[0], batch):
            out.append(torch.sigmoid(self(self.patches(images[i:i + batch]))))
        return torch.cat(out).view(-1, g, g)

    def cells(self, images: torch.Tensor) -> list[list[int]]:
        """Flat indices of cells whose predicted coverage reaches the threshold, per image."""
        probs = self.cell_probs(images).flatten(1)
        thr = self.threshold
        return [torch.nonzero(p >= thr).flatten().tolist() for p in probs]

    @property
    def threshold(self) -> float:
        """The predicted coverage at which a cell is flagged."""
        d = self.cfg.decision_threshold
        return self.cfg.overlap_threshold if d is None else d


@dataclass
class AttributeClassifierConfig:
    resolution: int = 32
    """Input resolution."""
    num_backgrounds: int = 8
    """Background colour classes."""
    num_shapes: int = 5
    """Main-object shape classes."""
    width: int = 32
    """Channels of the first conv layer."""

    def build(self) -> "AttributeClassifier":
        return AttributeClassifier(self)


class AttributeClassifier(nn.Module):
    """``(B, 3, R, R)`` -> (background logits ``(B, nb)``, shape logits ``(B, ns)``)."""

    def __init__(self, cfg: AttributeClassifierConfig):
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        self.body = nn.Sequential(_conv(3, w), _conv(w, w, 2), _conv(w, 2 * w), _conv(2 * w, 2 * w, 2),
                                  _conv(2 * w, 4 * w), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.background = nn.Linear(4 * w, cfg.num_backgrounds)
        self.shape = nn.Linear(4 * w, cfg.num_shapes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.body(x)
        return self.background(h), self.shape(h)

    @torch.no_grad()
    def predict(self, x: torch.Tensor, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
        self.eval()
        bg, sh = [], []
        for i in range(0, x.shape[0], batch):
            a, b = self(x[i:i + batch])
            bg.append(a.argmax(-1))
            sh.append(b.argmax(-1))
        return torch.cat(bg), torch.cat(sh)


def save_classifier(model: nn.Module, path: str | Path, extra: dict | None = None) -> Path:
    """``path/model.safetensors`` + ``path/config.json`` (class name, config, extra)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path / "model.safetensors"))
    meta = {"class": type(model).__name__, "config": asdict(model.cfg), **(extra or {})}
    (path / "config.json").write_text(json.dumps(meta, indent=1))
    return path


def load_classifier(path: str | Path) -> tuple[nn.Module, dict]:
    """Inverse of :func:`save_classifier`; returns the model (eval mode) and its metadata."""
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{path}: no config.json (not a saved geomerase classifier)")
    meta = json.loads(cfg_file.read_text())
    classes = {"PatchClassifier": PatchClassifierConfig, "AttributeClassifier": AttributeClassifierConfig}
    if meta.get("class") not in classes:
        raise ValueError(f"{cfg_file}: unknown classifier class {meta.get('class')!r}")
    model = classes[meta["class"]](**meta["config"]).build()
    model.load_state_dict(load_file(str(path / "model.safetensors")))
    return model.eval(), meta


def _seeded_build(cfg, seed: int) -> nn.Module:
    """``cfg.build()`` with weights drawn from ``seed`` alone. The global RNG of a pool worker
    holds whatever earlier jobs in that process left, which made two identical benchmark runs
    train different classifiers; the caller's global RNG is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return cfg.build()


def fit(model: nn.Module, loss_fn, n: int, steps: int, batch: int, lr: float, seed: int, desc: str,
        progress: bool = True) -> list[float]:
    """Generic AdamW loop: ``loss_fn(indices, gen) -> loss`` on random minibatches of ``range(n)``."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    model.train()
    losses = []
    for step in tqdm(range(steps), desc=desc, disable=not progress):
        idx = torch.randint(0, n, (batch,), generator=gen)
        loss = loss_fn(idx, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0 or step == steps - 1:
            losses.append(loss.detach().item())  # log steps only
    model.eval()
    return losses


def _training_batch(images: torch.Tensor, idx: torch.Tensor, gen: torch.Generator,
                    degrade_prob: float, noise_std: float = 0.2) -> torch.Tensor:
    """uint8 images ``idx`` as floats in [-1, 1], a random ``degrade_prob`` share of them degraded."""
    x = images[idx].float() / 127.5 - 1
    mask = torch.rand(len(idx), generator=gen) < degrade_prob
    if mask.any():
        x = x.clone()
        x[mask] = degrade(x[mask], gen, noise_std=noise_std)
    return x


def train_patch_classifier(cfg: PatchClassifierConfig, images: torch.Tensor, coverage: torch.Tensor,
                           steps: int = 1500, batch: int = 64, lr: float = 2e-3, seed: int = 0,
                           degrade_prob: float = 0.6, progress: bool = True,
                           noise_std: float = 0.2, init: PatchClassifier | None = None) -> PatchClassifier:
    """Train on whole images: every cell of a minibatch image is a patch example.

    Args:
        images: ``(N, 3, R, R)`` uint8 training images.
        coverage: ``(N, G, G)`` float ground-truth share of each cell covered by the concept.
        init: continue training this classifier (cast to fp32; ``cfg`` is then its own) instead of a
            fresh seeded one.
    """
    model = _seeded_build(cfg, seed) if init is None else init.float()

    def loss_fn(idx: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        x = _training_batch(images, idx, gen, degrade_prob, noise_std)
        target = coverage[idx].flatten().float()
        logits = model(model.patches(x))
        # Soft targets: the classifier regresses coverage, so its threshold means the same as the GT's.
        return F.binary_cross_entropy_with_logits(logits, target, pos_weight=torch.tensor(3.0))

    fit(model, loss_fn, images.shape[0], steps, batch, lr, seed, "patch classifier", progress)
    return model


def train_attribute_classifier(cfg: AttributeClassifierConfig, images: torch.Tensor, backgrounds: torch.Tensor,
                               shapes: torch.Tensor, steps: int = 1200, batch: int = 64, lr: float = 2e-3,
                               seed: int = 0, degrade_prob: float = 0.6, progress: bool = True) -> AttributeClassifier:
    """Train on ``(N,3,R,R)`` uint8 images with int64 background and shape labels ``(N,)``."""
    model = _seeded_build(cfg, seed)

    def loss_fn(idx: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        a, b = model(_training_batch(images, idx, gen, degrade_prob))
        return F.cross_entropy(a, backgrounds[idx]) + F.cross_entropy(b, shapes[idx])

    fit(model, loss_fn, images.shape[0], steps, batch, lr, seed, "attribute classifier", progress)
    return model


def calibrate_threshold(model: PatchClassifier, images_u8: torch.Tensor, coverage: torch.Tensor,
                        candidates: Sequence[float] = tuple(x / 100 for x in range(15, 81, 5)),
                        degrade_seed: int | None = 0) -> dict[str, float]:
    """Pick the decision threshold that maximises cell-level F1 on a calibration split.

    Args:
        images_u8: ``(N, 3, R, R)`` uint8 images the classifier was *not* trained on.
        coverage: ``(N, G, G)`` ground-truth covered share of each cell.
        degrade_seed: when set, half the images are degraded (as the scorer meets generated
            images too); None calibrates on clean images only.
    Returns:
        ``{"threshold", "precision", "recall", "f1"}`` at the chosen threshold; the model's
        ``cfg.decision_threshold`` is set to it.
    """
    x = as_float(images_u8)
    if degrade_seed is not None and len(x) > 1:
        half = len(x) // 2
        x = torch.cat([x[:half], degraded(images_u8[half:], seed=degrade_seed)])
    probs = model.cell_probs(x).flatten(1)
    truth = coverage.flatten(1) >= model.cfg.overlap_threshold
    best = {"threshold": model.cfg.overlap_threshold, "precision": 0.0, "recall": 0.0, "f1": -1.0}
    for thr in candidates:
        pred = probs >= thr
        tp = (pred & truth).sum().item()
        fp = (pred & ~truth).sum().item()
        fn = (~pred & truth).sum().item()
        prec = tp / max(tp + fp, 1)
        rec = tp / max(tp + fn, 1)
        f1 = 2 * prec * rec / max(prec + rec, 1e-12)
        if f1 > best["f1"]:
            best = {"threshold": float(thr), "precision": prec, "recall": rec, "f1": f1}
    model.cfg.decision_threshold = best["threshold"]
    return best


def fpr_threshold(negative_scores: torch.Tensor, fpr: float) -> float:
    """Lowest decision threshold that flags at most a share ``fpr`` of known negatives.

    Args:
        negative_scores: ``(N,)`` float scores of images known not to show the concept (an image
            is flagged when its score reaches the threshold, ``score >= t``).
        fpr: allowed false-positive share in [0, 1).
    Returns:
        ``t`` with ``mean(negative_scores >= t) <= fpr``; the next float above the
        ``floor(fpr * N) + 1``-th largest score, so no lower threshold meets the bound.
    """
    if not 0.0 <= fpr < 1.0:
        raise ValueError(f"fpr must be in [0, 1), got {fpr}")
    # float32 throughout: the scores it is compared with are float32, and a float64 step above
    # the k-th score could round back onto it.
    s = negative_scores.detach().float().flatten()
    if s.numel() == 0:
        raise ValueError("fpr_threshold: no negative scores")
    k = math.floor(fpr * s.numel() + 1e-9)  # flagged negatives allowed
    kth = torch.sort(s, descending=True).values[k]
    return torch.nextafter(kth, torch.tensor(math.inf)).item()


def bounded_threshold(scorer: "PatchClassifier", negatives_u8: torch.Tensor, fpr: float) -> dict[str, Any]:
    """The scorer's F1-calibrated threshold, raised (never lowered) to the lowest one that flags at
    most ``fpr`` of ``negatives_u8`` (``(N, 3, R, R)`` uint8 samples of a concept-free model; an image
    is flagged when its highest cell probability reaches the threshold); ``fpr`` 0 keeps the F1 one.
    Does not change the scorer: the caller sets ``scorer.cfg.decision_threshold`` from ``threshold``."""
    f1 = scorer.threshold
    top = scorer.cell_probs(as_float(negatives_u8)).flatten(1).amax(1)
    t = max(f1, fpr_threshold(top, fpr)) if fpr > 0 else f1
    return {"threshold": t, "f1_threshold": f1, "fpr_target": fpr, "n": len(top),
            "flagged_at_f1": (top >= f1).float().mean().item(), "flagged": (top >= t).float().mean().item()}


def coverage_targets(metas: Sequence[dict], sizes: Sequence[tuple[int, int]], grid: int,
                     overlap_threshold: float) -> torch.Tensor:
    """``(N, G, G)`` float32 training targets of the patch classifier: the share of each cell covered
    by each sample's ground-truth boxes (``metas[i]["boxes"]``, in pixels of ``sizes[i]``)."""
    from geomerase.core.geometry import GeometryConfig, GridEncoder

    enc = GridEncoder(GeometryConfig(grid=grid, overlap_threshold=overlap_threshold))
    return torch.stack([torch.from_numpy(enc.coverage(m.get("boxes", []), w, h)).float()
                        for m, (w, h) in zip(metas, sizes)])


def patch_classifier_quality(pc: PatchClassifier, images_u8: torch.Tensor, metas: Sequence[dict],
                             sizes: Sequence[tuple[int, int]], seed: int,
                             thresholds: dict[str, float] | None = None) -> dict[str, dict[str, Any]]:
    """Cell- and image-level precision/recall of ``pc`` against the ground-truth boxes in ``metas``
    (in pixels of the source ``sizes``), on the clean ``(N, 3, R, R)`` uint8 images and on a
    degraded copy (``seed``), at each named decision threshold (default ``{"": pc.threshold}``).
    The scan runs once; only the threshold differs. Keys per threshold: ``cells_clean``,
    ``cells_degraded``, ``images_clean``, ``images_degraded``."""
    from geomerase.core.geometry import GeometryConfig, GridEncoder, cell_precision_recall
    from geomerase.core.metrics import binary_pr

    enc = GridEncoder(GeometryConfig(grid=pc.cfg.grid, overlap_threshold=pc.cfg.overlap_threshold))
    true = [enc.cells_from_boxes(m.get("boxes", []), w, h) for m, (w, h) in zip(metas, sizes)]
    probs = {"clean": pc.cell_probs(as_float(images_u8)).flatten(1),
             "degraded": pc.cell_probs(degraded(images_u8, seed=seed)).flatten(1)}
    has = [bool(x) for x in true]
    out = {}
    for name, thr in (thresholds or {"": pc.threshold}).items():
        # as PatchClassifier.cells, at this threshold
        cells = {kind: [torch.nonzero(row >= thr).flatten().tolist() for row in p] for kind, p in probs.items()}
        out[name] = {**{f"cells_{kind}": cell_precision_recall(c, true) for kind, c in cells.items()},
                     **{f"images_{kind}": binary_pr([bool(x) for x in c], has) for kind, c in cells.items()}}
    return out


def degraded(images_u8: torch.Tensor, seed: int, strength: float = 1.0) -> torch.Tensor:
    """Deterministically degraded float copy of uint8 images, for held-out evaluation."""
    gen = torch.Generator().manual_seed(seed)
    return degrade(images_u8.float() / 127.5 - 1, gen, strength)


def as_float(images_u8: torch.Tensor) -> torch.Tensor:
    return images_u8.float() / 127.5 - 1


def labels_to_index(values: Sequence[str], vocab: Sequence[str], where: str) -> torch.Tensor:
    index = {v: i for i, v in enumerate(vocab)}
    try:
        return torch.tensor([index[v] for v in values])
    except KeyError as e:
        raise ValueError(f"{where}: label {e.args[0]!r} not in {list(vocab)}") from None
