"""Training checkpoints: model folder + optimizer state in safetensors, written atomically.

Layout of ``<out>/checkpoints/step-000123/``::

    model/                 diffusers layout (unet/, text_encoder/, tokenizer/, scheduler/, geomerase.json;
                           unet_lora/ under LoRA; text_encoder_2/ and tokenizer_2/ for SDXL)
    optimizer.safetensors  every optimizer state tensor, keyed "<param index>.<name>"
    extra.safetensors      other training tensors (the EMA weights), when any
    trainer.json           step, optimizer param-group settings, LR-scheduler state, config
    manifest.json          sha256 of every file, written last

The folder is assembled under a temporary name and renamed into place, so a crash
leaves either the previous checkpoint or the complete new one. Nothing is ever
unpickled: tensors come from safetensors, the rest from JSON.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from geomerase.core.lora import load_unet_weights
from geomerase.data.shards import atomic_dir

log = logging.getLogger("geomerase.checkpoint")
STEP_RE = re.compile(r"^step-(\d+)$")


def optimizer_to_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer state dict into tensors (for safetensors) and JSON-able rest."""
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, state in sd["state"].items():
        for name, value in state.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{name}"] = value.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(idx), {})[name] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_tensors(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], rest: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    for idx, sc in rest.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(sc)
    opt.load_state_dict({"state": state, "param_groups": rest["param_groups"]})


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(folder: Path) -> None:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != "manifest.json")
    manifest = {str(p.relative_to(folder)): _sha256(p) for p in files}
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))


def verify_manifest(folder: Path) -> str | None:
    """None when every file matches its recorded checksum, else what is wrong."""
    mpath = folder / "manifest.json"
    if not mpath.is_file():
        return "no manifest.json (incomplete checkpoint)"
    try:
        manifest = json.loads(mpath.read_text())
    except json.JSONDecodeError as e:
        return f"manifest.json unreadable: {e}"
    for rel, digest in manifest.items():
        p = folder / rel
        if not p.is_file():
            return f"missing {rel}"
        if _sha256(p) != digest:
            return f"checksum mismatch in {rel}"
    return None


def save_checkpoint(out_dir: Path, step: int, model, optimizer: torch.optim.Optimizer | None,
                    lr_scheduler, extra: dict[str, Any], keep: int = 2,
                    extra_tensors: dict[str, torch.Tensor] | None = None,
                    optimizer_state: tuple[dict[str, torch.Tensor], dict[str, Any]] | None = None) -> Path:
    """Write ``out_dir/checkpoints/step-<step>`` atomically and prune old ones (keeps ``keep``).

    The optimizer state comes from ``optimizer`` or, for sharded engines that assemble it
    themselves, ``optimizer_state=(tensors, json_part)`` in :func:`optimizer_to_tensors`' layout.
    """
    if (optimizer is None) == (optimizer_state is None):
        raise ValueError("save_checkpoint: give exactly one of optimizer and optimizer_state")
    root = Path(out_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    with atomic_dir(final) as tmp:
        model.save(tmp / "model")
        tensors, rest = optimizer_state if optimizer_state is not None else optimizer_to_tensors(optimizer)
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        if extra_tensors:
            save_file(extra_tensors, str(tmp / "extra.safetensors"))
        state = {"step": step, "optimizer": rest,
                 "lr_scheduler": lr_scheduler.state_dict() if lr_scheduler is not None else None, **extra}
        (tmp / "trainer.json").write_text(json.dumps(state, indent=1, default=str))
        write_manifest(tmp)
    for old in list_checkpoints(out_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(out_dir: Path) -> list[Path]:
    root = Path(out_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_RE.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def latest_valid_checkpoint(out_dir: Path) -> Path | None:
    """Newest checkpoint whose manifest verifies; torn or tampered ones are skipped with a warning."""
    for path in reversed(list_checkpoints(out_dir)):
        problem = verify_manifest(path)
        if problem is None:
            return path
        log.warning("checkpoint %s is unusable (%s); falling back to an earlier one", path, problem)
    return None


class Checkpointer:
    """Saves and loads a run's training state under ``out/checkpoints`` through its backend.

    What a checkpoint holds: the model folder (full weights, gathered by the backend), the
    optimizer state in the single-process layout (:mod:`geomerase.core.backend`), the LR-scheduler
    state, the EMA weights, each rank's data position and the run's config. ``save`` and ``load``
    are collective: every rank calls them; rank 0 writes and picks the checkpoint every rank loads.
    """

    def __init__(self, out: Path, backend, keep: int = 2):
        self.out, self.backend, self.keep = Path(out), backend, keep

    def save(self, step: int, model, ema, source, config: dict[str, Any], loader: str) -> Path | None:
        """Write checkpoint ``step``; returns its folder on rank 0 (None elsewhere)."""
        b = self.backend
        extra: dict = {"config": config, "world_size": b.world_size, "backend": b.name,
                       "data": {"loader": loader, "positions": b.all_gather_object(source.state_dict(step))}}
        tensors, rest = b.optimizer_state()
        ema_tensors: dict[str, torch.Tensor] = {}
        if ema is not None:
            ema_tensors = {f"ema.{i}": t.detach().contiguous().cpu() for i, t in enumerate(ema.tensors())}
            extra["ema"] = ema.state_json()
        path = None
        with b.full_weights():
            if b.is_main:
                path = save_checkpoint(self.out, step, model, None, b.lr_scheduler, extra, keep=self.keep,
                                       extra_tensors=ema_tensors, optimizer_state=(tensors, rest))
        b.barrier()
        return path

    def load(self, which: str, model, ema, source) -> int | None:
        """Restore the state of checkpoint ``which`` ('latest' or a folder); returns its step, or None
        when 'latest' finds no valid checkpoint."""
        b = self.backend
        found = latest_valid_checkpoint(self.out) if which == "latest" else Path(which)
        # Rank 0 decides, so every rank loads the same checkpoint even if files change meanwhile.
        chosen = b.broadcast_object(str(found) if found is not None else None)
        if chosen is None:
            if b.is_main:
                log.info("no checkpoint in %s; starting fresh", self.out)
            return None
        path = Path(chosen)
        state = json.loads((path / "trainer.json").read_text())
        te_sds = [(te, load_file(str(path / "model" / f"text_encoder{suffix}" / "model.safetensors")))
                  for suffix, _, te in model.text_encoders]
        with b.writable_full_weights():
            load_unet_weights(model.unet, path / "model")
            for text_encoder, te_sd in te_sds:
                text_encoder.load_state_dict(te_sd)
        b.load_optimizer_state(load_file(str(path / "optimizer.safetensors")), state["optimizer"])
        if b.lr_scheduler is not None and state.get("lr_scheduler") is not None:
            b.lr_scheduler.load_state_dict(state["lr_scheduler"])
        step = int(state["step"])
        if ema is not None:
            shadow = load_file(str(path / "extra.safetensors"))
            ema.load(state["ema"], [shadow[f"ema.{i}"] for i in range(len(shadow))])
        positions = state.get("data", {}).get("positions")
        source.load_state_dict(step, positions[b.rank] if positions and len(positions) == b.world_size else None)
        if b.is_main:
            log.info("resumed from %s at step %d", path, step)
        return step
