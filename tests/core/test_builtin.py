"""Shipped base models: export keeps only the used vocabulary rows, materialise regenerates the
rest exactly, manifests catch tampering, and ``builtin:NAME`` resolves through ModelConfig."""

import pytest
import torch
from safetensors.torch import load_file

from geomerase.core import builtin
from geomerase.core.diffusion_model import seeded_vocab_rows
from geomerase.core.models import ModelConfig, build_random, load_model


@pytest.fixture()
def exported(tmp_path, monkeypatch):
    monkeypatch.setenv("GEOMERASE_CACHE", str(tmp_path / "cache"))
    model = build_random("base32", grid=0, seed=3)
    with torch.no_grad():  # "training" touched the rows of these captions only
        ids = builtin.used_token_ids(model.tokenizer, ["a red circle on a blue background"])
        model.text_encoder.get_input_embeddings().weight[ids] += 1.0
    model.save(tmp_path / "trained")
    root = tmp_path / "weights"
    record = builtin.export_builtin(load_model(tmp_path / "trained"), tmp_path / "trained", "b",
                                    ["a red circle on a blue background"], seed=3, root=root)
    return model, root, record


def test_export_stores_used_rows_only_and_materialise_is_exact(exported):
    model, root, record = exported
    assert record["rows_stored"] == len(builtin.used_token_ids(model.tokenizer, ["a red circle on a blue background"]))
    assert record["rows_stored"] < 20 and record["vocab_size"] == 49408
    te = load_file(str(root / "b" / "text_encoder" / builtin.TE_FILE))
    assert not any(k.endswith(builtin.TOKEN_SUFFIX) for k in te) and all(v.dtype == torch.float16 for v in te.values())
    assert sum(v.numel() for v in te.values()) < 1_000_000  # the 49k-row table is not stored
    folder = builtin.materialise("b", root=root)
    loaded = load_model(folder)
    assert loaded.grid == 0
    want = model.text_encoder.get_input_embeddings().weight.detach().half().float()
    assert torch.equal(loaded.text_encoder.get_input_embeddings().weight, want)
    for (k, a), b in zip(model.unet.state_dict().items(), loaded.unet.state_dict().values()):
        assert torch.equal(a.half().float(), b), k
    assert builtin.materialise("b", root=root) == folder  # cached by content


def test_unused_rows_must_be_the_seeded_init(tmp_path):
    model = build_random("base32", grid=0, seed=3)
    with torch.no_grad():
        model.text_encoder.get_input_embeddings().weight[1000] += 1.0  # a row no caption uses
    model.save(tmp_path / "m")
    with pytest.raises(ValueError, match="differ from the seeded"):
        builtin.export_builtin(load_model(tmp_path / "m"), tmp_path / "m", "b", ["a red circle"], seed=3,
                               root=tmp_path / "w")


def test_tampered_file_is_refused(exported):
    _, root, _ = exported
    path = root / "b" / "unet" / builtin.UNET_FILE
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum mismatch in unet"):
        builtin.materialise("b", root=root)


def test_unknown_builtin_names_the_command(tmp_path):
    with pytest.raises(FileNotFoundError, match="geomerase base build"):
        builtin.materialise("nope", root=tmp_path)


def test_builtin_prefix_loads_with_location_tokens(exported, monkeypatch):
    _, root, _ = exported
    monkeypatch.setattr(builtin, "builtin_root", lambda: root)
    m = ModelConfig(pretrained="builtin:b", grid=4, loc_init="position-words").build()
    assert m.grid == 4 and len(m.loc_token_ids) == 16
    emb = m.text_encoder.get_input_embeddings().weight
    # <l0> (top-left cell) starts as the mix of "top left" only; <l15> as "bottom right".
    tl = emb[m.tokenizer("top left", add_special_tokens=False).input_ids].mean(0)
    br = emb[m.tokenizer("bottom right", add_special_tokens=False).input_ids].mean(0)
    assert torch.allclose(emb[m.loc_token_ids[0]], tl, atol=1e-6)
    assert torch.allclose(emb[m.loc_token_ids[15]], br, atol=1e-6)
    assert not torch.allclose(emb[m.loc_token_ids[1]], emb[m.loc_token_ids[2]])


def test_seeded_vocab_is_a_pure_function_of_the_seed():
    a, b = seeded_vocab_rows(50, 8, 1), seeded_vocab_rows(50, 8, 1)
    assert torch.equal(a, b) and not torch.equal(a, seeded_vocab_rows(50, 8, 2))
    assert abs(float(a.std()) - 0.02) < 0.005
    model = build_random("base32", grid=0, seed=5)
    assert torch.equal(model.text_encoder.get_input_embeddings().weight.detach(),
                       seeded_vocab_rows(49408, 128, 5))
