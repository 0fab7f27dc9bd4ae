"""`--base` / `--adapter` as Hugging Face repo ids, resolved through huggingface_hub from a local cache laid out
exactly as huggingface_hub lays it out (models--org--name/{blobs,refs/main,snapshots/<commit>/... symlinks}),
offline (HF_HUB_OFFLINE=1, HF_HUB_CACHE). No network is used or needed."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import helpers_tiny as ht
import pytest

from streammerge.errors import HubError
from streammerge.io.hub import resolve

HUB_ERROR = 8
TOKEN = "hf_TOKENtoken1234567890SECRET"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def cache_repo(cache: Path, repo_id: str, src: Path, commit: str = COMMIT, extra: dict[str, bytes] | None = None
               ) -> Path:
    """Put every file of `src` into `cache` as huggingface_hub would after a download; returns the snapshot."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    blobs, snap = repo / "blobs", repo / "snapshots" / commit
    blobs.mkdir(parents=True, exist_ok=True)
    snap.mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)  # no trailing newline, as huggingface_hub writes it
    files = {p.relative_to(src).as_posix(): p.read_bytes() for p in sorted(src.rglob("*")) if p.is_file()}
    files.update(extra or {})
    for rel, data in files.items():
        digest = hashlib.sha256(data).hexdigest()
        (blobs / digest).write_bytes(data)
        link = snap / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        depth = rel.count("/") + 2  # snapshots/<commit>/[dirs/]file -> ../../[../]blobs/<sha>
        link.symlink_to(Path(*[".."] * depth) / "blobs" / digest)
    return snap


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub-local")
    base = ht.make_base(root / "base")
    (base / "README.md").write_text("card\n")  # copied to the output from either source
    sharded = ht.make_base(root / "sharded", shards=3)
    adapter = ht.make_adapter(root / "adapter", base)
    return base, sharded, adapter


@pytest.fixture(scope="module")
def cache(local, tmp_path_factory):
    base, sharded, adapter = local
    c = tmp_path_factory.mktemp("hf-cache") / "hub"
    cache_repo(c, "tiny-org/tiny-base", base, extra={"pytorch_model.bin": b"not needed"})
    cache_repo(c, "tiny-org/tiny-sharded", sharded)
    cache_repo(c, "tiny-org/tiny-lora", adapter, commit="f" * 40)
    return c


@pytest.fixture
def offline(cache, monkeypatch):
    """HF_HUB_OFFLINE=1 and HF_HUB_CACHE for this process (huggingface_hub reads them into constants at import)."""
    import huggingface_hub.constants as constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    return cache


@pytest.fixture
def spy(monkeypatch):
    """Record every snapshot_download call (allow_patterns, token) while still running the real one."""
    import huggingface_hub

    real = huggingface_hub.snapshot_download
    calls = []

    def wrapped(repo_id, **kw):
        calls.append({"repo_id": repo_id, **kw})
        return real(repo_id, **kw)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", wrapped)
    return calls


def _merge(capsys, base, adapter, out, *extra):
    return ht.run_cli(["--base", base, "--adapter", adapter, "--output", out, *extra], capsys)


def _files(d: Path) -> dict:
    return ht.tree_digest(d)


# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["single", "sharded"])
def test_repo_ids_give_the_same_output_as_local_folders(capsys, local, offline, tmp_path, kind, spy):
    base, sharded, adapter = local
    src, repo = (base, "tiny-org/tiny-base") if kind == "single" else (sharded, "tiny-org/tiny-sharded")
    rc, _, err = _merge(capsys, src, adapter, tmp_path / "from-local")
    assert rc == 0, err
    rc, out, err = _merge(capsys, repo, "tiny-org/tiny-lora", tmp_path / "from-hub", "--hf-token", TOKEN)
    assert rc == 0, err
    assert _files(tmp_path / "from-hub") == _files(tmp_path / "from-local")
    assert TOKEN not in out + err
    assert {c["repo_id"] for c in spy} == {repo, "tiny-org/tiny-lora"}
    assert all(c.get("token") == TOKEN for c in spy)


def test_allow_patterns_fetch_exactly_what_is_needed(capsys, local, offline, tmp_path, spy):
    rc, _, err = _merge(capsys, "tiny-org/tiny-sharded", "tiny-org/tiny-lora", tmp_path / "out")
    assert rc == 0, err
    import fnmatch

    def fetched(call, name):
        return any(fnmatch.fnmatch(name, p) for p in call["allow_patterns"])

    base_calls = [c for c in spy if c["repo_id"] == "tiny-org/tiny-sharded"]
    final = base_calls[-1]
    shards = [f"model-{i:05d}-of-00003.safetensors" for i in (1, 2, 3)]
    assert all(fetched(final, s) for s in shards)
    for unwanted in ("pytorch_model.bin", "model-00004-of-00004.safetensors", "original/consolidated.00.pth",
                     "model.safetensors", "tf_model.h5", "flax_model.msgpack", "model.gguf"):
        assert not any(fetched(c, unwanted) for c in base_calls), unwanted
    assert fetched(final, "model.safetensors.index.json") and fetched(final, "config.json")
    ad_calls = [c for c in spy if c["repo_id"] == "tiny-org/tiny-lora"]
    assert fetched(ad_calls[0], "adapter_model.safetensors") and fetched(ad_calls[0], "adapter_config.json")
    assert not any(fetched(c, "model.safetensors") or fetched(c, "pytorch_model.bin") for c in ad_calls)


def test_env_token_is_used_and_never_printed(capsys, local, offline, tmp_path, spy, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    rc, out, err = _merge(capsys, "tiny-org/tiny-base", "tiny-org/tiny-lora", tmp_path / "out", "--verify")
    assert rc == 0, err
    assert TOKEN not in out + err
    assert spy and all(c.get("token") == TOKEN for c in spy)


def test_missing_repo_is_one_line_hub_error(capsys, local, offline, tmp_path):
    out = tmp_path / "out"
    rc, o, err = _merge(capsys, "tiny-org/not-cached", "tiny-org/tiny-lora", out, "--hf-token", TOKEN)
    assert rc == HUB_ERROR, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: tiny-org/not-cached:"), err
    assert "--base" in lines[0] and "cache" in lines[0]
    assert "Traceback" not in o + err and TOKEN not in o + err
    assert not out.exists() and os.listdir(tmp_path) == []


def test_missing_adapter_repo_names_the_adapter(capsys, local, offline, tmp_path):
    rc, _o, err = _merge(capsys, "tiny-org/tiny-base", "tiny-org/lora-not-cached", tmp_path / "out")
    assert rc == HUB_ERROR and "tiny-org/lora-not-cached" in err and "--adapter" in err, err


def test_ref_to_missing_snapshot_is_hub_error(local, offline, tmp_path):
    repo = offline / "models--tiny-org--dangling"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("e" * 40)
    with pytest.raises(HubError, match="tiny-org/dangling"):
        resolve("tiny-org/dangling", "base")


def test_snapshot_symlinks_into_blobs_are_allowed(local, offline):
    """The strict index check allows shard symlinks into the cache's own blobs/ (and nothing else)."""
    from streammerge.io.checkpoint import open_checkpoint

    folder = resolve("tiny-org/tiny-sharded", "base")
    assert folder.parent.name == "snapshots"
    ckpt = open_checkpoint(folder)
    assert len(ckpt.files) == 3 and all(p.is_symlink() for p in ckpt.files)


def test_not_a_path_nor_a_repo_id(capsys, local, offline, tmp_path):
    rc, _, err = _merge(capsys, "./no/such/dir", local[2], tmp_path / "out")
    assert rc == 3 and "no such folder" in err, err


def test_local_folder_wins_over_repo_id(local, offline, tmp_path, monkeypatch, spy):
    monkeypatch.chdir(tmp_path)
    import shutil

    shutil.copytree(local[0], tmp_path / "tiny-org" / "tiny-base")
    assert resolve("tiny-org/tiny-base", "base") == Path("tiny-org/tiny-base")
    assert spy == []


def test_verify_with_repo_ids(capsys, local, offline, tmp_path):
    out = tmp_path / "out"
    rc, _, err = _merge(capsys, local[0], local[2], out)
    assert rc == 0, err
    rc, o, err = ht.run_cli(["verify", "--base", "tiny-org/tiny-base", "--adapter", "tiny-org/tiny-lora",
                             "--merged", out, "--hf-token", TOKEN], capsys)
    assert rc == 0 and "Verify: OK" in o and TOKEN not in o + err, err


def test_subprocess_offline_env(local, cache, tmp_path):
    """The real environment variables in a fresh process: HF_HUB_OFFLINE=1 + HF_HUB_CACHE, token via HF_TOKEN."""
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_TOKEN": TOKEN, "HF_HOME": str(tmp_path / "home")}
    out = tmp_path / "from-hub"
    r = ht.run_subprocess(["--base", "tiny-org/tiny-sharded", "--adapter", "tiny-org/tiny-lora", "--output", out],
                          env=env)
    assert r.returncode == 0, r.stderr
    assert TOKEN not in r.stdout + r.stderr
    local_out = tmp_path / "from-local"
    import streammerge

    streammerge.merge(local[1], local[2], local_out)
    assert _files(out) == _files(local_out)
    r = ht.run_subprocess(["--base", "nobody/nothing", "--adapter", "tiny-org/tiny-lora", "--output",
                           tmp_path / "x", "--hf-token", TOKEN], env=env)
    assert r.returncode == HUB_ERROR, r.stderr
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: nobody/nothing:"), r.stderr
    assert TOKEN not in r.stdout + r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("repo", ["org/na--me", "org/name.", "o/" + "x" * 120])
def test_invalid_repo_id_is_hub_error(capsys, local, offline, tmp_path, repo):
    rc, _, err = _merge(capsys, repo, local[2], tmp_path / "out")
    assert rc == HUB_ERROR and "not a valid Hugging Face repo id" in err and "Traceback" not in err, err
    assert err.count("\n") == 1
