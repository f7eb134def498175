"""``geomerase annotate --engine ray --address HOST:PORT`` against a head node this test starts
(``ray start --head --block``) and stops afterwards (its own process group only)."""
from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("ray")

from geomerase.data.icd import build_icd  # noqa: E402
from geomerase.distributed.launch import free_port  # noqa: E402

BIN = Path(sys.executable).parent

# Starts its own Ray head node: 16 s on idle cores (2.5 min on a loaded machine); part of the
# default suite. GEOMERASE_SKIP_RAY_CLUSTER=1 skips it.
pytestmark = [pytest.mark.skipif(os.environ.get("GEOMERASE_SKIP_RAY_CLUSTER") == "1",
                                 reason="GEOMERASE_SKIP_RAY_CLUSTER=1")]


_TOKEN = secrets.token_hex(32)


def _auth_env() -> dict[str, str]:
    """Ray 2.60 clusters started with 'ray start' require a token; head and client share this one."""
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": _TOKEN, "RAY_agent_register_timeout_ms": "300000"}


@pytest.fixture()
def head_node(tmp_path):
    ray_cli = BIN / "ray"
    if not ray_cli.exists():
        pytest.skip(f"no 'ray' command beside {sys.executable}")
    port = free_port()
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", **_auth_env())
    log = open(tmp_path / "head.log", "wb")
    proc = subprocess.Popen([str(ray_cli), "start", "--head", f"--port={port}", "--num-cpus=2",
                             "--include-dashboard=false", "--disable-usage-stats", "--block"],
                            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.time() + 180
        while time.time() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"ray start exited with {proc.returncode}: {(tmp_path / 'head.log').read_text()[-2000:]}")
            if "Ray runtime started" in (tmp_path / "head.log").read_text(errors="replace"):
                break
            time.sleep(0.5)
        else:
            pytest.fail("head node did not start within 180 s")
        yield f"127.0.0.1:{port}"
    finally:
        # --block makes 'ray start' stop the processes it launched when it is terminated; anything of
        # its process group still alive afterwards is killed by group id (only what this test started).
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        log.close()


def test_cli_against_running_head_node(head_node, tmp_path):
    build_icd("qr", 40, 0.5, 64, 0, tmp_path / "icd", shard_size=10, progress=False)
    cmd = [str(BIN / "geomerase"), "annotate", "--engine", "ray", "--address", head_node, "--num-workers", "2",
           "--input", str(tmp_path / "icd" / "*.tar"), "--detector", "oracle", "--out", str(tmp_path / "out")]
    env = dict(os.environ, **_auth_env())
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "images/s" in res.stdout
    totals = json.loads(res.stdout.strip().splitlines()[-1])
    assert totals["read"] == totals["annotated"] == 40 and totals["shards"] == 4
    manifest = json.loads((tmp_path / "out" / "_manifest.json").read_text())
    assert manifest["last_run"]["address"] == head_node and manifest["last_run"]["workers"] == 2
