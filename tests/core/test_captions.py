"""Caption rewriting, 77-token fitting and negative prompts (`core.captions`)."""
from __future__ import annotations

import random

import pytest

from geomerase.core.captions import (CaptionConfig, n_tokens, negative_mixture, negative_prompts, rewrite_caption,
                                     rewrite_concepts)
from geomerase.core.tokenizer import build_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(4)


def test_rewrite_caption_format(tok):
    rw = rewrite_caption("a red circle on a blue field", "qr code", [3, 7], tok)
    assert rw.text == "a red circle on a blue field, qr code <l3> <l7>"
    assert not rw.truncated
    assert rewrite_caption("a red circle", "qr code", [], tok).text == "a red circle"
    assert rewrite_caption("a red circle", "qr code", [1], tok, with_cells=False).text == "a red circle, qr code"


def test_rewrite_caption_overflow_drops_words_then_cells(tok):
    long_caption = " ".join(["a red circle on a blue field"] * 20)
    rw = rewrite_caption(long_caption, "qr code", list(range(16)), tok)
    assert n_tokens(tok, rw.text) <= 77
    assert rw.text.endswith("qr code " + " ".join(f"<l{i}>" for i in range(16)))
    assert rw.dropped_words and not rw.dropped_cells
    big = build_tokenizer(10)  # 100 location tokens cannot all fit
    rw = rewrite_caption("a red circle", "qr code", list(range(100)), big)
    assert n_tokens(big, rw.text) <= 77
    assert rw.dropped_cells and rw.dropped_words == ["a", "red", "circle"]
    kept = [int(t[2:-1]) for t in rw.text.split() if t.startswith("<l")]
    assert kept + rw.dropped_cells == list(range(100))


def test_negative_prompt_expansion():
    assert negative_prompts("none", "qr code", 4) == [""]
    assert negative_prompts("name", "qr code", 4) == ["qr code"]
    geom = negative_prompts("geom", "qr code", 2)
    assert geom == ["qr code <l0> <l1> <l2> <l3>"]
    multi = negative_prompts("geom-multi", "qr code", 2)
    assert multi == ["qr code <l0> <l1>", "qr code <l2> <l3>"]
    cells = negative_prompts("geom-cells", "qr code", 2)
    assert cells == ["qr code <l0>", "qr code <l1>", "qr code <l2>", "qr code <l3>"]
    prompts, weights = negative_mixture("geom-seen", "qr code", 4, [[15], [14, 15], [15], [0], []], top_k=2)
    assert prompts == ["qr code <l15>", "qr code <l0>"] and weights == pytest.approx([2 / 3, 1 / 3])
    with pytest.raises(ValueError):
        negative_prompts("bogus", "qr code", 4)


def test_caption_builder_modes(tok):
    rng = random.Random(0)
    qr = [("qr code", [1, 2])]
    clean = CaptionConfig(mode="clean", dropout=0.0).build(tok)
    assert clean("a red circle", qr, rng) == "a red circle"
    geom = CaptionConfig(mode="geom", dropout=0.0).build(tok)
    assert geom("a red circle", qr, rng) == "a red circle, qr code <l1> <l2>"
    assert geom("a red circle", [], rng) == "a red circle"
    exist = CaptionConfig(mode="existence", dropout=0.0).build(tok)
    assert exist("a red circle", qr, rng) == "a red circle, qr code"
    only = CaptionConfig(mode="geom", dropout=0.0, concept_only_prob=1.0).build(tok)
    assert only("a red circle", [("qr code", [4])], rng) == "qr code <l4>"
    first = CaptionConfig(mode="geom", dropout=0.0, concept_first_prob=1.0).build(tok)
    assert first("a red circle", [("qr code", [4])], rng) == "qr code <l4>, a red circle"
    drop = CaptionConfig(mode="geom", dropout=1.0).build(tok)
    assert drop("a red circle", qr, rng) == ""
    with pytest.raises(ValueError):
        CaptionConfig(concept_first_prob=0.7, concept_only_prob=0.5).build(tok)


def test_several_concepts_get_one_phrase_each(tok):
    rng = random.Random(0)
    found = [("watermark", [3, 4]), ("text", [12])]
    geom = CaptionConfig(mode="geom", dropout=0.0).build(tok)
    assert geom("a red circle", found, rng) == "a red circle, watermark <l3> <l4>, text <l12>"
    exist = CaptionConfig(mode="existence", dropout=0.0).build(tok)
    assert exist("a red circle", found, rng) == "a red circle, watermark, text"
    only = CaptionConfig(mode="geom", dropout=0.0, concept_only_prob=1.0).build(tok)
    assert only("a red circle", found, rng) == "watermark <l3> <l4>, text <l12>"
    shuffled = CaptionConfig(mode="geom", dropout=0.0, shuffle_cells=True).build(tok)
    out = shuffled("a red circle", [("watermark", list(range(8))), ("text", [12, 13])], random.Random(3))
    wm, tx = out.split(", ")[1:]  # each concept's cells shuffled within its own phrase
    assert sorted(_cells_of(wm)) == list(range(8)) and sorted(_cells_of(tx)) == [12, 13]


def test_fitting_several_concepts_trims_words_then_the_longest_phrase_never_a_concept():
    big = build_tokenizer(10)
    long_caption = " ".join(["a very long scene description"] * 12)
    found = [("watermark", list(range(75))), ("text", [90, 91]), ("qr code", [5])]
    out = rewrite_concepts(long_caption, found, big)
    assert n_tokens(big, out.text) <= 77
    for name, _ in found:
        assert f"{name} <l" in out.text  # every concept keeps its name and at least one cell
    assert "text <l90> <l91>" in out.text and "qr code <l5>" in out.text  # the short phrases are whole
    kept = _cells_of(out.text.split("watermark")[1].split(",")[0])
    assert 0 < len(kept) < 75 and kept == list(range(len(kept))) and out.dropped_cells == list(range(len(kept), 75))
    assert not out.text.startswith("a very")  # the caption went before the cells (no room left for it)
    short = rewrite_concepts("a red circle", [("watermark", [1]), ("text", [2])], big)
    assert short.text == "a red circle, watermark <l1>, text <l2>" and not short.truncated


def _cells_of(prompt: str) -> list[int]:
    return [int(t[2:-1]) for t in prompt.split() if t.startswith("<l")]


def test_corner_pairs_shuffle_and_fit_as_whole_pairs():
    pairs = [(i, i + 50) for i in range(40)]  # 80 tokens: must be trimmed at G = 10
    shuffled = CaptionConfig(mode="geom", dropout=0.0, shuffle_cells=True).build(build_tokenizer(10))
    for seed in range(5):
        out = shuffled("a red circle", [("qr code", list(pairs))], random.Random(seed))
        cells = _cells_of(out)
        assert n_tokens(build_tokenizer(10), out) <= 77 and len(cells) % 2 == 0
        got = list(zip(cells[::2], cells[1::2]))
        assert set(got) <= set(pairs) and len(got) < len(pairs)  # whole, ordered pairs only
        assert got != sorted(got) or seed > 0  # the pairs themselves were shuffled (seed 0)
    out = rewrite_concepts("a red circle", [("qr code", pairs)], build_tokenizer(10))
    kept = _cells_of(out.text)
    assert len(kept) % 2 == 0 and out.dropped_cells == [c for p in pairs[len(kept) // 2:] for c in p]


@pytest.mark.parametrize("kind", ["geom", "geom-multi", "geom-cells", "geom-seen"])
def test_negative_prompts_fit_clip_and_name_every_cell_at_g10(kind):
    big = build_tokenizer(10)
    seen = [list(range(100)), list(range(100)), [3, 4]]  # the most seen set has all 100 cells
    prompts, weights = negative_mixture(kind, "qr code", 10, seen, tokenizer=big)
    assert all(n_tokens(big, p) <= 77 for p in prompts)
    assert all(p.startswith("qr code <l") for p in prompts)
    assert sum(weights) == pytest.approx(1.0)
    if kind != "geom-seen":
        assert sorted(c for p in prompts for c in _cells_of(p)) == list(range(100))  # each cell named once
        per_cell = [w / len(_cells_of(p)) for p, w in zip(prompts, weights)]
        assert per_cell == pytest.approx([0.01] * len(prompts))  # equal weight per cell
    else:
        assert {c for p in prompts for c in _cells_of(p)} == set(range(100))
        assert sum(w for p, w in zip(prompts, weights) if len(_cells_of(p)) > 2) == pytest.approx(2 / 3)
    if kind == "geom":
        assert len(prompts) == 2  # 100 location tokens + "qr code" + start/end need two prompts


def test_negative_prompts_at_g4_are_unchanged(tok):
    every = " ".join(f"<l{i}>" for i in range(16))
    assert negative_mixture("geom", "qr code", 4, tokenizer=tok) == ([f"qr code {every}"], [1.0])
    rows = [" ".join(f"<l{r * 4 + c}>" for c in range(4)) for r in range(4)]
    assert negative_mixture("geom-multi", "qr code", 4, tokenizer=tok) == ([f"qr code {r}" for r in rows], [0.25] * 4)
    assert negative_mixture("geom-cells", "qr code", 4, tokenizer=tok) == (
        [f"qr code <l{i}>" for i in range(16)], [1 / 16] * 16)
    assert negative_mixture("geom-seen", "qr code", 4, [[2, 1], [1, 2], [5]], tokenizer=tok) == (
        ["qr code <l1> <l2>", "qr code <l5>"], [2 / 3, 1 / 3])


def test_negative_for_several_concepts_names_every_concept_with_all_cells(tok):
    names = ["qr code", "watermark", "text"]
    assert negative_mixture("name", names, 4, tokenizer=tok) == (["qr code, watermark, text"], [1.0])
    (p,), (w,) = negative_mixture("geom", names, 4, tokenizer=tok)
    cells = " ".join(f"<l{i}>" for i in range(16))
    assert p == f"qr code {cells}, watermark {cells}, text {cells}" and w == 1.0 and n_tokens(tok, p) <= 77
    assert negative_mixture("geom", ["qr code"], 4, tokenizer=tok) == negative_mixture("geom", "qr code", 4, tokenizer=tok)
    # G = 6: 3 x 37 tokens do not fit one prompt; each concept gets its own, equal shares
    big = build_tokenizer(6)
    ps, ws = negative_mixture("geom", names, 6, tokenizer=big)
    assert [q.split(" <l")[0] for q in ps] == names and ws == pytest.approx([1 / 3] * 3)
    assert all(_cells_of(q) == list(range(36)) and n_tokens(big, q) <= 77 for q in ps)
    ps, ws = negative_mixture("geom-cells", names[:2], 4, tokenizer=tok)
    assert len(ps) == 32 and sum(ws) == pytest.approx(1.0)

