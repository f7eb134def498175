"""``geomerase base build``: the shipped recipe runs end to end at a tiny scale (corpus, resumable
pretraining, export, sample grid), and a stopped build resumes."""
import json

from geomerase.cli import main
from geomerase.core.builtin import materialise
from geomerase.core.models import load_model
from geomerase.data.corpus import build_corpus, make_corpus_sample


def _args(tmp_path, *extra):
    return ["base", "build", "--config", "base32_cpu.yaml", "--no-progress", "corpus.n=40",
            f"run.out_dir={tmp_path / 'run'}", f"run.data.shards={tmp_path / 'run' / 'corpus' / 'corpus-*.tar'}",
            "run.data.batch_size=4", "run.train.max_steps=4", "run.train.save_every=2", "run.train.log_every=1",
            "run.train.warmup_steps=1", "run.train.threads=1", f"results_dir={tmp_path / 'results'}",
            f"weights_dir={tmp_path / 'weights'}", "sample_prompts=[a red circle on a blue background]", *extra]


def test_shipped_recipe_runs_stops_and_resumes(tmp_path, monkeypatch):
    monkeypatch.setenv("GEOMERASE_CACHE", str(tmp_path / "cache"))
    assert main(_args(tmp_path, "--until-step", "2")) == 0
    assert not (tmp_path / "weights" / "base32").exists()  # stopped before the export
    assert main(_args(tmp_path)) == 0
    calls = [json.loads(x) for x in (tmp_path / "run" / "build_log.jsonl").read_text().splitlines()]
    assert [c["end_step"] for c in calls] == [2, 4]  # the second call resumed at step 2
    record = json.loads((tmp_path / "results" / "base32" / "build.json").read_text())
    assert record["steps"] == 4 and record["rows_stored"] < 80 and record["bytes"] < 12_000_000
    for f in ("loss.png", "samples.png", "loss.csv"):
        assert (tmp_path / "results" / "base32" / f).is_file(), f
    m = load_model(materialise("base32", root=tmp_path / "weights"))
    assert m.grid == 0 and m.size == "base32" and m.coord_channels == 2


def test_corpus_is_a_pure_function_of_seed_and_index(tmp_path):
    a = make_corpus_sample(7, 3, 32, 0.5)
    assert a == make_corpus_sample(7, 3, 32, 0.5)
    kinds = {make_corpus_sample(7, i, 32, 0.5)[2]["kind"] for i in range(100)}
    assert kinds == {"icd", "rich"}
    rich = [make_corpus_sample(7, i, 32, 1.0) for i in range(20)]
    assert all(m["kind"] == "rich" and m["boxes"] == [] for _, _, m in rich)
    # every object of a rich scene is named with its position
    assert all(t.count(" in the ") + t.count(" at the ") + t.count(" on the ") >= m["n_objects"] for _, t, m in rich)
    s = build_corpus(30, 32, 7, tmp_path / "c", shard_size=20, progress=False)
    assert len(s["shards"]) == 2
    before = (tmp_path / "c" / "corpus-000000.tar").stat().st_mtime_ns
    build_corpus(30, 32, 7, tmp_path / "c", shard_size=20, progress=False)  # complete shards are kept
    assert (tmp_path / "c" / "corpus-000000.tar").stat().st_mtime_ns == before
