"""Reliability under concurrency, signals and a changing disk, and the CLI's stable final lines.

Each test drives what a hostile or unlucky user does: a second run whose --output is a glob, --overwrite aimed at
a project or home folder, Ctrl-C at many moments (real subprocesses, moments defined by what is on disk or on
stdout, never by sleeps alone), a base file truncated or rewritten while the merge reads it, a planted lock
symlink, thousands of shards under a small open-files limit, a full or mounted output file system, symlinked
outputs, FIFOs in the base, a tampered merged output, and a regex that backtracks for ever.
"""

from __future__ import annotations

import errno
import json
import os
import resource
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import helpers_tiny as ht
import pytest
import torch
from safetensors.torch import save_file

from streammerge.errors import CheckpointError, OutputError
from streammerge.verify import verify

INPUT, OUTPUT, INTERRUPTED = 3, 6, 130
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DONE = "\u2705 Done. Merged model: "
# generous: the machine is shared and loaded; the point is "ends", the typical figure is printed
EXIT_WITHIN = 30.0


# ---------------------------------------------------------------------------------------------------------------
# fixtures and helpers


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp("small")
    base = ht.make_base(root / "base")
    return base, ht.make_adapter(root / "a1", base, seed=1), ht.make_adapter(root / "a2", base, seed=2)


@pytest.fixture(scope="module")
def mid(tmp_path_factory):
    """~64 MB bf16 base in one file and a rank-16 adapter on every projection: a merge of a second or more,
    written as ~9 output shards with --max-shard-size 8MB, so signals land between real writes."""
    root = tmp_path_factory.mktemp("mid")
    base = ht.make_base(root / "base", hidden=512, inter=2048, layers=4, vocab=16000)
    return base, ht.make_adapter(root / "adapter", base, r=16, targets=TARGETS)


def _env(**extra: str) -> dict:
    """The environment of a child process: the streammerge this test imported (so PYTHONPATH=/old/checkout
    python -m pytest runs old code everywhere), no traceback on request."""
    import streammerge

    root = str(Path(streammerge.__file__).resolve().parent.parent)
    return {**os.environ, "PYTHONPATH": root, "STREAMMERGE_DEBUG": "", **extra}


def _argv(base, adapter, out, *extra) -> list[str]:
    return ["--base", str(base), "--adapter", str(adapter), "--output", str(out), "--no-progress", *map(str, extra)]


def _spawn(argv: list[str], *, code: str | None = None, cwd=None, env: dict | None = None,
           preexec=None) -> subprocess.Popen:
    """`python -m streammerge ARGV`, or `python -c CODE ARGV` (a hook around the real CLI)."""
    head = [sys.executable, "-c", code] if code else [sys.executable, "-m", "streammerge"]
    # the working directory comes first on sys.path: never one that holds a streammerge package
    return subprocess.Popen(head + argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env or _env(), cwd=cwd or tempfile.gettempdir(), preexec_fn=preexec)


def _run(argv: list[str], timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
    proc = _spawn(argv, env=_env(**env))
    rc, out, err = _finish(proc, timeout=timeout)
    return subprocess.CompletedProcess(argv, rc, out, err)


class _Lines:
    """Collects a process's stdout lines (and its stderr) on threads, so tests can wait for a line."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.lines: list[str] = []
        self.errors: list[str] = []
        self._threads = [threading.Thread(target=self._read, args=(stream, into), daemon=True)
                         for stream, into in ((proc.stdout, self.lines), (proc.stderr, self.errors))]
        for t in self._threads:
            t.start()

    @staticmethod
    def _read(stream, into: list[str]) -> None:
        for line in stream:
            into.append(line.rstrip("\n"))

    def seen(self, prefix: str):
        return lambda: any(ln.startswith(prefix) for ln in self.lines)

    def texts(self) -> tuple[str, str]:
        for t in self._threads:
            t.join(timeout=10)
        return "\n".join(self.lines), "\n".join(self.errors)


def _ours(out: Path) -> list[str]:
    """Hidden entries of this output beside it: staging folders, replaced outputs, the lock."""
    return sorted(n for n in os.listdir(out.parent) if n.startswith(f".{out.name}.streammerge"))


def _staging(out: Path) -> list[Path]:
    return [out.parent / n for n in _ours(out) if "-tmp-" in n]


def _shards_in_staging(out: Path, n: int):
    return lambda: any(len(list(s.glob("*.safetensors"))) >= n for s in _staging(out))


def _finish(proc: subprocess.Popen, lines: _Lines | None = None, timeout: float = EXIT_WITHIN):
    """(exit code, stdout, stderr); a process still running after `timeout` fails the test (and is killed)."""
    try:
        if lines is None:
            out, err = proc.communicate(timeout=timeout)
        else:
            proc.wait(timeout=timeout)
            out, err = lines.texts()
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"the process did not end within {timeout:.0f} s")
    return proc.returncode, out, err


def _one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "internal error" not in lines[0], err
    return lines[0]


# ---------------------------------------------------------------------------------------------------------------
# 1. another run's --output is a glob; the commit publishes only a complete folder


def test_glob_output_of_another_run_leaves_staging_alone(mid, small, tmp_path, capsys):
    """A merge into `merged1` is frozen mid-write; runs into `merged[12]` and `m*` (whose names, read as globs,
    match merged1's staging folder) must not touch it, and the frozen merge then completes and verifies."""
    base, adapter = mid
    out = tmp_path / "merged1"
    proc = _spawn(_argv(base, adapter, out))
    try:
        assert ht.wait_for(proc, _shards_in_staging(out, 1)), proc.communicate()
        proc.send_signal(signal.SIGSTOP)
        staging = _staging(out)
        assert staging, "the merge finished before it could be frozen"
        for other in ("merged[12]", "m*", "merged?"):
            rc, _, err = ht.run_cli(_argv(small[0], small[1], tmp_path / other), capsys)
            assert rc == 0, err
            assert _staging(out) == staging, f"--output {other!r} removed merged1's staging folder"
    finally:
        proc.send_signal(signal.SIGCONT)
    rc, _, err = _finish(proc, timeout=240)
    assert rc == 0, err
    assert ht.looks_complete(out) and _ours(out) == []
    assert verify(base, adapter, out, sample_blocks=1).ok


@pytest.mark.parametrize("damage", ["shard deleted", "shard truncated", "staging folder wiped"])
def test_commit_refuses_incomplete_staging(small, tmp_path, capsys, monkeypatch, damage):
    """Files disappear from the staging folder before the commit (another process, a cleaner): the commit
    refuses to publish it, so no output that says Done is ever missing a shard, the index or config.json."""
    import streammerge  # noqa: F401
    import streammerge.api as merge_mod
    real_copy = merge_mod.copy_side_files

    def damaged(files, dest):
        shard = sorted(Path(dest).glob("model-*.safetensors"))[1]
        if damage == "shard deleted":
            shard.unlink()
        elif damage == "shard truncated":
            os.truncate(shard, shard.stat().st_size - 8)
        else:
            shutil.rmtree(dest)  # what the glob of another run's cleanup did
        real_copy(files, dest)

    monkeypatch.setattr(merge_mod, "copy_side_files", damaged)
    out = tmp_path / "merged"
    rc, o, err = ht.run_cli(_argv(small[0], small[1], out, "--max-shard-size", "8KB"), capsys)
    assert rc == OUTPUT, (rc, err)
    line = _one_error_line(err)
    assert "incomplete" in line and "nothing was published" in line, line
    assert "Done" not in o
    assert not out.exists() and _ours(out) == []


# ---------------------------------------------------------------------------------------------------------------
# 2. --overwrite never deletes what is not a model output


_OLD_MODEL = {"config.json": "{}", "model.safetensors": "old"}


def _project(root: Path) -> Path:
    """A user's project folder: sources, a .git folder, and a merged model of an earlier run."""
    proj = root / "project"
    (proj / ".git").mkdir(parents=True)
    (proj / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (proj / "train.py").write_text("print('precious')\n")
    return proj


@pytest.mark.parametrize("output", ["", ".", "..", "~"])
def test_overwrite_refuses_cwd_home_and_empty(small, tmp_path, output):
    """`--output "$UNSET" --overwrite` (empty), `.`, a parent of the current directory and `~` are refused
    before anything is written; the folders are untouched (run in throwaway folders: the old code emptied them)."""
    proj = _project(tmp_path)
    cwd = proj / "sub"
    cwd.mkdir()
    (cwd / "notes.md").write_text("mine")
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "id_ed25519").write_text("secret")
    before = ht.tree_digest(tmp_path)
    proc = _spawn(["--base", str(small[0]), "--adapter", str(small[1]), "--output", output, "--overwrite",
                   "--no-progress"], cwd=cwd, env=_env(HOME=str(home)))
    rc, _, err = _finish(proc, timeout=120)
    assert rc == OUTPUT, err
    line = _one_error_line(err)
    assert any(w in line for w in ("empty", "current directory", "home folder")), line
    assert ht.tree_digest(tmp_path) == before
    assert sorted(os.listdir(tmp_path)) == ["home", "project"]


@pytest.mark.parametrize("output", ["/", "home", "cwd", "cwd-parent"])
def test_resolve_output_refuses_folders_never_replaced(tmp_path, monkeypatch, output):
    from streammerge.io.output import resolve_output

    home = tmp_path / "home"
    work = home / "work"
    work.mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    path = {"/": "/", "home": str(home), "cwd": str(work), "cwd-parent": str(home.parent)}[output]
    with pytest.raises(OutputError, match="root folder|home folder|current directory"):
        resolve_output(path)
    assert resolve_output(work / "merged") == work / "merged"


@pytest.mark.parametrize("foreign", ["notes.txt", ".git/HEAD", "src/train.py", "data.csv"])
def test_overwrite_refuses_a_folder_that_is_not_a_model(small, tmp_path, capsys, foreign):
    out = tmp_path / "target"
    for name, text in _OLD_MODEL.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(text)
    (out / foreign).parent.mkdir(parents=True, exist_ok=True)
    (out / foreign).write_text("precious")
    before = ht.tree_digest(out)
    rc, _, err = ht.run_cli(_argv(small[0], small[1], out, "--overwrite"), capsys)
    assert rc == OUTPUT, err
    line = _one_error_line(err)
    assert "--overwrite only replaces a model folder" in line and foreign.split("/")[0] in line, line
    assert ht.tree_digest(out) == before and _ours(out) == []


def test_overwrite_replaces_a_previous_merge(small, tmp_path, capsys):
    """What --overwrite is for keeps working: a previous output (tokenizer, README, chat template, remote code
    and huggingface_hub's .cache/huggingface bookkeeping included) is replaced."""
    import streammerge

    out = tmp_path / "merged"
    streammerge.merge(small[0], small[1], out)
    for extra in ("README.md", "chat_template.jinja", "modeling_custom.py", ".cache/huggingface/download/x.lock"):
        (out / extra).parent.mkdir(parents=True, exist_ok=True)
        (out / extra).write_text("x")
    rc, _, err = ht.run_cli(_argv(small[0], small[2], out, "--overwrite"), capsys)
    assert rc == 0, err
    assert verify(small[0], small[2], out).ok and not (out / "README.md").exists()


# ---------------------------------------------------------------------------------------------------------------
# 3. Ctrl-C: every interrupt ends promptly, cleans up, exits 130, frees the lock


_STALLED_WRITER = textwrap.dedent("""
    import pathlib, sys, time
    import streammerge.io.writer as w
    flag = pathlib.Path(sys.argv[1])
    def stalled(self, *args, **kwargs):  # the writer thread meets a disk that stopped answering
        flag.touch()
        time.sleep(600)
    w.ShardWriter.write = stalled
    w.ShardWriter.copy_from = stalled
    from streammerge.cli import main
    sys.exit(main(sys.argv[2:]))
""")


def test_ctrl_c_while_the_writer_is_stalled(mid, tmp_path):
    """The writer thread is stuck in a write and the main thread waits for room in the queue: Ctrl-C still ends
    the process at once (the old code joined the writer thread for ever, holding the lock)."""
    base, adapter = mid
    out, flag = tmp_path / "merged", tmp_path / "flag"
    proc = _spawn([str(flag), *_argv(base, adapter, out, "--max-shard-size", "8MB")], code=_STALLED_WRITER)
    assert ht.wait_for(proc, flag.exists), proc.communicate()
    time.sleep(0.2)  # let the main thread fill the queue behind the stalled write
    proc.send_signal(signal.SIGINT)
    sent = time.monotonic()
    rc, _, err = _finish(proc)
    print(f"exit {time.monotonic() - sent:.2f} s after SIGINT")
    assert rc == INTERRUPTED, err
    assert "interrupted" in _one_error_line(err)
    assert not out.exists() and _ours(out) == []


_TORCH_IMPORT_INTERRUPT = textwrap.dedent("""
    import os, runpy, signal, sys
    class Interrupt:  # Ctrl-C lands while torch is being imported
        def find_spec(self, name, path=None, target=None):
            if name == "torch":
                sys.meta_path.remove(self)
                os.kill(os.getpid(), signal.SIGINT)
            return None
    sys.meta_path.insert(0, Interrupt())
    sys.argv = ["streammerge", *sys.argv[1:]]
    runpy.run_module("streammerge", run_name="__main__", alter_sys=True)
""")


def test_ctrl_c_while_torch_imports(small, tmp_path):
    out = tmp_path / "merged"
    proc = _spawn(_argv(small[0], small[1], out), code=_TORCH_IMPORT_INTERRUPT)
    rc, _, err = _finish(proc, timeout=120)
    assert rc == INTERRUPTED, err
    assert "interrupted" in _one_error_line(err)
    assert not out.exists() and _ours(out) == []


def _interrupt_once(base, adapter, out: Path, moment: str, sig=signal.SIGINT, twice=False) -> dict:
    """Start a merge, signal it at `moment`, and check the whole contract; returns what happened."""
    proc = _spawn(_argv(base, adapter, out, "--max-shard-size", "8MB"))
    lines = _Lines(proc)
    kind, _, arg = moment.partition(":")
    if kind == "line":
        reached = ht.wait_for(proc, lines.seen(arg))
    elif kind == "staging":
        reached = ht.wait_for(proc, lambda: bool(_staging(out)))
    elif kind == "shards":
        reached = ht.wait_for(proc, _shards_in_staging(out, int(arg)))
    else:  # "after:<seconds>": a clock offset after the writing started
        reached = ht.wait_for(proc, lines.seen("[2/3]"))
        time.sleep(float(arg))
    proc.send_signal(sig)
    sent = time.monotonic()
    if twice:
        time.sleep(0.01)
        proc.send_signal(sig)
    rc, stdout, err = _finish(proc, lines)
    latency = time.monotonic() - sent
    assert reached or rc == 0, f"{moment}: never reached ({rc}): {err}"
    assert "Traceback" not in err, (moment, err)
    if rc == 0:  # finished before the signal arrived: then the output is whole
        assert stdout.splitlines()[-1] == f"{DONE}{out}", (moment, stdout)
        assert ht.looks_complete(out), moment
    else:
        assert rc == INTERRUPTED, (moment, rc, err)
        line = _one_error_line(err)
        assert line.startswith("error: interrupted"), (moment, line)
        if "after the merge was complete" in line:
            assert ht.looks_complete(out), (moment, line)
        else:
            assert not out.exists(), (moment, line)
    assert _ours(out) == [], (moment, _ours(out))  # no staging folder, and the lock is released
    shutil.rmtree(out, ignore_errors=True)
    return {"moment": moment, "rc": rc, "latency": latency}


def test_many_interrupts_at_varied_moments(mid, tmp_path):
    """Ctrl-C (and SIGTERM, and a double Ctrl-C) from start-up to the commit: each run ends within seconds,
    exits 130 with one true `error: interrupted ...` line (or 0 with a whole output when it won the race),
    and leaves no staging folder and no lock behind."""
    base, adapter = mid
    out = tmp_path / "merged"
    moments = ["line:Base", "line:[1/3]", "line:[2/3]", "staging", "shards:1", "shards:3", "shards:6",
               "after:0.05", "after:0.15", "after:0.3"]
    runs = [_interrupt_once(base, adapter, out, m) for m in moments]
    runs.append(_interrupt_once(base, adapter, out, "shards:2", signal.SIGTERM))
    runs.append(_interrupt_once(base, adapter, out, "shards:2", twice=True))
    interrupted = [r for r in runs if r["rc"] == INTERRUPTED]
    print("\n".join(f"{r['moment']:12} exit {r['rc']:3} after {r['latency']:.2f} s" for r in runs))
    assert len(interrupted) >= len(runs) // 2, runs  # most signals really landed inside a merge


# ---------------------------------------------------------------------------------------------------------------
# 4. a base file that changes during the merge: an error, not SIGBUS


_FROZEN = "the merge is frozen with SIGSTOP while the base file is changed, then resumed"


@pytest.mark.parametrize("change,dtype", [("truncated", "f32"), ("truncated", "bf16"), ("rewritten in place", "bf16")])
def test_base_file_changed_during_merge(mid, tmp_path, change, dtype):
    """--dtype f32 computes (casts) every tensor, so the next access after the change is a read of rows (a
    memory-mapped access that raised SIGBUS on a truncated file); with bf16 raw copies come in between (they
    stopped cleanly but named no file, or the mapped reads after them raised SIGBUS)."""
    base = Path(shutil.copytree(mid[0], tmp_path / "base"))
    adapter = mid[1]
    out = tmp_path / "merged"
    shard = base / "model.safetensors"
    proc = _spawn(_argv(base, adapter, out, "--max-shard-size", "8MB", "--dtype", dtype))
    try:
        # a few shards in (of 14 in f32, 6 in bf16): layers are being read (and, in the old code, were mapped)
        assert ht.wait_for(proc, _shards_in_staging(out, 3 if dtype == "f32" else 4)), proc.communicate()
        proc.send_signal(signal.SIGSTOP)  # _FROZEN
        size = shard.stat().st_size
        if change == "truncated":
            os.truncate(shard, size // 3)
        else:  # what `cp other shard` does to the bytes, same size
            with open(shard, "r+b") as f:
                f.seek(size // 3)
                f.write(os.urandom(size - size // 3))
    finally:
        proc.send_signal(signal.SIGCONT)
    rc, _, err = _finish(proc, timeout=120)
    assert rc == INPUT, (rc, err)  # the old code: -7 (SIGBUS) with no message, or 0 with mixed bytes
    line = _one_error_line(err)
    assert "model.safetensors" in line and "changed" in line, line
    assert not out.exists() and _ours(out) == []


def test_reader_reports_a_changed_file_instead_of_faulting(tmp_path):
    from streammerge.io.checkpoint import open_checkpoint
    from streammerge.io.reader import TensorReader

    base = ht.make_base(tmp_path / "base", hidden=64, inter=128)
    ckpt = open_checkpoint(base)
    info = ckpt.tensors["lm_head.weight"]
    with TensorReader() as reader:
        buf = torch.empty(info.nbytes, dtype=torch.uint8)
        first = reader.read_rows(info, 0, info.rows, buf).clone()
        assert torch.equal(first, ht.base_tensors(hidden=64, inter=128)["lm_head.weight"])
        os.truncate(info.path, info.offset + 10)
        with pytest.raises(CheckpointError, match="changed after its header"):
            reader.read_rows(info, 0, info.rows, buf)


def test_next_rows_reads_ahead_and_reports_changes(tmp_path):
    """The engine's reads: block after block with the next one read ahead on a helper thread; any order still
    gives the right rows, and a file truncated while the helper reads is the same CheckpointError."""
    from streammerge.io.checkpoint import open_checkpoint
    from streammerge.io.reader import TensorReader

    base = ht.make_base(tmp_path / "base", hidden=64, inter=128, vocab=256)
    want = ht.base_tensors(hidden=64, inter=128, vocab=256)
    ckpt = open_checkpoint(base)
    with TensorReader() as reader:
        for name, info in ckpt.tensors.items():
            for a in range(0, info.rows, 24):
                b = min(info.rows, a + 24)
                assert torch.equal(reader.next_rows(info, a, b), want[name][a:b]), (name, a)
        info = ckpt.tensors["lm_head.weight"]
        for a, b in [(40, 50), (0, 10), (10, 20), (200, 256), (20, 30)]:  # out of order: no stale block
            assert torch.equal(reader.next_rows(info, a, b), want["lm_head.weight"][a:b])
        reader.next_rows(info, 0, 100)  # rows 100..200 are being read ahead
        os.truncate(info.path, info.offset + 100 * info.row_nbytes)
        with pytest.raises(CheckpointError, match="changed after its header"):
            reader.next_rows(info, 100, 200)


# ---------------------------------------------------------------------------------------------------------------
# 5. an interrupt after the --overwrite swap tells the truth


_HOLD_AFTER_SWAP = textwrap.dedent("""
    import pathlib, sys, time
    import streammerge.io.staging as o
    flag, go = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
    real = o._exchange
    def exchange(a, b):
        ok = real(a, b)
        flag.touch()  # the new merge is in place; hold here until the test has sent its signal
        end = time.monotonic() + 120
        while not go.exists() and time.monotonic() < end:
            time.sleep(0.01)
        return ok
    o._exchange = exchange
    from streammerge.cli import main
    sys.exit(main(sys.argv[3:]))
""")


def test_interrupt_after_the_swap_says_the_new_merge_is_in_place(small, tmp_path):
    import streammerge

    base, a1, a2 = small
    out = tmp_path / "merged"
    streammerge.merge(base, a1, out)
    flag, go = tmp_path / "flag", tmp_path / "go"
    proc = _spawn([str(flag), str(go), *_argv(base, a2, out, "--overwrite")], code=_HOLD_AFTER_SWAP)
    assert ht.wait_for(proc, flag.exists), proc.communicate()
    proc.send_signal(signal.SIGINT)
    time.sleep(0.1)
    go.touch()
    rc, _, err = _finish(proc, timeout=120)
    assert rc == INTERRUPTED, err
    line = _one_error_line(err)
    assert "nothing was written" not in line and "after the merge was complete" in line, line
    assert str(out) in line
    assert verify(base, a2, out).ok  # the message is true: the new merge is there, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["flag", "go", "merged"]


# ---------------------------------------------------------------------------------------------------------------
# 6. the lock file never follows a symlink


@pytest.mark.parametrize("dangling", [False, True])
def test_lock_symlink_is_refused(small, tmp_path, capsys, dangling):
    out = tmp_path / "merged"
    victim = tmp_path / "victim.txt"
    if not dangling:
        victim.write_text("precious")
    (tmp_path / ".merged.streammerge.lock").symlink_to(victim)
    rc, _, err = ht.run_cli(_argv(small[0], small[1], out), capsys)
    assert rc == OUTPUT, err
    assert "symbolic link" in _one_error_line(err)
    if dangling:
        assert not victim.exists(), "the lock created the link's target"
    else:
        assert victim.read_text() == "precious", "the lock truncated the link's target"
    assert not out.exists() and not _staging(out)


# ---------------------------------------------------------------------------------------------------------------
# 7. inputs that used to be internal errors (exit 1)


def _with_config(src: Path, dst: Path, name: str, text: str) -> Path:
    shutil.copytree(src, dst)
    (dst / name).write_text(text)
    return dst


def _single(folder: Path, tensors: dict, like: Path) -> Path:
    folder.mkdir()
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(like / "config.json", folder)
    return folder


def test_target_parameters_not_a_list(small, tmp_path, capsys):
    cfg = json.loads((small[1] / "adapter_config.json").read_text())
    ad = _with_config(small[1], tmp_path / "ad", "adapter_config.json", json.dumps({**cfg, "target_parameters": 5}))
    rc, _, err = ht.run_cli(_argv(small[0], ad, tmp_path / "out"), capsys)
    assert rc == INPUT, err
    assert "target_parameters" in _one_error_line(err)


@pytest.mark.parametrize("which", ["adapter_config.json", "config.json"])
def test_config_nested_100k_deep(small, tmp_path, capsys, which):
    deep = '{"a":' * 100_000 + "1" + "}" * 100_000
    base, ad = small[0], small[1]
    if which == "config.json":
        base = _with_config(base, tmp_path / "base", which, deep)
    else:
        ad = _with_config(ad, tmp_path / "ad", which, deep)
    rc, _, err = ht.run_cli(_argv(base, ad, tmp_path / "out"), capsys)
    assert rc == INPUT, err
    assert which in _one_error_line(err) and "nested too deeply" in err


def test_empty_tensors_merge(small, tmp_path, capsys):
    """A [16, 0] tensor cast to f16, and a targeted tensor with 0 rows (its LoRA has a [0, r] lora_B): nothing
    to compute, and the merge says so by succeeding and verifying."""
    tensors = ht.base_tensors()
    tensors["extra.weight"] = torch.zeros(16, 0, dtype=torch.bfloat16)
    tensors["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(0, 16, dtype=torch.bfloat16)
    base = _single(tmp_path / "base", tensors, small[0])
    lora = ht.adapter_tensors(ht.base_tensors())
    lora[f"{ht.PREFIX}model.layers.0.self_attn.q_proj.lora_B.weight"] = torch.zeros(0, 4)
    ad = ht.make_adapter(tmp_path / "ad", base, tensors=lora)
    for dtype in ("f16", "bf16"):
        out = tmp_path / f"out-{dtype}"
        rc, _, err = ht.run_cli(_argv(base, ad, out, "--dtype", dtype, "--verify"), capsys)
        assert rc == 0, err


def test_tensor_name_with_lone_surrogate(small, tmp_path, capsys):
    base = Path(shutil.copytree(small[0], tmp_path / "base"))
    data = (base / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = data[8:8 + n].decode().replace('"model.norm.weight"', '"model.norm.weight\\ud800"').encode()
    header += b" " * (-len(header) % 8)
    (base / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + data[8 + n:])
    out = tmp_path / "out"
    rc, _, err = ht.run_cli(_argv(base, small[1], out), capsys)
    assert rc == INPUT, err
    assert "model.safetensors" in _one_error_line(err) and "surrogate" in err
    assert not out.exists()


def test_non_ascii_paths_with_an_ascii_terminal(small, tmp_path):
    """PYTHONIOENCODING=ascii and paths like `bäse`: the merge runs; unprintable characters are escaped, and the
    final marker drops its check mark (the plain `Done.` form) because the terminal cannot show it."""
    base = Path(shutil.copytree(small[0], tmp_path / "bäse"))
    out = tmp_path / "öut"
    r = _run(_argv(base, small[1], out), PYTHONIOENCODING="ascii")
    assert r.returncode == 0, r.stderr
    shown = str(out).replace("ö", "\\xf6")
    assert r.stdout.splitlines()[-1] == f"Done. Merged model: {shown}", r.stdout
    assert verify(base, small[1], out).ok
    r = _run(_argv(tmp_path / "nöpe", small[1], tmp_path / "x"), PYTHONIOENCODING="ascii")
    assert r.returncode == INPUT and "n\\xf6pe" in _one_error_line(r.stderr), r.stderr


# ---------------------------------------------------------------------------------------------------------------
# 8. thousands of shards under a small open-files limit


def test_1100_shards_under_ulimit_1024(tmp_path):
    tensors = ht.base_tensors(layers=122)  # 1101 tensors, one per shard
    base = tmp_path / "base"
    base.mkdir()
    ht.write_sharded(base, tensors, len(tensors))
    (base / "config.json").write_text(json.dumps(ht.config(layers=122)))
    ad = ht.make_adapter(tmp_path / "ad", base)
    out = tmp_path / "out"

    def limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024))

    proc = _spawn(_argv(base, ad, out), preexec=limit)
    rc, _, err = _finish(proc, timeout=300)
    assert rc == 0, err  # the old code: exit 3 "check permissions" on the 1000-somethingth shard
    assert verify(base, ad, out, sample_blocks=1).ok


def test_reader_keeps_few_files_open(tmp_path):
    from streammerge.io.checkpoint import open_checkpoint
    from streammerge.io.reader import TensorReader

    base = tmp_path / "base"
    base.mkdir()
    ht.write_sharded(base, ht.base_tensors(), 21)
    ckpt = open_checkpoint(base)
    before = len(os.listdir("/proc/self/fd"))
    with TensorReader(max_open=4) as reader:
        for info in ckpt.tensors.values():
            reader.read_rows(info, 0, info.rows)
            with reader.opened(info.path) as fd:
                assert os.fstat(fd).st_size == info.path.stat().st_size
            assert len(os.listdir("/proc/self/fd")) - before <= 4


def test_too_many_open_files_is_not_a_permission_problem(small, tmp_path, capsys, monkeypatch):
    import streammerge.io.reader as ck

    real = os.open

    def emfile(path, *a, **k):
        if str(path).endswith(".safetensors"):
            raise OSError(errno.EMFILE, "Too many open files", str(path))
        return real(path, *a, **k)

    monkeypatch.setattr(ck.os, "open", emfile)
    with pytest.raises(CheckpointError) as ei:
        ck.TensorReader().fd(small[0] / "model.safetensors")
    assert "too many open files" in str(ei.value) and "permission" not in str(ei.value)


# ---------------------------------------------------------------------------------------------------------------
# 9. the free-space check: the staging folder's file system, the margin said


def test_free_space_message_states_sizes_and_margin(small, tmp_path, capsys, tmpfs):
    """A ~15 KB merge onto a 1 MB file system: refused up front, in units that show the sizes, with the margin."""
    mnt = tmpfs(tmp_path / "mnt", "1m")
    rc, _, err = ht.run_cli(_argv(small[0], small[1], mnt / "merged"), capsys)
    assert rc == OUTPUT, err
    line = _one_error_line(err)
    assert "not enough free disk space" in line and "safety margin of 64 MiB" in line, line
    assert "0.00 GB" not in line and " KB" in line, line
    assert os.listdir(mnt) == []


def test_output_mount_point_is_refused_up_front(small, tmp_path, capsys, tmpfs, monkeypatch):
    """--output is a mount point (a big tmpfs) inside a small file system: the merge is staged beside it and
    renamed, which a mount point cannot take; decided before any shard is written."""
    import streammerge.io.writer as writer_mod

    small_fs = tmpfs(tmp_path / "small", "1m")
    out = tmpfs(small_fs / "merged", "64m")
    started = []
    monkeypatch.setattr(writer_mod.ShardWriter, "__init__", lambda *a, **k: started.append(a) or 1 / 0)
    rc, _, err = ht.run_cli(_argv(small[0], small[1], out), capsys)
    assert rc == OUTPUT, err
    assert "mount point" in _one_error_line(err)
    assert not started and os.listdir(small_fs) == ["merged"] and os.listdir(out) == []


# ---------------------------------------------------------------------------------------------------------------
# 10. an --output that is a symbolic link is decided up front


def test_output_symlink_to_an_empty_folder_is_followed(small, tmp_path, capsys):
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "lo"
    link.symlink_to(real)
    rc, _o, err = ht.run_cli(_argv(small[0], small[1], link), capsys)
    assert rc == 0, err
    assert link.is_symlink() and ht.looks_complete(real) and verify(small[0], small[1], link).ok
    assert sorted(os.listdir(tmp_path)) == ["lo", "real"]


def test_output_symlink_overwrite_replaces_the_target_and_keeps_the_link(small, tmp_path, capsys):
    import streammerge

    real = tmp_path / "real"
    streammerge.merge(small[0], small[1], real)
    link = tmp_path / "lo"
    link.symlink_to(real)
    rc, _, err = ht.run_cli(_argv(small[0], small[2], link, "--overwrite"), capsys)
    assert rc == 0, err
    assert link.is_symlink() and verify(small[0], small[2], real).ok
    assert sorted(os.listdir(tmp_path)) == ["lo", "real"], "a hidden staging link was left behind"


def test_output_dangling_symlink_is_refused_before_merging(small, tmp_path, capsys, monkeypatch):
    import streammerge.io.writer as writer_mod

    link = tmp_path / "lo"
    link.symlink_to(tmp_path / "nowhere" / "merged")
    started = []
    monkeypatch.setattr(writer_mod.ShardWriter, "__init__", lambda *a, **k: started.append(a) or 1 / 0)
    rc, _, err = ht.run_cli(_argv(small[0], small[1], link), capsys)
    assert rc == OUTPUT, err
    assert "symbolic link" in _one_error_line(err) and "does not exist" in err
    assert not started and sorted(os.listdir(tmp_path)) == ["lo"]


# ---------------------------------------------------------------------------------------------------------------
# 11. FIFOs in the base are not silently left out; verify checks __metadata__ and side files


@pytest.mark.parametrize("name", ["tokenizer_config.json", "config.json"])
def test_fifo_side_file_is_refused(small, tmp_path, name):
    base = Path(shutil.copytree(small[0], tmp_path / "base"))
    (base / name).unlink()
    os.mkfifo(base / name)
    out = tmp_path / "out"
    r = _run(_argv(base, small[1], out))  # a read of the FIFO would block for ever: a subprocess
    assert r.returncode == INPUT, r.stderr
    line = _one_error_line(r.stderr)
    assert name in line and "FIFO" in line, line
    assert not out.exists()


@pytest.fixture(scope="module")
def merged_small(small, tmp_path_factory):
    import streammerge

    out = tmp_path_factory.mktemp("merged") / "merged"
    streammerge.merge(small[0], small[1], out)
    return out


def test_verify_reports_changed_metadata(small, merged_small, tmp_path, capsys):
    out = Path(shutil.copytree(merged_small, tmp_path / "merged"))
    path = out / "model.safetensors"
    data = path.read_bytes()
    assert data.count(b'"format":"pt"') == 1
    path.write_bytes(data.replace(b'"format":"pt"', b'"format":"tf"'))  # same length: still a valid file
    rc, o, err = ht.run_cli(["verify", "--base", small[0], "--adapter", small[1], "--merged", out], capsys)
    assert rc == 9, o + err
    assert "__metadata__" in _one_error_line(err)


@pytest.mark.parametrize("name", ["tokenizer_config.json", "generation_config.json", "chat_template.jinja"])
def test_verify_reports_changed_side_files(small, merged_small, tmp_path, capsys, name):
    base = small[0]
    if name == "chat_template.jinja":
        base = Path(shutil.copytree(small[0], tmp_path / "base"))
        (base / name).write_text("{{ messages }}")
        out = tmp_path / "merged"
        import streammerge

        streammerge.merge(base, small[1], out)
    else:
        out = Path(shutil.copytree(merged_small, tmp_path / "merged"))
    assert verify(base, small[1], out).ok
    (out / name).write_text((out / name).read_text() + " ")
    rc, o, err = ht.run_cli(["verify", "--base", base, "--adapter", small[1], "--merged", out], capsys)
    assert rc == 9, o + err
    assert f"file {name} differs" in _one_error_line(err)


# ---------------------------------------------------------------------------------------------------------------
# 12. a rank/alpha pattern that backtracks catastrophically


def test_catastrophic_alpha_pattern_is_bounded(small, tmp_path):
    """PEFT matches `(.*\\.)?(KEY)$` with `re`; this key needs exponential time to fail on a module name, so
    planning would hang for hours. It is refused after a bounded time instead (a subprocess: the old code hangs)."""
    cfg = json.loads((small[1] / "adapter_config.json").read_text())
    cfg["alpha_pattern"] = {"(.|..|...|....)+[^j]": 4}
    ad = _with_config(small[1], tmp_path / "ad", "adapter_config.json", json.dumps(cfg))
    started = time.monotonic()
    proc = _spawn(_argv(small[0], ad, tmp_path / "out"))
    rc, _, err = _finish(proc, timeout=90)
    print(f"refused after {time.monotonic() - started:.1f} s")
    assert rc == INPUT, err
    line = _one_error_line(err)
    assert "alpha_pattern" in line and "(.|..|...|....)+[^j]" in line and "backtracks" in line, line


def test_slow_pattern_keeps_peft_matching(small, tmp_path):
    """A key that takes the bounded matcher (a repeat inside a repeat) selects exactly the modules PEFT's own
    `re.match` selects: the merge equals one with the plain key."""
    from safetensors.torch import load_file

    import streammerge
    from streammerge.patterns import may_backtrack

    outs = {}
    for key in (r"(\w+\.)+q_proj", "q_proj"):
        cfg = json.loads((small[1] / "adapter_config.json").read_text())
        cfg["alpha_pattern"] = {key: 3}
        ad = _with_config(small[1], tmp_path / f"ad{len(outs)}", "adapter_config.json", json.dumps(cfg))
        outs[key] = load_file(str(streammerge.merge(small[0], ad, tmp_path / f"o{len(outs)}").output /
                                  "model.safetensors"))
    assert may_backtrack(r"(\w+\.)+q_proj") and not may_backtrack("q_proj")
    a, b = outs.values()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    plain = load_file(str(streammerge.merge(small[0], small[1], tmp_path / "plain").output / "model.safetensors"))
    assert not torch.equal(a["model.layers.0.self_attn.q_proj.weight"], plain["model.layers.0.self_attn.q_proj.weight"])
    assert torch.equal(a["model.layers.0.self_attn.v_proj.weight"], plain["model.layers.0.self_attn.v_proj.weight"])


# ---------------------------------------------------------------------------------------------------------------
# the final lines scripts parse


def test_final_marker_and_loader_line(small, tmp_path):
    out = tmp_path / "merged"
    r = _run(_argv(small[0], small[1], out, "--verify"))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[-1] == f"{DONE}{out}", r.stdout  # exactly, and last
    assert "Loader  : auto -> causal-lm" in lines, r.stdout
    r = _run(_argv(small[0], small[1], tmp_path / "m2", "--loader", "causal-lm"))
    assert "Loader  : causal-lm" in r.stdout.splitlines(), r.stdout
