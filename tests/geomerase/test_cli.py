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
