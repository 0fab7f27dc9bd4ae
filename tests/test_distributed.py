"""The distributed engine on a real local Ray cluster (one per module, started here): jobs as Ray tasks, outputs
byte-identical to single runs, results streamed back per job, a lost task retried once, a job's own error not."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="Ray is not installed here (pip install 'streammerge[ray]'; .ci/run installs "
                                        "it, so CI runs these tests)")

import helpers_tiny as ht  # noqa: E402
from conftest import REPO  # noqa: E402


@pytest.fixture(scope="module")
def cluster():
    """A local Ray cluster owned by this process (ray.shutdown() stops exactly the processes it started)."""
    ray.init(num_cpus=2, include_dashboard=False, namespace="streammerge-tests")
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A base, three adapters (different targets and ranks) and one for another base."""
    root = tmp_path_factory.mktemp("ray-jobs")
    base = ht.make_base(root / "base")
    shapes = [dict(r=4, targets=("q_proj", "v_proj")), dict(r=8, alpha=4, targets=("q_proj", "o_proj")),
              dict(r=2, targets=("gate_proj", "down_proj"))]
    adapters = [ht.make_adapter(root / f"ad{i}", base, seed=i, **kw) for i, kw in enumerate(shapes)]
    other = ht.make_adapter(root / "other", ht.make_base(root / "other-base", hidden=24), seed=9)
    return root, base, adapters, other


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def _single(base, adapters, out, weights=None):
    import streammerge

    if not out.exists():
        streammerge.merge(str(base), [str(a) for a in adapters], str(out), weights=weights)
    return _digest(out)


def _spec(root, base, jobs, name):
    from streammerge.jobs import load_jobs

    path = root / f"{name}.json"
    path.write_text(json.dumps({"base": str(base), "jobs": jobs}))
    return path, load_jobs(path)


def test_cli_batch_on_the_cluster(cluster, models, tmp_path):
    """`streammerge batch JOBS --ray ADDRESS --json` in its own process, connected by address: one JSON line per job
    (nothing else on stdout), outputs byte-identical to single runs, the worst exit code."""
    root, base, adapters, other = models
    jobs = [
        {"adapter": str(adapters[0]), "output": str(tmp_path / "a")},
        {"adapters": [str(adapters[0]), str(adapters[1])], "weights": [0.7, 0.3], "output": str(tmp_path / "ab"),
         "name": "mix"},
        {"adapter": str(adapters[2]), "output": str(tmp_path / "c"), "resources": {"memory": "600MB"}},
        {"adapter": str(other), "output": str(tmp_path / "wrong")},   # another model's adapter: exit 4
    ]
    path, _ = _spec(tmp_path, base, jobs, "jobs")
    r = subprocess.run([sys.executable, "-m", "streammerge", "batch", str(path), "--ray", cluster, "--json"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=600,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 4, r.stderr
    records = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(records) == 4, r.stdout
    by_job = {rec["job"]: rec for rec in records}
    assert set(by_job) == {"a", "mix", "c", "wrong"}
    for rec in records:
        assert rec["command"] == "batch" and rec["jobs"] == 4 and rec["node"], rec
    wrong = by_job["wrong"]
    assert (wrong["ok"], wrong["exit_code"], wrong["error"]["exit_code"], wrong["error"]["type"]) == \
        (False, 4, 4, "PlanError")
    assert wrong["attempts"] == 1  # a job's own error is its answer: not retried
    assert not (tmp_path / "wrong").exists()
    expected = {"a": _single(base, adapters[:1], root / "single-a"),
                "mix": _single(base, adapters[:2], root / "single-ab", [0.7, 0.3]),
                "c": _single(base, adapters[2:], root / "single-c")}
    for name, digest in expected.items():
        rec = by_job[name]
        assert rec["ok"] and rec["exit_code"] == 0 and rec["error"] is None and rec["attempts"] == 1
        assert rec["shards"] == ["model.safetensors"] and rec["tensors_merged"] > 0 and rec["bytes_written"] > 0
        assert _digest(Path(rec["output"])) == digest, name
    assert by_job["mix"]["weights"] == [0.7, 0.3]
    # progress of every job reached the driver, on stderr
    for name in ("a", "mix", "c"):
        assert f"[{name}] [2/3] Merge" in r.stderr, r.stderr[-3000:]
    assert "error: job wrong:" in r.stderr


def _run(spec, **kw):
    from streammerge.distributed import run_on_ray

    said: list[str] = []
    seen: list[int] = []
    results = run_on_ray(spec, address=None, on_result=lambda i, res: seen.append(i), say=said.append, **kw)
    assert sorted(seen) == list(range(len(spec.jobs)))
    return results, "\n".join(said)


def test_a_dead_worker_is_retried_once(cluster, models, tmp_path, monkeypatch):
    """The first attempt's worker process dies (os._exit inside the task, as a killed worker); Ray reports the lost
    task, the driver submits it once more, and the output is the single run's."""
    import streammerge.distributed as distributed

    root, base, adapters, _ = models
    marker = tmp_path / "died-once"
    real = distributed.merge_task

    def die_once(*args):
        if not marker.exists():
            marker.touch()
            os._exit(1)
        return real(*args)

    monkeypatch.setattr(distributed, "merge_task", die_once)
    _, spec = _spec(tmp_path, base, [{"adapter": str(adapters[1]), "output": str(tmp_path / "b")}], "die")
    [result], said = _run(spec)
    assert marker.exists()
    assert result.ok and result.attempts == 2, result
    assert "attempt 1 failed (WorkerCrashedError" in said and "retrying once" in said
    assert _digest(tmp_path / "b") == _single(base, adapters[1:2], root / "single-b")


def test_an_io_error_is_retried_then_reported(cluster, models, tmp_path, monkeypatch):
    import streammerge.distributed as distributed

    _, base, adapters, _ = models
    calls = tmp_path / "calls"
    calls.mkdir()

    def io_error(*args):
        (calls / str(len(list(calls.iterdir())))).touch()
        raise OSError(5, "Input/output error", "/shared/base/model.safetensors")

    monkeypatch.setattr(distributed, "merge_task", io_error)
    _, spec = _spec(tmp_path, base, [{"adapter": str(adapters[0]), "output": str(tmp_path / "x")}], "io")
    [result], said = _run(spec)
    assert "attempt 1 failed (OSError" in said
    assert len(list(calls.iterdir())) == 2
    assert (result.ok, result.exit_code, result.attempts) == (False, 6, 2)
    assert "/shared/base/model.safetensors: Input/output error" in result.error


def test_a_request_no_node_can_meet_fails_at_once(cluster, models, tmp_path):
    """Ray would keep such a task waiting for ever: the job is reported instead, the others run."""
    from streammerge.jobs import Resources

    _, base, adapters, _ = models
    _, spec = _spec(tmp_path, base, [
        {"adapter": str(adapters[0]), "output": str(tmp_path / "huge"), "resources": {"num_cpus": 64}},
        {"adapter": str(adapters[0]), "output": str(tmp_path / "fine")},
    ], "huge")
    results, _ = _run(spec, flags=Resources(num_cpus=1, memory=300 * 2**20))
    huge, fine = results
    assert (huge.ok, huge.exit_code, huge.attempts) == (False, 10, 0)
    assert "64 CPU" in huge.error and "largest node" in huge.error
    assert fine.ok and (tmp_path / "fine" / "model.safetensors").is_file()
