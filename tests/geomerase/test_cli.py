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
