#!/usr/bin/env python
"""Benchmark streammerge against `cp -r` (the I/O floor) and the PEFT full-load merge, in one run.

    python scripts/bench.py --base DIR --adapter DIR [--rounds 3] [--work DIR] [--peft/--no-peft]
        [--extra-args "--max-memory 256MB"] [--variant NAME="ARGS" ...] [--label NAME] [--out docs/performance.md]
        [--verify/--no-verify] [--batch-adapters DIR DIR ...] [--resume-at 0.8] [--compare A/B ...]

Each round runs, alternating, (a) `cp -r BASE WORK/cp-out`, (b) `python -m streammerge ... --output WORK/sm-out
--overwrite EXTRA` (or, with `--variant`, one streammerge contender per variant, each with its own arguments, e.g.
`--variant bf16="" --variant keep="--dtype keep"` on an FP8 base; a variant whose ARGS hold `--adapter DIR` merges
that adapter instead of --adapter, e.g. `--variant r128="--adapter r128 --threads 1"`), (c) when transformers and peft
are importable and
--no-peft is not given, the PEFT path
(from_pretrained bf16 -> PeftModel.from_pretrained -> merge_and_unload -> save_pretrained + tokenizer copy) in a
subprocess. Page cache is not dropped: one untimed `cp -r` of the base (and a read of the adapter) warms it first,
and the base is read back into the cache before every timed command (streammerge drops the pages it has read),
so every contender reads from a warm cache. Outputs are deleted and `sync` is run between runs, outside the timed
region, so no contender pays for another's write-back.

For each command: wall time, and peak *anonymous* memory = the largest sum of RssAnon over the process and all its
descendants, sampled every ~20 ms from /proc (file-backed mmap pages, e.g. safetensors shards, do not count);
peak total RSS is recorded for information. The report (stdout and a markdown section appended to --out) gives
every round, the medians, and the medians of the per-round ratios streammerge/cp and peft/streammerge.
Exits non-zero when streammerge fails (the failure is reported, the other contenders still run).

`--batch-adapters A B C D` adds two contenders: `singles xN`, the N merges one after the other (one shell
command), and `batch xN`, `streammerge batch` of the same N jobs in one pass; their ratio is reported. `--resume-at F`
adds `resume@F`: untimed, the plain merge is started and SIGKILLed once its staging folder holds F of the base's
bytes; timed, the same command with `--resume` finishes it (its ratio to the full `streammerge` run is reported).
`--compare A/B` reports the median per-round wall ratio of any two contenders.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib.util
import json
import os
import platform
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent

# --------------------------------------------------------------------------------------------------------------
# memory sampling


def _children_map() -> dict[int, list[int]]:
    """ppid -> [pid] for every process, from /proc/<pid>/stat."""
    kids: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read()
        except OSError:  # exited meanwhile
            continue
        # "pid (comm) state ppid ...": comm may contain spaces and parentheses, so split after the last ')'
        rest = stat[stat.rfind(b")") + 2 :].split()
        kids.setdefault(int(rest[1]), []).append(int(entry.name))
    return kids


def _children_of(pid: int) -> list[int] | None:
    """Children of one process from /proc/<pid>/task/*/children (None where the kernel lacks that file)."""
    kids: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return kids  # exited meanwhile
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children", "rb") as f:
                kids.extend(int(x) for x in f.read().split())
        except FileNotFoundError:
            if not os.path.exists(f"/proc/{pid}/task/{tid}"):
                continue  # the thread ended
            return None
        except OSError:
            continue
    return kids


def process_tree(root: int) -> list[int]:
    """root and all its descendants. Walks only the tree (a few files per sample) rather than scanning every
    process in /proc, which on 2 cores took CPU from the contender being measured."""
    out, todo = [], [root]
    kids_map = None
    while todo:
        pid = todo.pop()
        out.append(pid)
        kids = _children_of(pid) if kids_map is None else None
        if kids is None:
            kids_map = kids_map or _children_map()
            kids = kids_map.get(pid, [])
        todo.extend(kids)
    return out


def read_mem(pid: int) -> tuple[int, int]:
    """(RssAnon, VmRSS) of one process in bytes; (0, 0) if it is gone or a zombie."""
    anon = rss = 0
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"RssAnon:"):
                    anon = int(line.split()[1]) * 1024
                elif line.startswith(b"VmRSS:"):
                    rss = int(line.split()[1]) * 1024
    except OSError:
        pass
    return anon, rss


def tree_mem(root: int) -> tuple[int, int]:
    """Summed (RssAnon, VmRSS) of root and its descendants, in bytes."""
    anon = rss = 0
    for pid in process_tree(root):
        a, r = read_mem(pid)
        anon += a
        rss += r
    return anon, rss


def loadavg() -> float:
    try:
        with open("/proc/loadavg") as f:
            return float(f.read().split()[0])
    except OSError:
        return float("nan")


@dataclass
class RunResult:
    cmd: list[str]
    returncode: int
    wall: float  # seconds
    peak_anon: int  # bytes, summed over the process tree
    peak_rss: int
    samples: int
    stdout: str = ""
    stderr: str = ""
    cpu: float = 0.0  # user+sys seconds of the process and its reaped descendants
    load: float = 0.0  # 1-minute load average when it started: > nproc means other work competed for the CPUs

    @property
    def ok(self) -> bool:
        return self.returncode == 0


def run_measured(cmd: list[str], *, interval: float = 0.02, env: dict | None = None, cwd: str | None = None,
                 timeout: float | None = None, log_dir: Path | None = None, name: str = "run") -> RunResult:
    """Run cmd, sampling the memory of its process tree every `interval` seconds until it exits.

    stdout/stderr go to files (in log_dir, or a temp dir) so a chatty child can never block on a full pipe."""
    import tempfile

    tmp = None
    if log_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench-")
        log_dir = Path(tmp.name)
    log_dir.mkdir(parents=True, exist_ok=True)
    out_p, err_p = log_dir / f"{name}.stdout", log_dir / f"{name}.stderr"
    peak_anon = peak_rss = samples = 0
    load = loadavg()
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(out_p, "wb") as out_f, open(err_p, "wb") as err_f:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out_f, stderr=err_f, stdin=subprocess.DEVNULL, env=env, cwd=cwd)
        try:
            while True:
                anon, rss = tree_mem(proc.pid)
                samples += 1
                peak_anon, peak_rss = max(peak_anon, anon), max(peak_rss, rss)
                try:
                    proc.wait(timeout=interval)  # returns as soon as the child exits: exact wall time
                    break
                except subprocess.TimeoutExpired:
                    if timeout is not None and time.perf_counter() - t0 > timeout:
                        proc.kill()
                        proc.wait()
                        break
            wall = time.perf_counter() - t0
        except BaseException:
            proc.kill()
            proc.wait()
            raise
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    res = RunResult(cmd, proc.returncode, wall, peak_anon, peak_rss, samples,
                    out_p.read_text(errors="replace"), err_p.read_text(errors="replace"), cpu, load)
    if tmp is not None:
        tmp.cleanup()
    return res


# --------------------------------------------------------------------------------------------------------------
# contenders

PEFT_SCRIPT = r"""
import inspect, os, shutil, sys
import torch
from transformers import AutoModelForCausalLM
from peft import PeftModel

base, adapter, out = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16, low_cpu_mem_usage=True)
model = PeftModel.from_pretrained(model, adapter)
model = model.merge_and_unload()
kw = {"safe_serialization": True} if "safe_serialization" in inspect.signature(model.save_pretrained).parameters else {}
model.save_pretrained(out, **kw)
for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
             "tokenizer.model", "added_tokens.json", "chat_template.jinja"):
    if os.path.exists(os.path.join(base, name)):
        shutil.copy2(os.path.join(base, name), os.path.join(out, name))
print("Done. Merged model:", out)
"""


def have_peft_stack(python: str) -> bool:
    if python == sys.executable:
        return all(importlib.util.find_spec(m) is not None for m in ("torch", "transformers", "peft"))
    r = subprocess.run([python, "-c", "import torch, transformers, peft"], capture_output=True)
    return r.returncode == 0


def rm(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


def settle(base: Path | None = None) -> None:
    """Outside any timed region: flush dirty pages of the previous run, and read the base back into the page cache
    (streammerge drops the pages it has read, so without this the contender after it would read from disk)."""
    subprocess.run(["sync"], check=False)
    if base is not None:
        for f in sorted(base.iterdir()):
            if f.is_file():
                with open(f, "rb") as fh:
                    while fh.readinto(_WARM_BUF):
                        pass


_WARM_BUF = bytearray(8 << 20)


def warm_cache(base: Path, adapter: Path, work: Path) -> float:
    t0 = time.perf_counter()
    tgt = work / "warmup-cp"
    rm(tgt)
    subprocess.run(["cp", "-r", str(base), str(tgt)], check=True)
    for p in adapter.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                while f.read(1 << 24):
                    pass
    rm(tgt)
    settle()
    return time.perf_counter() - t0


def verify_outputs(sm_out: Path, peft_out: Path) -> str:
    """Compare the streammerge and PEFT merged tensors (untimed): key sets, shapes, max |diff|."""
    code = r"""
import json, sys, glob, os
from safetensors import safe_open
import torch
def tensors(d):
    m = {}
    for f in sorted(glob.glob(os.path.join(d, "*.safetensors"))):
        with safe_open(f, "pt") as h:
            for k in h.keys():
                m[k] = f
    return m
a, b = tensors(sys.argv[1]), tensors(sys.argv[2])
only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
worst, worst_k, ndiff, n, dtypes = 0.0, None, 0, 0, set()
for k in sorted(set(a) & set(b)):
    with safe_open(a[k], "pt") as ha, safe_open(b[k], "pt") as hb:
        x, y = ha.get_tensor(k), hb.get_tensor(k)
    dtypes.add((str(x.dtype), str(y.dtype)))
    if x.shape != y.shape:
        print("SHAPE MISMATCH", k, x.shape, y.shape); sys.exit(1)
    d = (x.float() - y.float()).abs()
    ndiff += int((d > 0).sum()); n += d.numel()
    if d.max().item() > worst:
        worst, worst_k = d.max().item(), k
print(f"{len(set(a) & set(b))} common tensors; only streammerge: {only_a[:3]}{'...' if len(only_a) > 3 else ''} "
      f"({len(only_a)}); only peft: {only_b[:3]} ({len(only_b)}); dtypes {sorted(dtypes)}; "
      f"max |diff| {worst:.3g}{f' ({worst_k})' if worst_k else ''}; elements differing {ndiff / max(n, 1):.2%}")
"""
    r = subprocess.run([sys.executable, "-c", code, str(sm_out), str(peft_out)], capture_output=True, text=True)
    return (r.stdout.strip() or (r.stderr.strip().splitlines()[-1:] and r.stderr.strip().splitlines()[-1])) or "?"


# --------------------------------------------------------------------------------------------------------------
# report


def mb(n: float) -> str:
    """Decimal megabytes, as streammerge prints its own peak."""
    return f"{n / 1e6:,.0f}"


def machine_info(work: Path) -> dict[str, str]:
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")
    except OSError:
        pass
    ram = "?"
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    ram = f"{int(line.split()[1]) / 2**20:.1f} GiB"
    except OSError:
        pass
    du = shutil.disk_usage(work)
    vers = subprocess.run(
        [sys.executable, "-c", "import sys, torch; print(sys.version.split()[0], torch.__version__)"],
        capture_output=True, text=True).stdout.split()
    return {
        "cpus": str(os.cpu_count()), "cpu": cpu, "ram": ram, "disk_free": f"{du.free / 1e9:.0f} GB",
        "python": vers[0] if vers else platform.python_version(), "torch": vers[1] if len(vers) > 1 else "?",
        "date": _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
    }


def dir_size(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


@dataclass
class Bench:
    rows: list[tuple[int, str, RunResult]] = field(default_factory=list)

    def of(self, name: str) -> list[RunResult]:
        return [r for _, n, r in self.rows if n == name]

    def round_of(self, rnd: int, name: str) -> RunResult | None:
        for i, n, r in self.rows:
            if i == rnd and n == name:
                return r
        return None


def render(b: Bench, info: dict, args, cmdline: str, floor: RunResult | None, notes: list[str], base_size: int) -> str:
    L = []
    L.append(f"## {args.label} — {info['date']}\n")
    L.append(f"- Machine: {info['cpus']} CPUs ({info['cpu']}), {info['ram']} RAM, {info['disk_free']} free on "
             f"the work disk; Python {info['python']}, torch {info['torch']}")
    L.append(f"- Base: `{args.base}` ({base_size / 1e9:.2f} GB on disk); adapter: `{args.adapter}`")
    L.append(f"- Command: `{cmdline}`")
    L.append("- Page cache: not dropped; one untimed `cp -r` of the base and a read of the adapter warmed it first, "
             "and the base is read back into the cache before every run, so every contender reads from a warm cache. "
             "Outputs deleted and `sync` run between runs (untimed).")
    L.append(f"- CPU = user+sys seconds of the process tree; load = 1-min load average at the start of the run "
             f"(above {info['cpus']} means other work was competing for the CPUs and wall times are inflated).")
    L.append("- Peak anon = max over 20 ms samples of the summed `RssAnon` of the process and its descendants "
             "(file-backed mmap pages excluded); peak RSS includes them.")
    if floor is not None:
        L.append(f"- Runtime floor: `python -c \"import torch, safetensors\"` peaks at {mb(floor.peak_anon)} MB anon "
                 f"({mb(floor.peak_rss)} MB RSS), {floor.wall:.2f} s")
    L.append("")
    L.append("| round | contender | wall (s) | CPU (s) | peak anon (MB) | peak RSS (MB) | load at start | status |")
    L.append("|---:|---|---:|---:|---:|---:|---:|---|")
    for rnd, name, r in b.rows:
        status = "ok" if r.ok else f"FAILED (exit {r.returncode})"
        L.append(f"| {rnd} | {name} | {r.wall:.2f} | {r.cpu:.1f} | {mb(r.peak_anon)} | {mb(r.peak_rss)} | "
                 f"{r.load:.1f} | {status} |")
    L.append("")
    L.append("| contender | median wall (s) | median CPU (s) | median peak anon (MB) | median peak RSS (MB) | runs ok |")
    L.append("|---|---:|---:|---:|---:|---:|")
    sm_names = [n for n in dict.fromkeys(n for _, n, _ in b.rows) if n not in ("cp", "peft")]
    for name in ("cp", *sm_names, "peft"):
        rs = [r for r in b.of(name) if r.ok]
        if not b.of(name):
            continue
        if rs:
            L.append(f"| {name} | {statistics.median(r.wall for r in rs):.2f} | {statistics.median(r.cpu for r in rs):.1f} | "
                     f"{mb(statistics.median(r.peak_anon for r in rs))} | {mb(statistics.median(r.peak_rss for r in rs))} | "
                     f"{len(rs)}/{len(b.of(name))} |")
        else:
            L.append(f"| {name} | – | – | – | – | 0/{len(b.of(name))} |")
    L.append("")
    rounds = sorted({i for i, _, _ in b.rows})

    def med_ratio(num: str, den: str, attr: str) -> str:
        vals = []
        for i in rounds:
            x, y = b.round_of(i, num), b.round_of(i, den)
            if x and y and x.ok and y.ok:
                vals.append(ratio(getattr(x, attr), getattr(y, attr)))
        return f"{statistics.median(vals):.2f}× (per round: {', '.join(f'{v:.2f}' for v in vals)})" if vals else "n/a"

    for name in sm_names:
        L.append(f"- Median of per-round ratios: {name}/cp wall = {med_ratio(name, 'cp', 'wall')}")
    for pair in args.compare:
        num, den = pair.split("/", 1)
        L.append(f"- Median of per-round ratios: {num}/{den} wall = {med_ratio(num, den, 'wall')}")
    if b.of("peft") and b.of("streammerge"):
        L.append(f"- peft/streammerge wall = {med_ratio('peft', 'streammerge', 'wall')}; "
                 f"peft/streammerge peak anon = {med_ratio('peft', 'streammerge', 'peak_anon')}")
    for n in notes:
        L.append(f"- {n}")
    L.append("")
    return "\n".join(L)


def kill_part_way(cmd: list[str], out: Path, nbytes: float, env: dict) -> str:
    """Run `cmd` (a merge into `out`) and SIGKILL it once its staging folder holds `nbytes`; leaves that folder."""
    for stale in out.parent.glob(f".{out.name}.*"):
        shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink()
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=str(REPO))
    size = 0
    while proc.poll() is None:
        size = sum(f.stat().st_size for d in out.parent.glob(f".{out.name}.*") if d.is_dir()
                   for f in d.iterdir() if f.is_file())
        if size >= nbytes:
            proc.kill()
            proc.wait()
            return f"merge killed after {time.perf_counter() - started:.1f}s with {size / 1e9:.2f} GB staged (untimed)"
        time.sleep(0.05)
    return f"the merge ended (exit {proc.returncode}) before {nbytes / 1e9:.2f} GB were staged: nothing to resume"


def tail(s: str, n: int = 15) -> str:
    return "\n".join(s.strip().splitlines()[-n:])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True, type=Path)
    ap.add_argument("--adapter", required=True, type=Path)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--work", type=Path, default=None, help="scratch dir for outputs (default: BASE/../bench-work)")
    ap.add_argument("--peft", action=argparse.BooleanOptionalAction, default=True,
                    help="also time the PEFT full-load merge (default on when transformers+peft import)")
    ap.add_argument("--verify", action=argparse.BooleanOptionalAction, default=True,
                    help="compare streammerge's and PEFT's merged tensors after the last round (untimed)")
    ap.add_argument("--extra-args", default="", help="extra streammerge CLI arguments, one shell-quoted string")
    ap.add_argument("--variant", action="append", default=[], metavar='NAME="ARGS"',
                    help="a streammerge contender named NAME run with ARGS (after --extra-args); repeatable. Without "
                         "it there is one contender, `streammerge`")
    ap.add_argument("--batch-adapters", nargs="+", type=Path, default=[], metavar="DIR",
                    help="time N single merges one after the other against `streammerge batch` of the same N jobs")
    ap.add_argument("--resume-at", type=float, default=None, metavar="F",
                    help="time `--resume` after a merge killed once F (0..1) of its bytes were written")
    ap.add_argument("--compare", action="append", default=[], metavar="A/B",
                    help="also report the median per-round wall ratio of contender A to contender B")
    ap.add_argument("--label", default=None, help="section title (default: base folder name)")
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "performance.md", help="markdown file to append to")
    ap.add_argument("--python", default=sys.executable, help="interpreter for streammerge and PEFT runs")
    ap.add_argument("--interval", type=float, default=0.02, help="memory sampling period, seconds")
    ap.add_argument("--timeout", type=float, default=3600, help="per-command timeout, seconds")
    args = ap.parse_args(argv)
    args.base, args.adapter = args.base.resolve(), args.adapter.resolve()
    args.label = args.label or args.base.parent.name or args.base.name
    cmdline = shlex.join([Path(sys.executable).name, *sys.argv]) if argv is None else shlex.join(["bench.py", *argv])
    for p in (args.base, args.adapter):
        if not p.is_dir():
            print(f"error: {p} is not a directory", file=sys.stderr)
            return 2
    work = (args.work or args.base.parent / "bench-work").resolve()
    work.mkdir(parents=True, exist_ok=True)
    logs = work / "logs"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HF_HUB_OFFLINE", "1")

    use_peft = args.peft and have_peft_stack(args.python)
    notes: list[str] = []
    if args.peft and not use_peft:
        notes.append("PEFT contender skipped: torch/transformers/peft not importable.")
    base_size = dir_size(args.base)
    need = base_size * (3 if use_peft else 2) * 1.1
    free = shutil.disk_usage(work).free
    if free < need:
        print(f"error: {work} has {free / 1e9:.1f} GB free, need about {need / 1e9:.1f} GB", file=sys.stderr)
        return 2

    info = machine_info(work)
    print(f"bench: {args.label}: base {args.base} ({base_size / 1e9:.2f} GB), work {work}", flush=True)
    print(f"warming page cache (untimed cp -r): {warm_cache(args.base, args.adapter, work):.1f}s", flush=True)
    # Twice, keeping the second: the first pays for cold .so/.pyc reads, which no contender below does.
    for _ in range(2):
        floor = run_measured([args.python, "-c", "import torch, safetensors"], interval=args.interval, env=env,
                             log_dir=logs, name="floor")

    variants = dict(v.split("=", 1) if "=" in v else (v, "") for v in args.variant) or {"streammerge": ""}
    sm_names = [n if n == "streammerge" else f"streammerge {n}" for n in variants]
    outs = {"cp": work / "cp-out", "peft": work / "peft-out"}
    cmds = {"cp": ["cp", "-r", str(args.base), str(outs["cp"])],
            "peft": [args.python, "-c", PEFT_SCRIPT, str(args.base), str(args.adapter), str(outs["peft"])]}
    def merge_cmd(out: Path, extra: str = "", adapter: Path | None = None) -> list[str]:
        tail = [*shlex.split(args.extra_args), *shlex.split(extra)]
        own = [] if "--adapter" in tail else ["--adapter", str(adapter or args.adapter)]
        return [args.python, "-m", "streammerge", "--base", str(args.base), *own, "--output", str(out),
                "--overwrite", *tail]

    for i, (name, extra) in enumerate(zip(sm_names, variants.values())):
        outs[name] = work / f"sm-out{i or ''}"
        cmds[name] = merge_cmd(outs[name], extra)
    pre: dict[str, Any] = {}   # untimed step before a contender's timed command
    if args.batch_adapters:
        n = len(args.batch_adapters)
        singles, batch = f"singles x{n}", f"batch x{n}"
        outs[singles], outs[batch] = work / "singles-out", work / "batch-out"
        cmds[singles] = ["sh", "-c", " && ".join(shlex.join(merge_cmd(outs[singles] / f"job{j}", adapter=a.resolve()))
                                                 for j, a in enumerate(args.batch_adapters))]
        jobs_file = work / "bench-jobs.json"
        jobs_file.write_text(json.dumps({"base": str(args.base), "overwrite": True, "jobs": [
            {"adapter": str(a.resolve()), "output": str(outs[batch] / f"job{j}")}
            for j, a in enumerate(args.batch_adapters)]}))
        cmds[batch] = [args.python, "-m", "streammerge", "batch", str(jobs_file), *shlex.split(args.extra_args)]
        sm_names += [singles, batch]
        args.compare.append(f"{batch}/{singles}")
    if args.resume_at is not None:
        name = f"resume@{args.resume_at:g}"
        outs[name] = work / "resume-out"
        cmds[name] = merge_cmd(outs[name], "--resume")
        pre[name] = lambda out=outs[name]: kill_part_way(merge_cmd(out), out, args.resume_at * base_size, env)
        sm_names.append(name)
        args.compare.append(f"{name}/{sm_names[0]}")
    order = ["cp", *sm_names] + (["peft"] if use_peft else [])
    keep_for_check = {"streammerge", "peft"} if args.verify and use_peft else set()
    bench = Bench()
    failed: set[str] = set()
    for rnd in range(1, args.rounds + 1):
        for name in order:
            if name in failed:
                continue
            rm(outs[name])
            if name in pre:
                print(f"round {rnd} {name}: {pre[name]()}", flush=True)
            settle(args.base)
            r = run_measured(cmds[name], interval=args.interval, env=env, cwd=str(REPO), timeout=args.timeout,
                             log_dir=logs, name=f"r{rnd}-{name}")
            is_sm = name in sm_names
            if is_sm and r.ok and "Done. Merged model:" not in r.stdout and not name.startswith("batch"):
                notes.append(f"{name} exited 0 but printed no `Done. Merged model:` line.")
            if r.ok and not any(outs[name].glob("*.safetensors")) and not any(outs[name].glob("*/*.safetensors")):
                r.returncode = r.returncode or 99
                notes.append(f"{name} round {rnd}: exit 0 but no .safetensors in {outs[name]}.")
            bench.rows.append((rnd, name, r))
            print(f"round {rnd} {name:11s} {r.wall:8.2f}s  cpu {r.cpu:7.1f}s  load {r.load:4.1f}  peak anon {mb(r.peak_anon):>7s} MB  "
                  f"peak RSS {mb(r.peak_rss):>7s} MB  {'ok' if r.ok else f'FAILED exit {r.returncode}'}", flush=True)
            if is_sm and not r.ok:
                failed.add(name)
                msg = tail(r.stderr or r.stdout, 2).replace("\n", " | ")
                notes.append(f"{name} FAILED in round {rnd} (exit {r.returncode}): `{msg[:600]}`; "
                             "later rounds skip it. Full logs: " + str(logs))
                print(f"{name} failed (exit {r.returncode}):\n{tail(r.stderr or r.stdout)}", file=sys.stderr)
            if name == "peft" and not r.ok:
                notes.append(f"peft round {rnd} failed (exit {r.returncode}): "
                             f"`{tail(r.stderr, 3).replace(chr(10), ' | ')[:400]}`")
            if is_sm and r.ok and rnd == 1:
                last = [ln for ln in r.stdout.strip().splitlines() if ln.strip()][-3:]
                notes.append(f"{name}'s own summary (round 1): " + " / ".join(f"`{ln.strip()}`" for ln in last))
            if name not in keep_for_check or rnd < args.rounds:
                rm(outs[name])  # at once: an 8B base's outputs side by side would take the disk
    if (keep_for_check and "streammerge" not in failed and bench.of("peft") and bench.of("peft")[-1].ok
            and bench.of("streammerge")):
        v = verify_outputs(outs["streammerge"], outs["peft"])
        notes.append(f"Output check (last round, streammerge vs peft): {v}")
        print("verify:", v, flush=True)
    for p in outs.values():
        rm(p)

    md = render(bench, info, args, cmdline, floor, notes, base_size)
    print()
    print(md)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    new = not args.out.exists()
    with open(args.out, "a") as f:
        if new:
            f.write("# Performance\n\nSections appended by `scripts/bench.py`.\n\n")
        f.write(md + "\n")
    print(f"appended to {args.out}")
    return 1 if failed or not any(bench.of(n) for n in sm_names) else 0


if __name__ == "__main__":
    sys.exit(main())
