"""Crash safety: a real merge subprocess is SIGKILLed at several points; nothing at --output ever looks
complete (or a pre-existing output is untouched), and re-running the same command succeeds and verifies. A second
merge into the same output while one runs is refused by the lock."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import helpers_tiny as ht
import pytest

from streammerge.io.output import STAGING_TAG
from streammerge.verify import verify

OUTPUT_ERROR = 6
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def mid(tmp_path_factory):
    """~80 MB bf16 base written as 8+ shards of 10 MB (each kill point lands between real writes) and a rank-16
    adapter on every projection."""
    root = tmp_path_factory.mktemp("mid")
    base = ht.make_base(root / "base", hidden=512, inter=2048, layers=6, vocab=16000)
    adapter = ht.make_adapter(root / "adapter", base, r=16, targets=TARGETS)
    return base, adapter


def _planned_shards(base, adapter) -> int:
    import streammerge

    return len(streammerge.merge(base, adapter, "unused", max_shard_size="10MB", dry_run=True).shards)


def _cmd(base, adapter, out, *extra):
    return [sys.executable, "-m", "streammerge", "--base", str(base), "--adapter", str(adapter), "--output",
            str(out), "--max-shard-size", "10MB", "--no-progress", *extra]


def _start(cmd):
    env = {**os.environ, "PYTHONPATH": str(ht.REPO)}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=ht.REPO)


def _staging(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}{STAGING_TAG}*"))


def _shards_in_staging(out: Path, n: int):
    def cond():
        return any(len(list(s.glob("*.safetensors"))) >= n for s in _staging(out))
    return cond


def _kill(proc) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stdout.close()
    proc.stderr.close()


def test_kill9_at_several_points_then_rerun(mid, tmp_path):
    base, adapter = mid
    out = tmp_path / "merged"
    cmd = _cmd(base, adapter, out)
    n = _planned_shards(base, adapter)
    assert n >= 6
    # moments defined by what is on disk (reliable on any machine), then by the clock
    points = [
        ("staging dir created", lambda: bool(_staging(out))),
        ("first shard being written", _shards_in_staging(out, 1)),
        ("fourth shard being written", _shards_in_staging(out, 4)),
        ("last shard being written", _shards_in_staging(out, n)),
        ("after 0.5 s", 0.5), ("after 1.0 s", 1.0),
    ]
    log = []
    for label, when in points:
        proc = _start(cmd)
        if isinstance(when, float):
            time.sleep(when)
        else:
            assert ht.wait_for(proc, when), f"merge ended before {label!r}: {proc.communicate()}"
        finished = proc.poll() is not None
        _kill(proc)
        if isinstance(when, float) and out.exists():
            # the clock can land after the rename on a fast machine: then the output must be the whole merge
            assert ht.looks_complete(out) and verify(base, adapter, out, sample_blocks=1).ok, label
            log.append(f"{label}: after commit (complete, verified)")
            import shutil

            shutil.rmtree(out)
            continue
        assert not finished, f"{label}: the merge finished before the kill"
        # nothing at --output, whatever the moment
        assert not out.exists(), f"{label}: --output appeared after kill -9"
        assert not ht.looks_complete(out)
        log.append(f"{label}: nothing at --output")
    print("\n".join(log))
    # the killed runs left staging dirs behind (that is what kill -9 does); they never look like the output
    assert _staging(out)

    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ht.REPO)},
                          cwd=ht.REPO, timeout=240)
    assert done.returncode == 0, done.stderr
    assert ht.looks_complete(out)
    assert _staging(out) == [], "stale staging directories were not cleaned"
    assert sorted(p.name for p in out.parent.iterdir()) == ["merged"], list(out.parent.iterdir())
    report = verify(base, adapter, out, sample_blocks=1)
    assert report.ok, report.problems()


def test_lock_refuses_second_merge_then_kill(mid, tmp_path, capsys):
    """While one merge holds the lock (frozen with SIGSTOP so timing cannot matter), a second run into the same
    output exits with OutputError's code; then the first is killed -9 and the same command succeeds."""
    base, adapter = mid
    out = tmp_path / "merged"
    cmd = _cmd(base, adapter, out)
    first = _start(cmd)
    try:
        assert ht.wait_for(first, _shards_in_staging(out, 1)), first.communicate()
        first.send_signal(signal.SIGSTOP)
        second = subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                                env={**os.environ, "PYTHONPATH": str(ht.REPO)}, cwd=ht.REPO)
        assert second.returncode == OUTPUT_ERROR, second.stderr
        assert "another streammerge run is writing this output" in second.stderr
        assert second.stderr.strip().count("\n") == 0 and "Traceback" not in second.stderr, second.stderr
        assert not out.exists()
    finally:
        first.send_signal(signal.SIGKILL)
        first.send_signal(signal.SIGCONT)
        first.wait(timeout=30)
        first.stdout.close()
        first.stderr.close()
    assert not out.exists()
    # a kill -9 releases the flock: a merge into the same output now runs (tiny model: only the lock matters)
    small = ht.make_base(tmp_path / "small")
    sad = ht.make_adapter(tmp_path / "small-ad", small)
    rc, _, err = ht.run_cli(["--base", small, "--adapter", sad, "--output", out], capsys)
    assert rc == 0, err
    assert _staging(out) == [] and ht.looks_complete(out)


def test_sigterm_cleans_up(mid, tmp_path):
    base, adapter = mid
    out = tmp_path / "merged"
    proc = _start(_cmd(base, adapter, out))
    assert ht.wait_for(proc, _shards_in_staging(out, 1))
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err.decode() and "Traceback" not in err.decode()
    assert not out.exists() and _staging(out) == []
    assert not (out.parent / f".{out.name}.streammerge.lock").exists()


# ---------------------------------------------------------------------------------------------------------------
# the commit itself: kill inside the final rename / swap (a hook in the subprocess holds it there)


_HOOKED = textwrap.dedent("""
    import sys, time, pathlib
    import streammerge.io.staging as o
    flag, where = pathlib.Path(sys.argv[1]), sys.argv[2]
    def hold():
        flag.touch()
        time.sleep(60)
    if where == "before-commit":
        real_commit = o.Staging.commit
        def commit(self):
            hold()
            return real_commit(self)
        o.Staging.commit = commit
    else:
        real = o._exchange
        def exchange(a, b):
            if where == "before-swap":
                hold()
            ok = real(a, b)
            if where == "after-swap":
                hold()
            return ok
        o._exchange = exchange
    from streammerge.cli import main
    sys.exit(main(sys.argv[3:]))
""")


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp("small")
    base = ht.make_base(root / "base")
    a1 = ht.make_adapter(root / "a1", base, seed=1)
    a2 = ht.make_adapter(root / "a2", base, seed=2)
    return base, a1, a2


def _hooked(flag: Path, where: str, argv: list) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ht.REPO)}
    return subprocess.Popen([sys.executable, "-c", _HOOKED, str(flag), where, *map(str, argv)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=ht.REPO)


@pytest.mark.parametrize("where", ["before-commit", "before-swap", "after-swap"])
def test_kill9_during_commit(small, tmp_path, where, capsys):
    """Everything written and fsync'ed, killed just before / around the rename that publishes the output.

    New output: nothing at --output before the rename. Replacing an output (--overwrite): the old one is intact
    before the atomic swap, the new one complete after it; never a mix, never an empty --output."""
    import streammerge

    base, a1, a2 = small
    out = tmp_path / "merged"
    replacing = where != "before-commit"
    if replacing:
        streammerge.merge(base, a1, out)
        before = ht.tree_digest(out)
    flag = tmp_path / "flag"
    argv = ["--base", base, "--adapter", a2, "--output", out, *(["--overwrite"] if replacing else [])]
    proc = _hooked(flag, where, argv)
    try:
        assert ht.wait_for(proc, flag.exists, timeout=60), proc.communicate()
    finally:
        _kill(proc)
    if not replacing:
        assert not out.exists()
    elif where == "before-swap":
        assert ht.tree_digest(out) == before, "the old output changed before the swap"
    else:
        assert ht.looks_complete(out) and ht.tree_digest(out) != before
        assert verify(base, a2, out).ok
    # the same command again (in-process: the subprocess part was the kill): succeeds, cleans up, verifies
    rc, _, err = ht.run_cli(argv, capsys)
    assert rc == 0, err
    assert sorted(p.name for p in out.parent.iterdir() if p.name != "flag") == ["merged"]
    assert verify(base, a2, out).ok


def test_failed_merge_leaves_existing_output_untouched(small, tmp_path, monkeypatch):
    """An error halfway (here: a NaN found in the adapter only at the third tensor) with --overwrite: the old
    output is still there, byte for byte."""
    import streammerge
    from streammerge.errors import OutputError

    base, a1, a2 = small
    out = tmp_path / "merged"
    streammerge.merge(base, a1, out)
    before = ht.tree_digest(out)
    import streammerge.io.writer as writer_mod

    calls = {"n": 0}
    real_init = writer_mod.ShardWriter.__init__

    def flaky(self, *a, **k):
        calls["n"] += 1
        raise OutputError("simulated failure while opening a shard")

    monkeypatch.setattr(writer_mod.ShardWriter, "__init__", flaky)
    with pytest.raises(OutputError):
        streammerge.merge(base, a2, out, overwrite=True)
    assert calls["n"] == 1
    monkeypatch.setattr(writer_mod.ShardWriter, "__init__", real_init)
    assert ht.tree_digest(out) == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["merged"]


def test_stale_staging_counts_as_free_space(small, tmp_path, monkeypatch, capsys):
    """After a kill -9 the partial output still fills the disk; the re-run will delete it, so the free-space
    pre-check must not refuse because of it (and still refuses when even that is not enough)."""
    import shutil as sh

    import streammerge.io.output as output_mod

    base, a1, _ = small
    out = tmp_path / "merged"
    stale = tmp_path / f".merged{STAGING_TAG}99999"
    stale.mkdir()
    (stale / "model-00001-of-00002.safetensors").write_bytes(os.urandom(4 << 20))  # 4 MB really on disk
    real = sh.disk_usage
    margin = 64 * 2**20
    monkeypatch.setattr(output_mod.shutil, "disk_usage", lambda p: real(p)._replace(free=margin - (1 << 20)))
    rc, _, err = ht.run_cli(["--base", base, "--adapter", a1, "--output", out], capsys)
    assert rc == 0, err
    assert not stale.exists() and ht.looks_complete(out)
    # without the stale folder the same free space is not enough
    monkeypatch.setattr(output_mod.shutil, "disk_usage", lambda p: real(p)._replace(free=margin - (1 << 20)))
    rc, _, err = ht.run_cli(["--base", base, "--adapter", a1, "--output", tmp_path / "other"], capsys)
    assert rc == OUTPUT_ERROR and "not enough free disk space" in err, err


def test_stale_staging_of_a_live_run_is_not_free(tmp_path):
    """While another run holds the lock its staging folder is not reclaimable."""
    import fcntl

    import streammerge.io.output as output_mod

    out = tmp_path / "merged"
    stale = tmp_path / f".merged{STAGING_TAG}1"
    stale.mkdir()
    (stale / "x").write_bytes(os.urandom(1 << 20))
    assert output_mod._stale_bytes(out) >= 1 << 20
    lock = tmp_path / ".merged.streammerge.lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        assert output_mod._stale_bytes(out) == 0
    finally:
        os.close(fd)
