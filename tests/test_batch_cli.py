"""`streammerge batch JOBS` without Ray: every job run, a result per job, the worst exit code, outputs identical
to single runs; a missing Ray is one error line; the resources a job asks a cluster for."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import helpers_tiny as ht
import pytest
from blocked_imports import run_blocked

from streammerge.cli import main


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("batch")
    base = ht.make_base(root / "base")
    a = ht.make_adapter(root / "a", base, seed=1)
    b = ht.make_adapter(root / "b", base, r=8, targets=("q_proj", "o_proj"), seed=2)
    other = ht.make_adapter(root / "other", ht.make_base(root / "other-base", hidden=24), seed=3)
    return root, base, a, b, other


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def _jobs(tmp_path, base, jobs, name="jobs.json", **top):
    path = tmp_path / name
    path.write_text(json.dumps({"base": str(base), "jobs": jobs, **top}))
    return path


def test_batch_runs_every_job_and_exits_with_the_worst_code(setup, tmp_path, capsys):
    import streammerge

    root, base, a, b, other = setup
    path = _jobs(tmp_path, base, [
        {"adapter": str(a), "output": "out-a"},                               # relative to the job file
        {"adapter": str(other), "output": "out-wrong"},                       # another model: exit 4
        {"adapters": [str(a), str(b)], "weights": [0.7, -0.3], "output": "out-ab", "name": "mix"},
        {"adapter": str(b), "output": str(base / "inside")},                  # inside the base: exit 6
    ], dtype="f16")
    code = main(["batch", str(path)])
    out, err = capsys.readouterr()
    assert code == 6  # the worst of 0, 4, 0, 6
    lines = out.splitlines()
    assert lines[0].startswith("[1/4] out-a: OK") and lines[2].startswith("[3/4] mix: OK")
    assert lines[1].startswith("[2/4] out-wrong: FAILED (exit 4)") and lines[3].startswith("[4/4] inside: FAILED (exit 6)")
    assert "error: job out-wrong: adapter" in err and "Batch : 2 of 4 job(s) succeeded; exit code 6" in err
    # progress on stderr: the jobs that planned, merged in one pass over the base
    assert "mix: layout causal-lm" in err and "[2/3] Merge: 2 job(s) in one pass" in err
    single_a, single_ab = root / "single-a-f16", root / "single-ab-f16"
    streammerge.merge(str(base), str(a), str(single_a), dtype="f16")
    streammerge.merge(str(base), [str(a), str(b)], str(single_ab), dtype="f16", weights=[0.7, -0.3])
    assert _digest(tmp_path / "out-a") == _digest(single_a)
    assert _digest(tmp_path / "out-ab") == _digest(single_ab)
    assert not (tmp_path / "out-wrong").exists()


def test_batch_json_lines(setup, tmp_path, capsys):
    _, base, a, _, other = setup
    path = _jobs(tmp_path, base, [{"adapter": str(a), "output": "ok"}, {"adapter": str(other), "output": "bad"}])
    code = main(["batch", str(path), "--json"])
    out, err = capsys.readouterr()
    assert code == 4
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["job"] for r in records] == ["ok", "bad"] and all(r["command"] == "batch" for r in records)
    from streammerge.results import MERGE_KEYS

    for r in records:
        assert set(MERGE_KEYS) | {"command", "ok", "exit_code", "error", "job", "index", "jobs", "attempts", "node"} \
            == set(r), set(r) ^ set(MERGE_KEYS)
    ok, bad = records
    assert ok["ok"] and ok["exit_code"] == 0 and ok["error"] is None and ok["shards"] == ["model.safetensors"]
    assert ok["tensors_merged"] == 4 and ok["tensors_copied"] > 0 and ok["bytes_written"] > 0 and ok["peak_memory"] > 0
    assert ok["output"] == str(tmp_path / "ok") and ok["adapters"] == [str(a)]
    assert not bad["ok"] and bad["exit_code"] == 4 and bad["error"]["exit_code"] == 4
    assert bad["error"]["type"] == "PlanError" and "does not fit base" in bad["error"]["message"]
    assert "ok: layout causal-lm" in err and "ok: done" in err  # everything else on stderr


def test_batch_bad_job_file(tmp_path, capsys):
    path = tmp_path / "jobs.json"
    path.write_text('{"base": "b", "jobs": []}')
    assert main(["batch", str(path), "--json"]) == 3
    out, err = capsys.readouterr()
    [record] = [json.loads(line) for line in out.splitlines()]
    assert record["job"] is None and record["exit_code"] == 3 and record["error"]["type"] == "InputError"
    assert "non-empty list" in record["error"]["message"] and err.startswith("error: ")
    assert main(["batch", str(tmp_path / "missing.toml")]) == 3
    assert "job file not found" in capsys.readouterr().err


def test_batch_flags(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["batch", "jobs.json", "--memory-per-job", "4GB"])
    assert e.value.code == 2 and "only apply with --ray" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["batch", "jobs.json", "--ray", "--memory-per-job", "lots"])
    assert e.value.code == 2 and "--memory-per-job" in capsys.readouterr().err


def test_missing_ray_is_one_error_line(setup, tmp_path):
    _, base, a, _, _ = setup
    path = _jobs(tmp_path, base, [{"adapter": str(a), "output": "o"}])
    r = run_blocked(["-m", "streammerge", "batch", path, "--ray"], tmp_path, modules=("ray",))
    assert r.returncode == 10, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: --ray needs Ray, which is not installed: pip install 'streammerge[ray]'")
    assert "Traceback" not in r.stderr and not (tmp_path / "o").exists()


def test_nothing_but_the_distributed_engine_imports_ray(tmp_path):
    code = ("import sys, streammerge, streammerge.api, streammerge.cli, streammerge.cli_batch, streammerge.jobrun, "
            "streammerge.distributed, streammerge.verify, streammerge.plan.combine; "
            "assert 'ray' not in sys.modules, 'ray imported'")
    r = run_blocked(["-c", code], tmp_path, modules=())
    assert r.returncode == 0, r.stderr


def test_job_requests(tmp_path):
    """One CPU (or `threads`) and 1 GiB plus twice the adapters unless the job file or the flags say otherwise:
    the job's own resources, then the flags, then the file's top level."""
    from streammerge.distributed import RUNTIME_MEMORY, Request, job_request
    from streammerge.jobs import Resources, load_jobs

    ad = tmp_path / "ad"
    ad.mkdir()
    (ad / "adapter_model.safetensors").write_bytes(b"x" * 1000)
    path = _jobs(tmp_path, "org/base", [
        {"adapter": "ad", "output": "o1"},
        {"adapter": "org/remote", "output": "o2", "resources": {"num_cpus": 3}},
        {"adapter": "ad", "output": "o3", "resources": {"memory": "2GB"}},
    ], threads=2, max_memory="100MB", resources={"memory": "5GB"})
    spec = load_jobs(path)
    assert [job_request(spec, j) for j in spec.jobs] == [
        Request(2.0, 5 * 10**9), Request(3.0, 5 * 10**9), Request(2.0, 2 * 10**9)]
    flags = Resources(num_cpus=4, memory=None)
    assert [job_request(spec, j, flags).num_cpus for j in spec.jobs] == [4.0, 3.0, 4.0]
    bare = load_jobs(_jobs(tmp_path, "org/base", [{"adapter": "ad", "output": "o"}], name="bare.json"))
    assert job_request(bare, bare.jobs[0]) == Request(1.0, RUNTIME_MEMORY + 2000)
    assert job_request(bare, bare.jobs[0], Resources(None, 10**9)).memory == 10**9


@pytest.mark.parametrize("resources, message", [
    ({"gpus": 1}, "must be an object with num_cpus"),
    ({"num_cpus": 0}, "positive number"),
    ({"memory": "lots"}, "must be a size"),
])
def test_bad_resources_are_named(tmp_path, resources, message):
    from streammerge.errors import InputError
    from streammerge.jobs import load_jobs

    with pytest.raises(InputError, match=message):
        load_jobs(_jobs(tmp_path, "b", [{"adapter": "a", "output": "o", "resources": resources}]))
