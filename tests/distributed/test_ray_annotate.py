"""Ray annotation engine: same bytes as the local engine, exactly once, faults skipped and counted,
resumable, a killed worker retried. One embedded Ray (2 CPUs) serves the whole module."""
from __future__ import annotations

import io
import json
import os
import signal
import tarfile
import threading
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from geomerase.core.annotate import annotate_shards  # noqa: E402
from geomerase.core.geometry import GeometryConfig  # noqa: E402
from geomerase.data.icd import build_icd  # noqa: E402
from geomerase.data.shards import iter_samples  # noqa: E402
from geomerase.distributed.ray_annotate import (AnnotatorSpec, RayAnnotateConfig, annotate_shards_ray,  # noqa: E402
                                                start_ray)

GEOM = GeometryConfig(grid=4, overlap_threshold=0.25)


@pytest.fixture(scope="module")
def ray_local():
    started, _ = start_ray(RayAnnotateConfig(num_workers=2))
    yield
    if started:
        ray.shutdown()


def _tar_members(path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]


def _write_raw_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def faulty_input(tmp_path_factory) -> tuple[Path, dict[str, list[str]]]:
    """3 good shards, one shard with bad samples, one truncated tar; returns (dir, keys per shard)."""
    root = tmp_path_factory.mktemp("rayin")
    build_icd("qr", 60, 0.5, 64, 0, root / "src", shard_size=20, progress=False)
    inp = root / "in"
    inp.mkdir()
    keys: dict[str, list[str]] = {}
    for p in sorted((root / "src").glob("*.tar")):
        (inp / p.name).write_bytes(p.read_bytes())
        keys[p.name] = sorted({m[0].split(".")[0] for m in _tar_members(p)})
    # Bad samples, built from members of a good shard (its first 8 samples).
    good = _tar_members(root / "src" / "icd-qr-000000.tar")
    by_key: dict[str, dict[str, bytes]] = {}
    for name, data in good:
        k, ext = name.split(".", 1)
        by_key.setdefault(k, {})[ext] = data
    ks = sorted(by_key)[:8]
    m: list[tuple[str, bytes]] = []
    add = lambda k, exts, **repl: m.extend((f"{k}.{e}", repl.get(e, by_key[k][e])) for e in exts)  # noqa: E731
    add(ks[0], ["json", "png", "txt"])                                              # fine
    add(ks[1], ["json", "png", "txt"], png=by_key[ks[1]]["png"][: len(by_key[ks[1]]["png"]) // 2])  # truncated image
    add(ks[2], ["json", "png"])                                                     # missing caption
    add(ks[3], ["json", "png"])                                                     # non-contiguous: txt comes later
    add(ks[4], ["json", "png", "txt"])
    add(ks[3], ["txt"])
    add(ks[5], ["json", "png", "txt"], txt=b"  ")                                   # empty caption
    add(ks[6], ["json", "png", "txt"])
    _write_raw_tar(inp / "bad-000000.tar", m)
    keys["bad-000000.tar"] = ks[:7]
    # A tar cut in the middle of a member: the samples before the damage survive.
    data = (root / "src" / "icd-qr-000001.tar").read_bytes()
    (inp / "cut-000000.tar").write_bytes(data[: int(len(data) * 0.55)])
    keys["cut-000000.tar"] = sorted({n.split(".")[0] for n, _ in _tar_members(root / "src" / "icd-qr-000001.tar")})
    return inp, keys


def _outputs(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.tar"))}


def _strip(counts: dict) -> dict:
    return {k: v for k, v in counts.items() if k not in ("seconds", "cpu_seconds")}


def _check_exactly_once(out: Path, keys: dict[str, list[str]]) -> None:
    manifest = json.loads((out / "_manifest.json").read_text())
    assert set(manifest["shards"]) == set(keys)
    for name, expected in keys.items():
        counts = manifest["shards"][name]
        written = [s.key for s in iter_samples([str(out / name)])]
        skipped = [r["key"] for r in counts["skipped_samples"]]
        assert len(written) == len(set(written)) == counts["annotated"]
        assert len(skipped) == len(set(skipped)) and not set(written) & set(skipped)
        assert counts["read"] == counts["annotated"] + sum(counts["skipped"].values())
        if name.startswith("cut"):  # a prefix survives, the damaged sample is named, the rest is lost
            assert written == expected[: len(written)] and skipped == [expected[len(written)]]
            assert counts["skipped"] == {"corrupt shard": 1} and 0 < len(written) < len(expected)
        else:
            assert sorted(written + skipped) == sorted(expected), name


def test_ray_matches_local_bytes_and_counts_faults(ray_local, faulty_input, tmp_path):
    inp, keys = faulty_input
    spec = AnnotatorSpec(detector="oracle", concept="qr", geometry=GEOM)
    local = annotate_shards(spec.build(), str(inp / "*.tar"), tmp_path / "local", progress=False)
    m = annotate_shards_ray(spec, str(inp / "*.tar"), tmp_path / "ray", RayAnnotateConfig(num_workers=2, progress=False))
    assert _outputs(tmp_path / "local") == _outputs(tmp_path / "ray")  # byte-identical shards, captions included
    assert {k: _strip(v) for k, v in local["shards"].items()} == {k: _strip(v) for k, v in m["shards"].items()}
    bad = m["shards"]["bad-000000.tar"]
    assert bad["skipped"] == {"bad image": 1, "empty caption": 1, "missing field 'txt'": 1, "non-contiguous key": 1}
    assert bad["annotated"] == 3
    _check_exactly_once(tmp_path / "ray", keys)
    assert m["totals"]["read"] == sum(c["read"] for c in m["shards"].values())
    assert m["last_run"]["engine"] == "ray" and m["last_run"]["images_per_s"] > 0
    # A rerun finds every shard committed and touches nothing.
    mtimes = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "ray").glob("*.tar")}
    again = annotate_shards_ray(spec, str(inp / "*.tar"), tmp_path / "ray", RayAnnotateConfig(progress=False))
    assert again["last_run"]["shards_done"] == 0
    assert mtimes == {p.name: p.stat().st_mtime_ns for p in (tmp_path / "ray").glob("*.tar")}


def test_resume_cleans_torn_writes_local_engine(faulty_input, tmp_path):
    """Commit logic shared by both engines, exercised without Ray's start-up cost."""
    inp, keys = faulty_input
    ann = AnnotatorSpec(detector="oracle", concept="qr", geometry=GEOM).build()
    first = sorted(inp.glob("icd-*.tar"))[:2]
    annotate_shards(ann, [str(p) for p in first], tmp_path / "out", progress=False)
    # A torn write from a killed run: stale temp file, and an output file the manifest does not know.
    (tmp_path / "out" / ".icd-qr-000002.tar.abc.tmp").write_bytes(b"half")
    (tmp_path / "out" / "icd-qr-000002.tar").write_bytes(b"not committed")
    m = annotate_shards(ann, str(inp / "*.tar"), tmp_path / "out", progress=False)
    assert m["last_run"]["shards_done"] == len(keys) - 2
    assert not list((tmp_path / "out").glob(".*.tmp"))
    _check_exactly_once(tmp_path / "out", keys)


def test_killed_worker_is_retried(ray_local, faulty_input, tmp_path):
    inp, keys = faulty_input
    good = [str(p) for p in sorted(inp.glob("icd-*.tar"))]
    opts = {"pid_dir": str(tmp_path / "pids"), "delay": "0.1"}
    spec = AnnotatorSpec(detector="geomerase.distributed.faults:PidRecordingDetector", concept="qr",
                         options=opts, geometry=GEOM)
    ref = annotate_shards(AnnotatorSpec(detector=spec.detector, concept="qr", options={}, geometry=GEOM).build(),
                          good, tmp_path / "ref", progress=False)
    result: dict = {}
    job = threading.Thread(target=lambda: result.update(m=annotate_shards_ray(
        spec, good, tmp_path / "ray", RayAnnotateConfig(num_workers=2, max_retries=3, progress=False))))
    job.start()
    t0 = time.time()
    # Kill once a worker is inside a shard (its output temp file exists), not while it starts up
    # (a starved machine can take minutes to start the actors: wait as long as the job runs).
    while job.is_alive() and time.time() < t0 + 900 and not list((tmp_path / "ray").glob(".*.tmp")):
        time.sleep(0.05)
    assert list((tmp_path / "ray").glob(".*.tmp")), "no worker reached a shard within 900 s"
    # The driver builds the detector once too (to fail early on bad options): not a worker.
    pids = sorted(int(p.name) for p in (tmp_path / "pids").glob("*") if int(p.name) != os.getpid())
    assert pids, "workers did not start"
    os.kill(pids[0], signal.SIGKILL)
    t_kill = time.time() - t0
    job.join(timeout=600)
    assert not job.is_alive()
    m = result["m"]
    assert m["last_run"]["retries"] >= 1, (t_kill, m["last_run"])
    assert _outputs(tmp_path / "ray") == _outputs(tmp_path / "ref")
    assert {k: _strip(v) for k, v in m["shards"].items()} == {k: _strip(v) for k, v in ref["shards"].items()}
    _check_exactly_once(tmp_path / "ray", {k: v for k, v in keys.items() if k.startswith("icd-")})
