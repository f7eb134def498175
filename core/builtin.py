"""Base models shipped inside the package, loaded by name: ``model.pretrained=builtin:base32``.

A builtin is a diffusers-layout folder under ``geomerase/weights/<name>/`` written by
:func:`export_builtin` (``geomerase base build``):

* ``unet/`` and ``text_encoder/``: configs and fp16 safetensors;
* the text encoder's token-embedding table is not stored whole. A base model's vocabulary rows
  start as ``seeded_vocab_rows(V, D, seed)`` (``core.diffusion_model``), and rows that no training caption
  used never receive a gradient, so only the used rows are stored
  (``text_encoder/token_rows.safetensors``: ``ids`` int64, ``rows`` fp16); the rest are
  regenerated from the seed. The sha256 of the whole fp16 table is recorded and checked, so the
  regenerated table is bit-identical to the one exported;
* ``scheduler/``, ``geomerase.json`` (grid 0: no location tokens yet) and ``manifest.json``
  (sha256 of every file, checked before use). The tokenizer is CLIP's, rebuilt from the cached BPE
  table (``core.tokenizer``), so it is not shipped either.

:func:`materialise` assembles the complete fp32 diffusers folder once per content hash in the user
cache (``$GEOMERASE_CACHE/builtin/``) and returns its path; ``load_model`` then adds the G^2
location tokens as for any pretrained Stable Diffusion folder.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from importlib import resources
from pathlib import Path
from typing import Sequence

import torch
from safetensors.torch import load_file, save_file

from geomerase.core.checkpoint import verify_manifest, write_manifest
from geomerase.core.diffusion_model import META_FILE, DiffusionModel, seeded_vocab_rows, stored_resolution
from geomerase.core.tokenizer import base_clip_tokenizer, cache_dir
from geomerase.data.shards import atomic_dir

PREFIX = "builtin:"
TOKEN_SUFFIX = "token_embedding.weight"
UNET_FILE = "diffusion_pytorch_model.safetensors"
TE_FILE = "model.safetensors"
ROWS_FILE = "token_rows.safetensors"


def builtin_root() -> Path:
    """``geomerase/weights``: where the shipped base models live inside the package."""
    return Path(str(resources.files("geomerase"))) / "weights"


def available() -> list[str]:
    """Names of the builtins present in this installation."""
    root = builtin_root()
    return sorted(p.name for p in root.iterdir() if (p / "manifest.json").is_file()) if root.is_dir() else []


def resolve_pretrained(spec: str) -> str:
    """``builtin:NAME`` -> the materialised folder of that builtin; any other value unchanged (a path)."""
    if not spec.startswith(PREFIX):
        return spec
    return str(materialise(spec[len(PREFIX):]))


def pretrained_resolution(spec: str) -> int:
    """Pixel resolution of ``builtin:NAME`` or of a model folder, without loading (or materialising) it."""
    if spec.startswith(PREFIX):
        src = builtin_root() / spec[len(PREFIX):]
        if not (src / "manifest.json").is_file():
            raise FileNotFoundError(f"no builtin model {spec!r} (available: {available() or 'none'})")
        return stored_resolution(src)
    return stored_resolution(spec)


def _sha256_bytes(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def used_token_ids(tokenizer, captions: Sequence[str]) -> list[int]:
    """Every id the padded, truncated encodings of ``captions`` (and the empty caption) contain."""
    ids: set[int] = set()
    texts = list(dict.fromkeys(["", *captions]))
    for i in range(0, len(texts), 512):
        enc = tokenizer(texts[i:i + 512], padding="max_length", truncation=True,
                        max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
        ids.update(enc.unique().tolist())
    return sorted(ids)


def export_builtin(model: DiffusionModel, model_dir: Path, name: str, captions: Sequence[str], seed: int,
                   root: Path | None = None) -> dict:
    """Write ``model``, the trained base model loaded from ``model_dir``, as builtin ``name`` (see the
    module docstring).

    ``captions``: every caption the model trained on (which vocabulary rows are kept); ``seed``: the
    model's init seed (regenerates the rest). Returns the export record (sizes, rows kept, checks).
    """
    if model.grid:
        raise ValueError(f"{model_dir}: a base model has no location tokens (grid 0), this one has grid {model.grid}")
    table = model.text_encoder.get_input_embeddings().weight.detach().float()
    vocab, dim = table.shape
    ids = used_token_ids(model.tokenizer, captions)
    seeded = seeded_vocab_rows(vocab, dim, seed)
    unused = torch.ones(vocab, dtype=torch.bool)
    unused[ids] = False
    # Rows no caption used were never touched (no gradient, no weight decay): they are still the seeded
    # initialisation. Anything else means the model was not built with a seeded vocabulary.
    drift = int((table[unused] != seeded[unused]).any(1).sum())
    if drift:
        raise ValueError(f"{model_dir}: {drift} vocabulary rows no caption uses differ from the seeded "
                         f"initialisation (seed {seed}); was the model built with ModelSize.seeded_vocab?")
    full16 = table.half()
    root = root or builtin_root()
    with atomic_dir(root / name) as tmp:
        model.unet.to(torch.float16).save_pretrained(tmp / "unet", safe_serialization=True)
        state = model.text_encoder.state_dict()
        token_key = next(k for k in state if k.endswith(TOKEN_SUFFIX))
        te = {k: v.detach().to(torch.float16).contiguous() for k, v in state.items() if k != token_key}
        (tmp / "text_encoder").mkdir()
        model.text_encoder.config.to_json_file(tmp / "text_encoder" / "config.json")
        save_file(te, str(tmp / "text_encoder" / TE_FILE))
        save_file({"ids": torch.tensor(ids, dtype=torch.int64), "rows": full16[ids].contiguous()},
                  str(tmp / "text_encoder" / ROWS_FILE))
        model.noise_scheduler.save_pretrained(tmp / "scheduler")
        meta = json.loads((model_dir / META_FILE).read_text())
        meta["builtin"] = {"name": name, "token_key": token_key, "vocab_seed": seed, "vocab_size": vocab, "dim": dim,
                           "table_fp16_sha256": _sha256_bytes(full16), "rows_stored": len(ids)}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        write_manifest(tmp)
        _publish_modes(tmp)
    files = {str(p.relative_to(root / name)): p.stat().st_size for p in sorted((root / name).rglob("*")) if p.is_file()}
    return {"name": name, "rows_stored": len(ids), "vocab_size": vocab, "bytes": sum(files.values()), "files": files}


def _publish_modes(folder: Path) -> None:
    """World-readable files and folders (temp files and folders are created private)."""
    folder.chmod(0o755)
    for p in folder.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)


def materialise(name: str, root: Path | None = None) -> Path:
    """The complete fp32 diffusers folder of builtin ``name`` in the user cache (built once per content)."""
    root = root or builtin_root()
    src = root / name
    if not (src / "manifest.json").is_file():
        raise FileNotFoundError(f"no builtin model {name!r} (available: {available() or 'none'}; "
                                f"made by `geomerase base build`)")
    problem = verify_manifest(src)
    if problem:
        raise ValueError(f"builtin model {name!r} at {src}: {problem}")
    digest = hashlib.sha256((src / "manifest.json").read_bytes()).hexdigest()[:16]
    dest = cache_dir() / "builtin" / f"{name}-{digest}"
    if (dest / META_FILE).is_file():
        return dest
    meta = json.loads((src / META_FILE).read_text())
    b = meta.pop("builtin")
    table = seeded_vocab_rows(b["vocab_size"], b["dim"], b["vocab_seed"]).half()
    stored = load_file(str(src / "text_encoder" / ROWS_FILE))
    table[stored["ids"]] = stored["rows"]
    if _sha256_bytes(table) != b["table_fp16_sha256"]:
        raise ValueError(f"builtin model {name!r}: the regenerated token-embedding table does not match its "
                         f"recorded sha256 ({src / META_FILE}); torch's seeded generator changed?")
    with atomic_dir(dest) as tmp:
        (tmp / "unet").mkdir()
        shutil.copyfile(src / "unet" / "config.json", tmp / "unet" / "config.json")
        save_file({k: v.float() for k, v in load_file(str(src / "unet" / UNET_FILE)).items()},
                  str(tmp / "unet" / UNET_FILE))
        (tmp / "text_encoder").mkdir()
        cfg = json.loads((src / "text_encoder" / "config.json").read_text())
        cfg["torch_dtype"] = cfg["dtype"] = "float32"
        (tmp / "text_encoder" / "config.json").write_text(json.dumps(cfg, indent=2))
        te = {k: v.float() for k, v in load_file(str(src / "text_encoder" / TE_FILE)).items()}
        te[b["token_key"]] = table.float()
        save_file(te, str(tmp / "text_encoder" / TE_FILE))
        base_clip_tokenizer().save_pretrained(tmp / "tokenizer")
        shutil.copytree(src / "scheduler", tmp / "scheduler")
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return dest
