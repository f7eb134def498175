"""`geomerase sample`: argument errors are one-line messages and exit status 2."""
from __future__ import annotations

from geomerase.cli import main


def test_sample_geom_seen_without_seen_cells_is_an_error(capsys, tmp_path):
    # Checked before the model loads: no model folder is needed to see the error.
    assert main(["sample", "--model", str(tmp_path / "no-model"), "--negative", "geom-seen"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--negative geom-seen needs --seen-cells GLOB" in err


def test_sample_seen_cells_with_another_negative_is_an_error(capsys, tmp_path):
    argv = ["sample", "--model", str(tmp_path / "no-model"), "--negative", "geom", "--seen-cells", "x/*.tar"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--seen-cells is only used by --negative geom-seen" in err


def test_train_bad_input_is_one_line_not_a_traceback(tmp_path, capsys):
    from geomerase.train import main as train_main

    rc = train_main(["--config", "configs/tiny_cpu.yaml", "model.size=debug", f"out_dir={tmp_path / 'run'}",
                     f"data.shards={tmp_path}/missing/*.tar", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "no shard files match" in err[0] and err[0].startswith("geomerase train:")


def test_data_import_help_lists_every_flag_with_help(capsys):
    import pytest

    with pytest.raises(SystemExit) as exc:
        main(["data", "import", "--help"])
    assert exc.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    for flag, text in [("--input INPUT", "folder of png/jpg/jpeg/webp images"), ("--out OUT", "new or empty output"),
                       ("--shard-size SHARD_SIZE", "images per tar shard")]:
        assert f"{flag} {text}" in out, out


def test_data_import_writes_shards_and_manifest(tmp_path, capsys):
    import json

    from PIL import Image

    (tmp_path / "in" / "sub").mkdir(parents=True)
    Image.new("RGB", (12, 9), (1, 2, 3)).save(tmp_path / "in" / "sub" / "cat.jpg")
    (tmp_path / "in" / "sub" / "cat.txt").write_text("a cat")
    assert main(["data", "import", "--input", str(tmp_path / "in"), "--out", str(tmp_path / "out")]) == 0
    assert json.loads(capsys.readouterr().out)["imported"] == 1
    manifest = json.loads((tmp_path / "out" / "_manifest.json").read_text())
    assert manifest["shards"] == {"00000.tar": 1} and manifest["files"][0] == {
        "file": "sub/cat.jpg", "key": "000000000", "caption_from": "sub/cat.txt"}


def test_data_import_missing_folder_is_one_line_and_exit_2(tmp_path, capsys):
    missing = tmp_path / "no-such-folder"
    assert main(["data", "import", "--input", str(missing), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("geomerase data: error:") and str(missing) in err
    assert not (tmp_path / "out").exists()
