"""--resume: a real merge subprocess is SIGKILLed part-way, and the same command with --resume reuses the shards
the journal proves finished (the very files: same inodes), continues a partial shard from its last checkpoint,
and produces an output byte-identical to an uninterrupted merge. A changed adapter or option, or a shard changed
after it was finished, is not reused; a live owner's folder is never taken over."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import helpers_tiny as ht
import pytest

import streammerge
from streammerge.io.output import LOCK_TAG, STAGING_TAG

JOURNAL_NAME = ".streammerge-journal.json"  # in the staging folder; never published
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
INTERRUPTED, OUTPUT = 130, 6

# the command line with a small checkpoint interval, so an 80 MB shard records its durable part every 4 MB
_SMALL_CHECKPOINTS = textwrap.dedent("""
    import sys
    import streammerge.engine.outputs as outputs
    outputs.CHECKPOINT_BYTES = 4 << 20
    from streammerge.cli import main
    sys.exit(main(sys.argv[1:]))
""")


# a merge that pauses after each shard it closes, so a tiny checkpoint is killed part-way reliably
_SLOW_SHARDS = textwrap.dedent("""
    import sys, time
    import streammerge.engine.outputs as outputs
    _close = outputs.OutputState.close
    def close(self, i):
        _close(self, i)
        time.sleep(0.2)
    outputs.OutputState.close = close
    from streammerge.cli import main
    sys.exit(main(sys.argv[1:]))
""")


@pytest.fixture(scope="module")
def mid(tmp_path_factory):
    """~80 MB bf16 base (10 MB output shards: 8+ of them) and a rank-16 adapter on every projection."""
    root = tmp_path_factory.mktemp("resume")
    base = ht.make_base(root / "base", hidden=512, inter=2048, layers=6, vocab=16000)
    adapter = ht.make_adapter(root / "adapter", base, r=16, targets=TARGETS)
    return root, base, adapter


@pytest.fixture(scope="module")
def fresh(mid):
    """Digests of uninterrupted merges, by option set."""
    root, base, adapter = mid
    cache: dict[tuple, dict] = {}

    def get(*, adapter=adapter, **kw) -> dict:
        key = (str(adapter), tuple(sorted(kw.items())))
        if key not in cache:
            out = root / f"fresh-{len(cache)}"
            streammerge.merge(base, adapter, out, **kw)
            cache[key] = ht.tree_digest(out)
        return cache[key]

    return get


def _argv(base, adapter, out, *extra):
    return ["--base", str(base), "--adapter", str(adapter), "--output", str(out), "--no-progress", *extra]


def _start(argv, code=None):
    env = {**os.environ, "PYTHONPATH": str(ht.REPO), "STREAMMERGE_DEBUG": ""}
    cmd = [sys.executable, "-c", code, *argv] if code else [sys.executable, "-m", "streammerge", *argv]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=ht.REPO, text=True)


def _run(argv):
    return ht.run_subprocess(argv, timeout=240)


def _staging(out: Path) -> list[Path]:
    return sorted(p for p in out.parent.glob(f".{out.name}{STAGING_TAG}*") if p.is_dir())


def _journal(out: Path) -> dict:
    for d in _staging(out):
        try:
            return json.loads((d / JOURNAL_NAME).read_text())
        except (OSError, ValueError):
            pass
    return {}


def _kill_when(proc, cond, timeout=120.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert proc.poll() is None, f"the merge ended before the kill point: {proc.communicate()}"
        assert time.monotonic() < end, "the kill point was never reached"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)


def _killed_run(base, adapter, out, finished=3, *extra):
    """A merge SIGKILLed once its journal records `finished` shards; returns {shard: inode} of those."""
    proc = _start(_argv(base, adapter, out, "--max-shard-size", "10MB", *extra), code=_SLOW_SHARDS)
    _kill_when(proc, lambda: len(_journal(out).get("shards", {})) >= finished)
    [folder] = _staging(out)
    return {name: os.stat(folder / name).st_ino for name in _journal(out)["shards"]}


def _reused(stdout: str) -> tuple[int, int]:
    line = next(ln for ln in stdout.splitlines() if "resume:" in ln and "reused" in ln)
    got, _, rest = line.split("resume: ", 1)[1].partition(" of ")
    return int(got), int(rest.split()[0])


def _clean(out: Path) -> bool:
    return not any(STAGING_TAG in n or n.endswith(LOCK_TAG) for n in os.listdir(out.parent))


def test_kill9_then_resume_reuses_the_finished_shards(mid, fresh, tmp_path):
    _, base, adapter = mid
    out = tmp_path / "merged"
    inodes = _killed_run(base, adapter, out)
    assert not out.exists() and len(inodes) >= 3
    done = _run(_argv(base, adapter, out, "--max-shard-size", "10MB", "--resume"))
    assert done.returncode == 0, done.stderr
    reused, total = _reused(done.stdout)
    assert reused >= 3 and total >= 6, done.stdout
    assert ht.tree_digest(out) == fresh(max_shard_size="10MB")
    for name, ino in inodes.items():
        assert os.stat(out / name).st_ino == ino, f"{name} was written again instead of reused"
    assert JOURNAL_NAME not in os.listdir(out) and _clean(out)


def test_partial_shard_continues_from_its_last_checkpoint(mid, fresh, tmp_path):
    """One 80 MB shard: the killed run recorded its durable tensors every 4 MB; the resumed run keeps the file
    (same inode), cuts it back to the last checkpoint and writes the rest."""
    _, base, adapter = mid
    out = tmp_path / "merged"
    proc = _start(_argv(base, adapter, out), code=_SMALL_CHECKPOINTS)
    _kill_when(proc, lambda: _journal(out).get("partial", {}).get("model.safetensors", {}).get("bytes", 0) > 40e6)
    [folder] = _staging(out)
    ino = os.stat(folder / "model.safetensors").st_ino
    done = _run(_argv(base, adapter, out, "--resume"))
    assert done.returncode == 0, done.stderr
    assert "0 of 1 shard(s) reused, 1 continued" in done.stdout, done.stdout
    assert ht.tree_digest(out) == fresh()
    assert os.stat(out / "model.safetensors").st_ino == ino and _clean(out)


@pytest.mark.parametrize("change", ["adapter rewritten", "another dtype"])
def test_changed_inputs_or_options_reuse_nothing(mid, fresh, tmp_path, change):
    _, base, adapter = mid
    out = tmp_path / "merged"
    extra: tuple[str, ...] = ()
    if change == "adapter rewritten":
        adapter = Path(ht.make_adapter(tmp_path / "adapter", base, r=16, targets=TARGETS))
        _killed_run(base, adapter, out)
        ht.make_adapter(adapter, base, r=16, targets=TARGETS, seed=9)  # the same files, other values
        want = fresh(adapter=adapter, max_shard_size="10MB")
    else:
        _killed_run(base, adapter, out)
        extra = ("--dtype", "f16")
        want = fresh(max_shard_size="10MB", dtype="f16")
    done = _run(_argv(base, adapter, out, "--max-shard-size", "10MB", "--resume", *extra))
    assert done.returncode == 0, done.stderr
    assert _reused(done.stdout)[0] == 0, done.stdout
    assert ht.tree_digest(out) == want and _clean(out)


@pytest.mark.parametrize("damage", ["rewritten in place", "damaged below the file system"])
def test_a_shard_changed_after_it_was_finished_is_written_again(mid, fresh, tmp_path, damage):
    _, base, adapter = mid
    out = tmp_path / "merged"
    inodes = _killed_run(base, adapter, out)
    [folder] = _staging(out)
    name = sorted(inodes)[1]
    path = folder / name
    st = os.stat(path)
    header = 8 + int.from_bytes(path.read_bytes()[:8], "little")
    with open(path, "r+b") as f:  # one value right after the header flipped: inside the first sampled chunk
        f.seek(header + 10)
        byte = f.read(1)
        f.seek(header + 10)
        f.write(bytes([byte[0] ^ 0x40]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    if damage == "damaged below the file system":  # metadata as recorded: only the sampled bytes can tell
        journal = json.loads((folder / JOURNAL_NAME).read_text())
        now = os.stat(path)
        journal["shards"][name]["stamp"] = [now.st_ino, now.st_mtime_ns, now.st_ctime_ns]
        (folder / JOURNAL_NAME).write_text(json.dumps(journal))
    done = _run(_argv(base, adapter, out, "--max-shard-size", "10MB", "--resume"))
    assert done.returncode == 0, done.stderr
    why = "sampled bytes differ" if damage.startswith("damaged") else "changed since it was finished"
    assert f"not reused: {name}: {why}" in done.stdout, done.stdout
    assert _reused(done.stdout)[0] == len(inodes) - 1
    assert ht.tree_digest(out) == fresh(max_shard_size="10MB")


def test_a_live_owner_keeps_its_folder(mid, tmp_path):
    """--resume takes over only a folder whose owner is gone: while the first run holds the lock (frozen with
    SIGSTOP so timing cannot matter) the second is refused and the first's files are untouched."""
    _, base, adapter = mid
    out = tmp_path / "merged"
    first = _start(_argv(base, adapter, out, "--max-shard-size", "10MB"))
    try:
        end = time.monotonic() + 120
        while len(_journal(out).get("shards", {})) < 1:
            assert first.poll() is None and time.monotonic() < end, first.communicate()
            time.sleep(0.005)
        first.send_signal(signal.SIGSTOP)
        [folder] = _staging(out)
        before = sorted(os.listdir(folder))
        second = _run(_argv(base, adapter, out, "--max-shard-size", "10MB", "--resume"))
        assert second.returncode == OUTPUT and "another streammerge run is writing this output" in second.stderr
        assert _staging(out) == [folder] and sorted(os.listdir(folder)) == before
    finally:
        first.send_signal(signal.SIGKILL)
        first.send_signal(signal.SIGCONT)
        first.communicate(timeout=30)


def test_interrupting_a_resumable_run_keeps_its_shards(mid, fresh, tmp_path):
    """With --resume, Ctrl-C leaves the finished shards for the next --resume (and says where); without it the
    staging folder is removed as before."""
    _, base, adapter = mid
    out = tmp_path / "merged"
    proc = _start(_argv(base, adapter, out, "--max-shard-size", "10MB", "--resume"), code=_SLOW_SHARDS)
    end = time.monotonic() + 120
    while len(_journal(out).get("shards", {})) < 2:
        assert proc.poll() is None and time.monotonic() < end, proc.communicate()
        time.sleep(0.005)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == INTERRUPTED, err
    assert "stay in" in err and "--resume" in err and err.count("\n") == 1, err
    assert not out.exists() and len(_staging(out)) == 1
    done = _run(_argv(base, adapter, out, "--max-shard-size", "10MB", "--resume"))
    assert done.returncode == 0, done.stderr
    assert _reused(done.stdout)[0] >= 2
    assert ht.tree_digest(out) == fresh(max_shard_size="10MB") and _clean(out)


def test_fp8_kept_merge_resumes_with_whole_shards(tmp_path):
    """--dtype keep writes a re-quantized weight and its new scale out of order (any_order): no partial shard is
    recorded, finished shards are reused, and the resumed output is byte-identical."""
    import quant_fixtures as qf
    import variant_helpers as vh

    ck = qf.make_fp8_block(tmp_path, "qwen3_moe", (16, 16), shards=2)
    adapter = vh.save_adapter(vh.load_causal(ck.source), tmp_path / "adapter", target_modules=["q_proj", "o_proj"])
    options = ("--dtype", "keep", "--max-shard-size", "30KB")
    streammerge.merge(ck.path, adapter, tmp_path / "fresh", dtype="keep", max_shard_size="30KB")
    out = tmp_path / "merged"
    proc = _start(_argv(ck.path, adapter, out, *options), code=_SLOW_SHARDS)
    _kill_when(proc, lambda: len(_journal(out).get("shards", {})) >= 3)
    journal = _journal(out)
    assert not journal.get("partial")
    [folder] = _staging(out)
    inodes = {name: os.stat(folder / name).st_ino for name in journal["shards"]}
    done = _run(_argv(ck.path, adapter, out, *options, "--resume"))
    assert done.returncode == 0, done.stderr
    reused, total = _reused(done.stdout)
    assert reused >= 3 and total > reused, done.stdout
    assert ht.tree_digest(out) == ht.tree_digest(tmp_path / "fresh")
    for name, ino in inodes.items():
        assert os.stat(out / name).st_ino == ino, f"{name} was written again instead of reused"
