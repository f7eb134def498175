"""Caption rewriting, CLIP-length fitting, training-time caption variants and negative prompts.

The canonical rewrite is ``"<caption>, <concept name> <l..> <l..>"`` (one such phrase per concept
found, joined by ", "). It must fit CLIP's 77 positions (start and end tokens included); when it
cannot, caption words are dropped from the end first (the location tokens are what the method
needs), then trailing location tokens of the longest phrase, never a concept's name, and the result
says what was dropped.
"""
from __future__ import annotations

import functools
import random
from dataclasses import dataclass, field
from typing import Literal, Protocol, Sequence

from geomerase.core.geometry import CLIP_MAX_LENGTH, CellUnit, loc_token, unit_cells

CaptionMode = Literal["clean", "existence", "geom"]
NegativeKind = Literal["none", "name", "geom", "geom-multi", "geom-cells", "geom-seen"]


class _Tokenizer(Protocol):
    def __call__(self, text: str, **kw): ...


def n_tokens(tokenizer: _Tokenizer, text: str) -> int:
    """Token count of ``text`` with start/end tokens."""
    return len(tokenizer(text, truncation=False, add_special_tokens=True)["input_ids"])


def concept_phrase(concept_name: str, cells: Sequence[CellUnit] = ()) -> str:
    """``"qr code <l3> <l7>"`` (or just the name when no cells); a corner pair gives its two tokens."""
    return " ".join([concept_name, *(loc_token(c) for c in unit_cells(cells))])


@dataclass
class Rewrite:
    """The result of :func:`rewrite_caption`."""

    text: str
    """The rewritten caption, guaranteed to fit ``max_length`` tokens."""
    dropped_words: list[str] = field(default_factory=list)
    """Caption words removed (from the end) to make room."""
    dropped_cells: list[int] = field(default_factory=list)
    """Location cells removed because even the concept phrase alone did not fit."""

    @property
    def truncated(self) -> bool:
        return bool(self.dropped_words or self.dropped_cells)


def rewrite_caption(
    caption: str,
    concept_name: str | None,
    cells: Sequence[int],
    tokenizer: _Tokenizer,
    max_length: int = CLIP_MAX_LENGTH,
    with_cells: bool = True,
) -> Rewrite:
    """``"<caption>, <concept> <l..>"`` fitted to ``max_length`` CLIP tokens.

    ``concept_name=None`` or an empty ``cells`` with ``with_cells`` (no detection)
    returns the caption unchanged (fitted). ``with_cells=False`` gives the
    existence-only caption ``"<caption>, <concept>"``.
    """
    cells = list(cells) if with_cells else []
    if concept_name is None or (with_cells and not cells):
        return _fit_words(caption.strip(), "", tokenizer, max_length)
    return rewrite_concepts(caption, [(concept_name, cells)], tokenizer, max_length)


def rewrite_concepts(caption: str, concepts: Sequence[tuple[str, Sequence[CellUnit]]], tokenizer: _Tokenizer,
                     max_length: int = CLIP_MAX_LENGTH) -> Rewrite:
    """``"<caption>, <name> <l..>, <name> <l..>"``: one phrase per concept, fitted to ``max_length``.

    The phrases are fitted first (:func:`fit_phrases`: location tokens go, never a concept), then
    caption words are dropped from the end. No concepts: the caption alone, fitted."""
    if not concepts:
        return _fit_words(caption.strip(), "", tokenizer, max_length)
    phrase, dropped = fit_phrases(concepts, tokenizer, max_length)
    out = _fit_words(caption.strip(), phrase, tokenizer, max_length)
    out.dropped_cells = unit_cells(u for d in dropped for u in d)
    return out


def fit_phrases(concepts: Sequence[tuple[str, Sequence[CellUnit]]], tokenizer: _Tokenizer,
                max_length: int = CLIP_MAX_LENGTH) -> tuple[str, list[list[CellUnit]]]:
    """The concept phrases joined by ``", "``, within ``max_length`` tokens, and the units dropped
    per concept. While they do not fit, the last location unit (a cell, or a whole corner pair) of
    the concept with the most units goes (the first such concept on ties), so no concept loses
    its name or all its cells before the others are trimmed as far. A ValueError when the names
    alone do not fit."""
    names = [name for name, _ in concepts]
    cells = [list(cs) for _, cs in concepts]
    dropped: list[list[CellUnit]] = [[] for _ in concepts]

    def text() -> str:
        return ", ".join(concept_phrase(n, cs) for n, cs in zip(names, cells))

    while n_tokens(tokenizer, text()) > max_length and any(cells):
        i = max(range(len(cells)), key=lambda j: len(cells[j]))
        dropped[i].insert(0, cells[i].pop())
    if n_tokens(tokenizer, text()) > max_length:
        raise ValueError(f"concept name(s) {names!r} alone exceed {max_length} tokens")
    return text(), dropped


def _fit_words(caption: str, suffix: str, tokenizer: _Tokenizer, max_length: int) -> Rewrite:
    words = caption.split()
    dropped: list[str] = []

    def join(ws: list[str]) -> str:
        body = " ".join(ws).rstrip(" ,")
        if suffix and body:
            return f"{body}, {suffix}"
        return body or suffix

    text = join(words)
    if n_tokens(tokenizer, text) <= max_length:
        return Rewrite(text)
    # Binary search on the number of caption words kept: tokenising is the cost.
    lo, hi = 0, len(words)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if n_tokens(tokenizer, join(words[:mid])) <= max_length:
            lo = mid
        else:
            hi = mid - 1
    dropped = words[lo:]
    return Rewrite(join(words[:lo]), dropped_words=dropped)


@dataclass
class CaptionConfig:
    mode: CaptionMode = "geom"
    """'clean': the original caption (plain fine-tune); 'existence': caption + concept name;
    'geom': caption + concept name + location tokens (Geom-Erasing)."""
    concept_first_prob: float = 0.0
    """Probability of putting the concept phrase before the scene description, so its meaning
    does not depend on a fixed position under CLIP's causal attention."""
    concept_only_prob: float = 0.0
    """Probability of training on the concept phrase alone (the form a negative prompt has)."""
    shuffle_cells: bool = False
    """Shuffle the order of the location units in each caption (a corner pair stays in order)."""
    dropout: float = 0.1
    """Probability of the empty caption (trains the unconditional branch for guidance)."""

    def validate(self) -> None:
        for name in ("concept_first_prob", "concept_only_prob", "dropout"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"captions.{name} must be in [0, 1], got {v}")
        if self.concept_first_prob + self.concept_only_prob > 1.0:
            raise ValueError("captions.concept_first_prob + concept_only_prob must be <= 1")

    def build(self, tokenizer: _Tokenizer, max_length: int = CLIP_MAX_LENGTH) -> "CaptionBuilder":
        self.validate()
        return CaptionBuilder(self, tokenizer, max_length)


class CaptionBuilder:
    """Turns (clean caption, concepts found) into the training caption for a mode.

    ``concepts``: ``[(concept name, units), ...]``, one entry per concept the annotator found (a
    :class:`~geomerase.data.loader.Record`'s order); the caption gets one phrase per concept
    (``geom``: name and location tokens; ``existence``: the name). A unit is a cell or a corner
    pair (:data:`~geomerase.core.geometry.CellUnit`): shuffling and fitting move whole units.

    Deterministic given the ``random.Random`` passed in, so a resumed run sees the
    same captions.
    """

    def __init__(self, cfg: CaptionConfig, tokenizer: _Tokenizer, max_length: int = CLIP_MAX_LENGTH):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.max_length = max_length

    def __call__(self, caption: str, concepts: Sequence[tuple[str, Sequence[CellUnit]]], rng: random.Random) -> str:
        cfg = self.cfg
        if rng.random() < cfg.dropout:
            return ""
        found = [(name, list(cells) if cfg.mode == "geom" else []) for name, cells in concepts if cells]
        if cfg.mode == "clean" or not found:
            return _fit_words(caption, "", self.tokenizer, self.max_length).text
        if cfg.shuffle_cells:
            for _, cells in found:
                rng.shuffle(cells)
        u = rng.random()
        if u < cfg.concept_only_prob + cfg.concept_first_prob:
            phrase = fit_phrases(found, self.tokenizer, self.max_length)[0]
            if u < cfg.concept_only_prob:
                return phrase
            fitted = _fit_words(caption, "", self.tokenizer, self.max_length - n_tokens(self.tokenizer, phrase) + 1)
            return f"{phrase}, {fitted.text}" if fitted.text else phrase
        return rewrite_concepts(caption, found, self.tokenizer, self.max_length).text


def negative_mixture(kind: NegativeKind, concept_name: str | Sequence[str], grid: int,
                     seen: Sequence[Sequence[int]] = (), top_k: int = 8, tokenizer: _Tokenizer | None = None,
                     max_length: int = CLIP_MAX_LENGTH) -> tuple[list[str], list[float]]:
    """Negative prompt(s) and their weights for guidance (the sampler mixes their predictions).

    ``concept_name`` may list several concepts (a mixed dataset): ``name`` joins the names in one
    prompt; ``geom`` puts every concept with all its cells in one prompt
    (``qr code <l0>…, watermark <l0>…``), or, when that exceeds ``max_length``, gives each concept
    its own ``geom`` prompt(s) at an equal share of the weight; the other ``geom*`` kinds mix the
    concepts' own mixtures at equal shares. A single name in a list is the single-concept case.

    * ``none``: ``[""]`` (plain classifier-free guidance).
    * ``name``: ``[concept_name]`` (the usual negative prompt).
    * ``geom``: ``[concept_name + all G^2 location tokens]`` (Geom-Erasing as published).
    * ``geom-multi``: one negative per grid row, ``concept_name + that row's tokens``.
    * ``geom-cells``: one negative per cell, ``concept_name <li>``, equally weighted: "the
      concept in any one place", each prompt of the form the model saw in training.
    * ``geom-seen``: the ``top_k`` cell sets most often annotated in training (``seen`` lists
      each training image's cells), weighted by frequency: the concept's training geometry.
      With no annotated cells in ``seen`` it is ``geom-cells``.

    Every prompt fits ``max_length`` tokens of ``tokenizer`` (default: the project's tokenizer
    for ``grid``): a phrase whose cells do not fit is split into several prompts, each
    ``concept <cells...>``, that share its weight in proportion to their cells, so every cell
    is still named and keeps its weight.
    """
    names = [concept_name] if isinstance(concept_name, str) else list(concept_name)
    if not names:
        raise ValueError("negative_mixture needs at least one concept name")
    if kind == "none":
        return [""], [1.0]
    if kind == "name":
        return [", ".join(names)], [1.0]
    if kind not in NEGATIVE_KINDS:
        raise ValueError(f"unknown negative prompt kind {kind!r}; choose from {list(NEGATIVE_KINDS)}")
    tokenizer = tokenizer if tokenizer is not None else _project_tokenizer(grid)
    if kind == "geom" and len(names) > 1:
        joined = ", ".join(concept_phrase(n, range(grid * grid)) for n in names)
        if n_tokens(tokenizer, joined) <= max_length:
            return [joined], [1.0]
    prompts: list[str] = []
    weights: list[float] = []
    for name in names:
        p, w = _fit_mixture(name, _cell_mixture(kind, grid, seen, top_k), tokenizer, max_length)
        prompts += p
        weights += [x / len(names) for x in w]
    return prompts, weights


def _cell_mixture(kind: NegativeKind, grid: int, seen: Sequence[Sequence[int]],
                  top_k: int) -> list[tuple[list[int], float]]:
    """The (cells, weight) entries of a ``geom*`` mixture, before fitting to the token limit."""
    n = grid * grid
    if kind == "geom":
        return [(list(range(n)), 1.0)]
    if kind == "geom-multi":
        return [(list(range(r * grid, (r + 1) * grid)), 1.0 / grid) for r in range(grid)]
    counts: dict[tuple[int, ...], int] = {}
    for cells in seen if kind == "geom-seen" else ():
        if cells:
            key = tuple(sorted(set(cells)))
            counts[key] = counts.get(key, 0) + 1
    if not counts:  # geom-cells, or geom-seen without annotated cells
        return [([c], 1.0 / n) for c in range(n)]
    top = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:top_k]
    total = sum(k for _, k in top)
    return [(list(cells), k / total) for cells, k in top]


def _fit_mixture(concept_name: str, entries: list[tuple[list[int], float]], tokenizer: _Tokenizer,
                 max_length: int) -> tuple[list[str], list[float]]:
    """Prompts ``concept <cells>`` within ``max_length`` tokens; an entry too long is split in order."""
    prompts, weights = [], []
    for cells, weight in entries:
        rest = list(cells)
        while rest:
            k = _cells_that_fit(concept_name, rest, tokenizer, max_length)
            prompts.append(concept_phrase(concept_name, rest[:k]))
            weights.append(weight * (k / len(cells)))
            rest = rest[k:]
    return prompts, weights


def _cells_that_fit(concept_name: str, cells: list[int], tokenizer: _Tokenizer, max_length: int) -> int:
    """The largest ``k >= 1`` with ``concept <cells[:k]>`` within ``max_length`` tokens."""
    if n_tokens(tokenizer, concept_phrase(concept_name, cells)) <= max_length:
        return len(cells)
    lo, hi = 0, len(cells) - 1
    while lo < hi:  # binary search: tokenising is the cost
        mid = (lo + hi + 1) // 2
        if n_tokens(tokenizer, concept_phrase(concept_name, cells[:mid])) <= max_length:
            lo = mid
        else:
            hi = mid - 1
    if lo == 0:
        raise ValueError(f"negative prompt {concept_phrase(concept_name, cells[:1])!r} exceeds {max_length} tokens")
    return lo


@functools.lru_cache(maxsize=4)
def _project_tokenizer(grid: int) -> _Tokenizer:
    from geomerase.core.tokenizer import build_tokenizer

    return build_tokenizer(grid)


NEGATIVE_KINDS = ("none", "name", "geom", "geom-multi", "geom-cells", "geom-seen")


def negative_prompts(kind: NegativeKind, concept_name: str | Sequence[str], grid: int,
                     seen: Sequence[Sequence[int]] = ()) -> list[str]:
    """The prompts of :func:`negative_mixture` (weights dropped)."""
    return negative_mixture(kind, concept_name, grid, seen)[0]
