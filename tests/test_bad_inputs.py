"""The catalogue of bad inputs: every one is answered by exactly one `error: ...` line on stderr that
names the file / tensor / module and the fix, a non-zero exit code from streammerge.errors, no traceback, and no
output that looks complete (an existing output is left byte-for-byte untouched; no staging dir or lock is left).

Most cases run the CLI in-process (`streammerge.cli.main`, which is what `python -m streammerge` calls) to stay
fast; a few run a real subprocess to check the process-level contract too. Safetensors headers are fuzzed with
hypothesis against both our reader and the reference `safetensors` parser.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import shutil
import struct
import subprocess
from pathlib import Path

import helpers_tiny as ht
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from streammerge.errors import (
    AdapterError,
    CheckpointError,
    HubError,
    InputError,
    MissingFileError,
    NumericError,
    OutputError,
    PlanError,
    StreamMergeError,
    UnsupportedError,
)
from streammerge.io.safetensors import MAX_HEADER_SIZE, read_header

INPUT, PLAN, UNSUPPORTED, OUTPUT, NUMERIC, HUB, USAGE = 3, 4, 5, 6, 7, 8, 2
Q_PROJ = "model.layers.0.self_attn.q_proj"


# ---------------------------------------------------------------------------------------------------------------
# fixtures and the common assertion


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    root = tmp_path_factory.mktemp("good")
    base = ht.make_base(root / "base")
    sharded = ht.make_base(root / "sharded", shards=3)
    adapter = ht.make_adapter(root / "adapter", base)
    return base, sharded, adapter


@pytest.fixture
def base(good, tmp_path):
    return Path(shutil.copytree(good[0], tmp_path / "base"))


@pytest.fixture
def sharded(good, tmp_path):
    return Path(shutil.copytree(good[1], tmp_path / "sharded"))


@pytest.fixture
def adapter(good, tmp_path):
    return Path(shutil.copytree(good[2], tmp_path / "adapter"))


@pytest.fixture
def out(tmp_path):
    d = tmp_path / "outdir"
    d.mkdir()
    return d / "merged"


def fails(capsys, argv, code, *needles, output: Path | None = None):
    """Run the CLI and check the whole contract of a refused input; returns the error line."""
    parent = output.parent if output is not None else None
    before_parent = sorted(os.listdir(parent)) if parent is not None and parent.exists() else None
    before = ht.tree_digest(output) if output is not None else None
    rc, out, err = ht.run_cli(argv, capsys)
    assert rc == code, f"exit {rc}, expected {code}; stderr: {err}"
    assert "Traceback" not in out + err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1, err
    assert lines[-1] == errors[0], err  # nothing after the error line
    line = errors[0]
    assert "internal error" not in line, line
    for n in needles:
        assert n in line, f"{n!r} not in {line!r}"
    if output is not None:
        assert ht.tree_digest(output) == before, "the output path was changed"
        if before is None:
            assert not output.exists()
        if before_parent is not None:
            assert sorted(os.listdir(parent)) == before_parent, "a staging dir or lock was left behind"
    return line


def merge_argv(base, adapter, out, *extra):
    return ["--base", base, "--adapter", adapter, "--output", out, *extra]


def test_good_inputs_merge(capsys, base, adapter, out):
    """The control: the fixtures themselves merge cleanly (so every failure below is the corruption's)."""
    rc, _, err = ht.run_cli(merge_argv(base, adapter, out, "--verify"), capsys)
    assert rc == 0, err
    assert ht.looks_complete(out)
    assert sorted(os.listdir(out.parent)) == ["merged"]


# ---------------------------------------------------------------------------------------------------------------
# missing inputs


def test_missing_base(capsys, tmp_path, adapter, out):
    fails(capsys, merge_argv(tmp_path / "nope", adapter, out), INPUT, "nope", "not found", output=out)


def test_missing_adapter(capsys, base, tmp_path, out):
    fails(capsys, merge_argv(base, tmp_path / "nope", out), INPUT, "nope", "--adapter", output=out)


def test_missing_adapter_config(capsys, base, adapter, out):
    (adapter / "adapter_config.json").unlink()
    fails(capsys, merge_argv(base, adapter, out), INPUT, "adapter_config.json", "save_pretrained", output=out)


def test_missing_adapter_weights(capsys, base, adapter, out):
    (adapter / "adapter_model.safetensors").unlink()
    fails(capsys, merge_argv(base, adapter, out), INPUT, "adapter_model.safetensors", "re-download", output=out)


def test_base_without_weights(capsys, base, adapter, out):
    (base / "model.safetensors").unlink()
    fails(capsys, merge_argv(base, adapter, out), INPUT, str(base), "model.safetensors", output=out)


def test_base_with_only_pytorch_bin(capsys, base, adapter, out):
    (base / "model.safetensors").rename(base / "pytorch_model.bin")
    fails(capsys, merge_argv(base, adapter, out), INPUT, "pytorch_model.bin", "safe_serialization", output=out)


# ---------------------------------------------------------------------------------------------------------------
# corrupt safetensors files


def _shard(base: Path) -> Path:
    return base / "model.safetensors"


def test_corrupt_shard_random_bytes(capsys, base, adapter, out):
    _shard(base).write_bytes(os.urandom(4096))
    fails(capsys, merge_argv(base, adapter, out), INPUT, "model.safetensors", "re-download", output=out)


def test_truncated_shard(capsys, base, adapter, out):
    data = _shard(base).read_bytes()
    _shard(base).write_bytes(data[: len(data) - 100])
    fails(capsys, merge_argv(base, adapter, out), INPUT, "model.safetensors", "truncated", "re-download", output=out)


def test_truncated_inside_header(capsys, base, adapter, out):
    data = _shard(base).read_bytes()
    _shard(base).write_bytes(data[:40])
    fails(capsys, merge_argv(base, adapter, out), INPUT, "model.safetensors", "exceeds the file size", output=out)


def test_shard_shorter_than_length_prefix(capsys, base, adapter, out):
    _shard(base).write_bytes(b"\x01\x02")
    fails(capsys, merge_argv(base, adapter, out), INPUT, "model.safetensors", "too short", output=out)


def test_empty_shard(capsys, base, adapter, out):
    _shard(base).write_bytes(b"")
    fails(capsys, merge_argv(base, adapter, out), INPUT, "model.safetensors", "0 bytes", output=out)


def test_header_length_beyond_file(capsys, base, adapter, out):
    data = bytearray(_shard(base).read_bytes())
    data[:8] = struct.pack("<Q", len(data) + 1)
    _shard(base).write_bytes(bytes(data))
    fails(capsys, merge_argv(base, adapter, out), INPUT, "model.safetensors", "exceeds the file size", output=out)


def test_header_length_huge(capsys, base, adapter, out):
    data = bytearray(_shard(base).read_bytes())
    data[:8] = struct.pack("<Q", 2**63)
    _shard(base).write_bytes(bytes(data))
    fails(capsys, merge_argv(base, adapter, out), INPUT, "model.safetensors", "100 MB limit", output=out)


def _rewrite_header(path: Path, edit) -> None:
    header, n = ht.read_raw_header(path)
    data = path.read_bytes()[8 + n:]
    new = edit(header)
    ht.write_raw(path, new if isinstance(new, bytes) else json.dumps(new).encode(), data)


def test_header_not_json(capsys, base, adapter, out):
    _rewrite_header(_shard(base), lambda h: json.dumps(h).encode()[:-3] + b"}}}")
    fails(capsys, merge_argv(base, adapter, out), INPUT, "model.safetensors", "not valid JSON", output=out)


def test_header_not_utf8(capsys, base, adapter, out):
    _rewrite_header(_shard(base), lambda h: b'{"\xff\xfe": 1}')
    fails(capsys, merge_argv(base, adapter, out), INPUT, "model.safetensors", "not UTF-8", output=out)


def test_header_not_an_object(capsys, base, adapter, out):
    _rewrite_header(_shard(base), lambda h: b"[1, 2, 3]")
    fails(capsys, merge_argv(base, adapter, out), INPUT, "model.safetensors", "not a JSON object", output=out)


def test_header_duplicate_key(capsys, base, adapter, out):
    def dup(h):
        name, entry = next((k, v) for k, v in h.items() if k != "__metadata__")
        text = json.dumps(h)
        return (text[:-1] + ", " + json.dumps(name) + ": " + json.dumps(entry) + "}").encode()

    _rewrite_header(_shard(base), dup)
    fails(capsys, merge_argv(base, adapter, out), INPUT, "model.safetensors", "twice", output=out)


def _swap_offsets(h: dict) -> dict:
    """Make the second tensor (in data order) overlap the first by pointing both at the same bytes."""
    entries = sorted((v["data_offsets"], k) for k, v in h.items() if k != "__metadata__")
    (o0, k0), _ = entries[0], entries[1]
    same = [n for (o, n) in entries if o[1] - o[0] == o0[1] - o0[0] and n != k0]
    h[same[0]]["data_offsets"] = list(o0)
    return h


def test_header_overlapping_offsets(capsys, base, adapter, out):
    _rewrite_header(_shard(base), _swap_offsets)
    line = fails(capsys, merge_argv(base, adapter, out), INPUT, "model.safetensors", output=out)
    assert "overlaps" in line or "gap" in line or "after the last tensor" in line, line


def test_header_offsets_out_of_range(capsys, base, adapter, out):
    def push(h):
        name = max((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"][1])
        b, e = h[name]["data_offsets"]
        h[name]["data_offsets"] = [b + 1000, e + 1000]
        return h

    _rewrite_header(_shard(base), push)
    line = fails(capsys, merge_argv(base, adapter, out), INPUT, "model.safetensors", output=out)
    assert "gap" in line or "truncated" in line, line


def test_header_offsets_wrong_span(capsys, base, adapter, out):
    def shrink(h):
        name = next(k for k in h if k != "__metadata__")
        h[name]["data_offsets"][1] -= 2
        return h

    _rewrite_header(_shard(base), shrink)
    fails(capsys, merge_argv(base, adapter, out), INPUT, "model.safetensors", "data_offsets span", output=out)


def test_header_negative_offsets(capsys, base, adapter, out):
    def neg(h):
        name = next(k for k in h if k != "__metadata__")
        h[name]["data_offsets"] = [-4, 0]
        return h

    _rewrite_header(_shard(base), neg)
    fails(capsys, merge_argv(base, adapter, out), INPUT, "model.safetensors", "0 <= begin <= end", output=out)


@pytest.mark.parametrize("dtype", ["Q7", "bfloat16", "f16", ""])
def test_header_unknown_dtype(capsys, base, adapter, out, dtype):
    def bad(h):
        h[f"{Q_PROJ}.weight"]["dtype"] = dtype
        return h

    _rewrite_header(_shard(base), bad)
    fails(capsys, merge_argv(base, adapter, out), INPUT, "model.safetensors", f"{Q_PROJ}.weight",
          "unknown dtype", output=out)


def test_header_subbyte_dtype(capsys, base, adapter, out):
    def bad(h):
        h[f"{Q_PROJ}.weight"]["dtype"] = "F4"
        return h

    _rewrite_header(_shard(base), bad)
    fails(capsys, merge_argv(base, adapter, out), INPUT, "model.safetensors", "F4", "dequantize", output=out)


def test_header_bad_shape(capsys, base, adapter, out):
    def bad(h):
        h[f"{Q_PROJ}.weight"]["shape"] = [16, "16"]
        return h

    _rewrite_header(_shard(base), bad)
    fails(capsys, merge_argv(base, adapter, out), INPUT, f"{Q_PROJ}.weight", "shape", output=out)


def test_adapter_file_corrupt(capsys, base, adapter, out):
    p = adapter / "adapter_model.safetensors"
    p.write_bytes(p.read_bytes()[:-7])
    fails(capsys, merge_argv(base, adapter, out), INPUT, "adapter_model.safetensors", "truncated", output=out)


# ---------------------------------------------------------------------------------------------------------------
# the shard index


def _index(folder: Path) -> Path:
    return folder / "model.safetensors.index.json"


def _edit_index(folder: Path, edit) -> None:
    idx = json.loads(_index(folder).read_text())
    edit(idx["weight_map"])
    _index(folder).write_text(json.dumps(idx))


def test_sharded_control(capsys, sharded, adapter, out):
    rc, _, err = ht.run_cli(merge_argv(sharded, adapter, out), capsys)
    assert rc == 0, err


def test_index_lists_missing_shard(capsys, sharded, adapter, out):
    (sharded / "model-00002-of-00003.safetensors").unlink()
    fails(capsys, merge_argv(sharded, adapter, out), INPUT, "model-00002-of-00003.safetensors", "missing",
          "re-download", output=out)


@pytest.mark.parametrize("target", ["../evil.safetensors", "sub/../../evil.safetensors"])
def test_index_path_traversal(capsys, sharded, adapter, out, target):
    shutil.copy(sharded / "model-00001-of-00003.safetensors", sharded.parent / "evil.safetensors")

    def bad(wm):
        for k, v in wm.items():
            if v == "model-00001-of-00003.safetensors":
                wm[k] = target

    _edit_index(sharded, bad)
    fails(capsys, merge_argv(sharded, adapter, out), INPUT, "model.safetensors.index.json", target,
          "outside the model folder", output=out)


def test_index_absolute_path(capsys, sharded, adapter, out):
    evil = sharded.parent / "evil.safetensors"
    shutil.copy(sharded / "model-00001-of-00003.safetensors", evil)

    def bad(wm):
        for k, v in wm.items():
            if v == "model-00001-of-00003.safetensors":
                wm[k] = str(evil)

    _edit_index(sharded, bad)
    fails(capsys, merge_argv(sharded, adapter, out), INPUT, "model.safetensors.index.json", str(evil),
          "outside the model folder", output=out)


def test_index_symlink_out_of_folder(capsys, sharded, adapter, out, tmp_path):
    shard = sharded / "model-00001-of-00003.safetensors"
    outside = tmp_path / "elsewhere.safetensors"
    shard.rename(outside)
    shard.symlink_to(outside)
    fails(capsys, merge_argv(sharded, adapter, out), INPUT, "model-00001-of-00003.safetensors",
          "outside the model folder", output=out)


def test_side_file_symlink_out_of_folder(capsys, base, adapter, out, tmp_path):
    """A tokenizer/config file linking outside the model folder would be copied into the output: refused."""
    secret = tmp_path / "secret.txt"
    secret.write_text("private")
    (base / "tokenizer.json").symlink_to(secret)
    fails(capsys, merge_argv(base, adapter, out), INPUT, "tokenizer.json", "outside the model folder", output=out)


def test_side_file_symlink_inside_folder_is_fine(capsys, base, adapter, out):
    (base / "real_tokenizer.json").write_text("{}")
    (base / "tokenizer.json").symlink_to("real_tokenizer.json")
    rc, _, err = ht.run_cli(merge_argv(base, adapter, out), capsys)
    assert rc == 0, err
    assert (out / "tokenizer.json").read_text() == "{}" and not (out / "tokenizer.json").is_symlink()


def test_index_not_json(capsys, sharded, adapter, out):
    _index(sharded).write_text("{not json")
    fails(capsys, merge_argv(sharded, adapter, out), INPUT, "model.safetensors.index.json", "re-download",
          output=out)


def test_index_without_weight_map(capsys, sharded, adapter, out):
    _index(sharded).write_text(json.dumps({"metadata": {}}))
    fails(capsys, merge_argv(sharded, adapter, out), INPUT, "weight_map", output=out)


def test_index_and_shard_disagree(capsys, sharded, adapter, out):
    def bad(wm):
        wm["model.layers.9.self_attn.q_proj.weight"] = "model-00001-of-00003.safetensors"

    _edit_index(sharded, bad)
    fails(capsys, merge_argv(sharded, adapter, out), INPUT, "model.layers.9.self_attn.q_proj.weight",
          "disagree", output=out)


# ---------------------------------------------------------------------------------------------------------------
# adapter does not fit the base


def test_adapter_for_another_base_shape_mismatch(capsys, base, tmp_path, out):
    other = ht.make_base(tmp_path / "other", hidden=32, inter=64)
    ad = ht.make_adapter(tmp_path / "ad-other", other)
    line = fails(capsys, merge_argv(base, ad, out), PLAN, Q_PROJ, "[16, 16]", "another model", output=out)
    assert "does not fit" in line or "do not fit" in line


def test_adapter_matching_nothing(capsys, base, tmp_path, out):
    tensors = {f"{ht.PREFIX}transformer.h.{i}.attn.c_attn.lora_{x}.weight": torch.zeros(4, 16) if x == "A"
               else torch.zeros(16, 4) for i in range(2) for x in "AB"}
    ad = ht.make_adapter(tmp_path / "ad-none", base, tensors=tensors)
    fails(capsys, merge_argv(base, ad, out), PLAN, "transformer.h.0.attn.c_attn", "no tensor", "--loader",
          output=out)


def test_adapter_rank_disagrees_with_config(capsys, base, adapter, out):
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["r"] = 8
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    fails(capsys, merge_argv(base, adapter, out), PLAN, Q_PROJ, "r=8", output=out)


def test_adapter_lora_a_without_b(capsys, base, adapter, out, tmp_path):
    from safetensors.torch import load_file

    t = load_file(str(adapter / "adapter_model.safetensors"))
    del t[f"{ht.PREFIX}{Q_PROJ}.lora_B.weight"]
    save_file(t, str(adapter / "adapter_model.safetensors"))
    fails(capsys, merge_argv(base, adapter, out), PLAN, Q_PROJ, "lora_A.weight", "incomplete", output=out)


def test_adapter_lora_a_without_b_names_lora_b(capsys, base, adapter, out):
    from safetensors.torch import load_file

    t = load_file(str(adapter / "adapter_model.safetensors"))
    del t[f"{ht.PREFIX}{Q_PROJ}.lora_B.weight"]
    save_file(t, str(adapter / "adapter_model.safetensors"))
    fails(capsys, merge_argv(base, adapter, out), PLAN, "without its lora_B", output=out)


# ---------------------------------------------------------------------------------------------------------------
# numerics


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_nan_inf_in_adapter(capsys, base, adapter, out, value):
    from safetensors.torch import load_file

    t = load_file(str(adapter / "adapter_model.safetensors"))
    key = f"{ht.PREFIX}model.layers.1.self_attn.v_proj.lora_A.weight"
    t[key][1, 3] = value
    t[key][2, 0] = value
    save_file(t, str(adapter / "adapter_model.safetensors"))
    fails(capsys, merge_argv(base, adapter, out), NUMERIC, "adapter_model.safetensors", key, "2 NaN/Inf",
          "earlier checkpoint", output=out)


def test_nan_in_base_merged_tensor(capsys, base, adapter, out):
    from safetensors.torch import load_file

    t = load_file(str(_shard(base)))
    t[f"{Q_PROJ}.weight"][3, 3] = float("nan")
    save_file(t, str(_shard(base)), metadata={"format": "pt"})
    fails(capsys, merge_argv(base, adapter, out), NUMERIC, f"{Q_PROJ}.weight", "base tensor", output=out)


def _overflowing_adapter(adapter: Path) -> str:
    from safetensors.torch import load_file

    t = load_file(str(adapter / "adapter_model.safetensors"))
    key = f"{ht.PREFIX}model.layers.1.self_attn.q_proj.lora_B.weight"
    t[key][5] = 1e6  # row 5 of the delta: 16 values far beyond 65504 (a, b ~ 0.1 .. 0.5 → |delta| >> 1e4)
    a = f"{ht.PREFIX}model.layers.1.self_attn.q_proj.lora_A.weight"
    t[a] = torch.full_like(t[a], 1.0)
    save_file(t, str(adapter / "adapter_model.safetensors"))
    return "model.layers.1.self_attn.q_proj.weight"


def test_f16_overflow_refused_with_count_and_location(capsys, base, adapter, out):
    name = _overflowing_adapter(adapter)
    fails(capsys, merge_argv(base, adapter, out, "--dtype", "f16"), NUMERIC, name, "16 values", "row 5",
          "--clamp-f16", output=out)


def test_f16_overflow_count_is_per_tensor(capsys, tmp_path):
    from safetensors.torch import load_file

    base = ht.make_base(tmp_path / "b", vocab=4096)
    ad = ht.make_adapter(tmp_path / "a", base, targets=("lm_head",))
    t = load_file(str(ad / "adapter_model.safetensors"))
    b_key, a_key = f"{ht.PREFIX}lm_head.lora_B.weight", f"{ht.PREFIX}lm_head.lora_A.weight"
    t[a_key] = torch.ones_like(t[a_key])
    t[b_key][5] = 1e6
    t[b_key][4000] = 1e6  # another row block with --max-memory 1MB (64 KB blocks = 1024 rows of 16 floats)
    save_file(t, str(ad / "adapter_model.safetensors"))
    out = tmp_path / "o" / "merged"
    fails(capsys, merge_argv(base, ad, out, "--dtype", "f16", "--max-memory", "1MB"), NUMERIC, "lm_head.weight",
          "32 values", "row 5", output=out)


def test_f16_overflow_clamped_on_request(capsys, base, adapter, out):
    _overflowing_adapter(adapter)
    rc, _, err = ht.run_cli(merge_argv(base, adapter, out, "--dtype", "f16", "--clamp-f16"), capsys)
    assert rc == 0, err
    from safetensors.torch import load_file

    w = load_file(str(out / "model.safetensors"))["model.layers.1.self_attn.q_proj.weight"]
    assert w.dtype == torch.float16 and torch.isfinite(w).all() and w.abs().max() == 65504


def test_f16_overflow_ok_in_bf16(capsys, base, adapter, out):
    _overflowing_adapter(adapter)
    rc, _, err = ht.run_cli(merge_argv(base, adapter, out), capsys)
    assert rc == 0, err


# ---------------------------------------------------------------------------------------------------------------
# the output path


def test_existing_output_untouched(capsys, base, adapter, out):
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    fails(capsys, merge_argv(base, adapter, out), OUTPUT, str(out), "--overwrite", output=out)


def test_existing_empty_output_dir_is_fine(capsys, base, adapter, out):
    out.mkdir()
    rc, _, err = ht.run_cli(merge_argv(base, adapter, out), capsys)
    assert rc == 0, err and ht.looks_complete(out)


def test_overwrite_replaces_existing_output(capsys, base, adapter, out):
    out.mkdir()
    # a model folder (--overwrite refuses to replace anything else: tests/test_reliability.py)
    (out / "model-00001-of-00009.safetensors").write_text("old")
    rc, _, err = ht.run_cli(merge_argv(base, adapter, out, "--overwrite"), capsys)
    assert rc == 0, err
    assert ht.looks_complete(out) and not (out / "model-00001-of-00009.safetensors").exists()
    assert sorted(os.listdir(out.parent)) == ["merged"]


def test_output_is_a_file(capsys, base, adapter, out):
    out.write_text("not a folder")
    fails(capsys, merge_argv(base, adapter, out), OUTPUT, str(out), "is a file", output=out)


def test_output_under_a_file(capsys, base, adapter, out):
    out.write_text("not a folder")
    fails(capsys, merge_argv(base, adapter, out / "sub"), OUTPUT, str(out), "is a file, not a directory",
          output=out)


def test_output_overlaps_input(capsys, base, adapter):
    fails(capsys, merge_argv(base, adapter, base / "merged"), OUTPUT, "overlaps", output=base / "merged")


@pytest.fixture
def tmpfs(tmp_path):
    """A private tmpfs (root only): a real read-only or full file system. Skips where mounting is not allowed."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    mounted = []

    def mount(size: str = "1m", ro: bool = False) -> Path:
        opts = f"size={size}" + (",ro" if ro else "")
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(mnt)], capture_output=True)
        if r.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
        mounted.append(mnt)
        return mnt

    yield mount
    for m in mounted:
        subprocess.run(["umount", "-l", str(m)], check=False)


def test_output_unwritable_read_only_fs(capsys, base, adapter, tmpfs):
    mnt = tmpfs(ro=True)
    fails(capsys, merge_argv(base, adapter, mnt / "merged"), OUTPUT, "merged", "choose another --output",
          output=mnt / "merged")


def test_output_unwritable_permissions(capsys, base, adapter, tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root ignores permission bits (the read-only tmpfs test covers this as root)")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        fails(capsys, merge_argv(base, adapter, ro / "merged"), OUTPUT, "permission denied", output=ro / "merged")
    finally:
        ro.chmod(0o700)


def test_not_enough_disk_checked_before_start(capsys, base, adapter, out, monkeypatch):
    import streammerge.io.output as output_mod

    real = shutil.disk_usage
    monkeypatch.setattr(output_mod.shutil, "disk_usage",
                        lambda p: real(p)._replace(free=1000))
    opened = []
    import streammerge.io.writer as writer_mod

    monkeypatch.setattr(writer_mod.ShardWriter, "__init__", lambda *a, **k: opened.append(a) or 1 / 0)
    fails(capsys, merge_argv(base, adapter, out), OUTPUT, str(out), "not enough free disk space", "KB",
          "safety margin of 64 MiB", output=out)
    assert not opened, "a shard was started although the disk was known to be too small"


def test_disk_full_mid_write_os_write(base, adapter, out, monkeypatch):
    """ENOSPC from the writer's os.write (after the pre-check passed): OutputError, no output, no staging."""
    import streammerge.io.writer as writer_mod

    real_write = os.write

    def full(fd, data):
        target = os.readlink(f"/proc/self/fd/{fd}") if os.path.exists(f"/proc/self/fd/{fd}") else ""
        if str(out.parent) in target:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(writer_mod.os, "write", full)
    import streammerge

    with pytest.raises(OutputError, match="no space left on device") as ei:
        streammerge.merge(base, adapter, out)
    assert ei.value.exit_code == OUTPUT
    assert os.listdir(out.parent) == []


def test_disk_full_mid_write_real_tmpfs(base, tmp_path, tmpfs, monkeypatch):
    """A real full file system: the pre-check is bypassed so the kernel's ENOSPC is what stops the merge."""

    import streammerge
    import streammerge.api as merge_mod
    big = ht.make_base(tmp_path / "big", hidden=256, inter=512, vocab=1024)  # ~3 MB
    ad = ht.make_adapter(tmp_path / "big-ad", big)
    mnt = tmpfs(size="1m")
    monkeypatch.setattr(merge_mod, "check_free_space", lambda *a, **k: None)
    with pytest.raises(OutputError, match="no space left on device|choose another --output"):
        streammerge.merge(big, ad, mnt / "merged")
    assert os.listdir(mnt) == []


def test_disk_full_precheck_real_tmpfs(capsys, tmp_path, tmpfs):
    big = ht.make_base(tmp_path / "big", hidden=256, inter=512, vocab=1024)
    ad = ht.make_adapter(tmp_path / "big-ad", big)
    mnt = tmpfs(size="1m")
    fails(capsys, merge_argv(big, ad, mnt / "merged"), OUTPUT, "not enough free disk space",
          output=mnt / "merged")


# ---------------------------------------------------------------------------------------------------------------
# adapter config


@pytest.mark.parametrize("peft_type", ["OFT", "BOFT", "PREFIX_TUNING"])
def test_unsupported_peft_type(capsys, base, adapter, out, peft_type):
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["peft_type"] = peft_type
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    fails(capsys, merge_argv(base, adapter, out), UNSUPPORTED, "adapter_config.json", peft_type, "merge_and_unload",
          output=out)


@pytest.mark.parametrize("peft_type", ["IA3", "LOHA"])
def test_peft_type_disagrees_with_tensors(capsys, base, adapter, out, peft_type):
    """A supported type whose file holds LoRA tensors: nothing is merged as the wrong kind."""
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["peft_type"] = peft_type
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    fails(capsys, merge_argv(base, adapter, out), PLAN, Q_PROJ, "lora_A.weight", f"a {peft_type} adapter",
          output=out)


def test_unsupported_layer_replication(capsys, base, adapter, out):
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["layer_replication"] = [[0, 2], [1, 2]]
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    fails(capsys, merge_argv(base, adapter, out), UNSUPPORTED, "adapter_config.json", "layer_replication",
          output=out)


@pytest.mark.parametrize("text", ["{not json", "", "\xff\xfe", "[1, 2]", '"LORA"'])
def test_corrupt_adapter_config(capsys, base, adapter, out, text):
    (adapter / "adapter_config.json").write_bytes(text.encode("latin-1"))
    fails(capsys, merge_argv(base, adapter, out), INPUT, "adapter_config.json", output=out)


@pytest.mark.parametrize("field,value", [("r", "eight"), ("lora_alpha", True), ("rank_pattern", [1]),
                                         ("alpha_pattern", {"q_proj": "x"}), ("rank_pattern", {"(": 4})])
def test_adapter_config_wrong_types(capsys, base, adapter, out, field, value):
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg[field] = value
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    fails(capsys, merge_argv(base, adapter, out), INPUT, "adapter_config.json", field, output=out)


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("fmt", ["torch-zip", "legacy-pickle"])
def test_malicious_pickle_never_runs(capsys, base, adapter, out, tmp_path, fmt):
    marker = tmp_path / "PWNED"
    (adapter / "adapter_model.safetensors").unlink()
    payload = {f"{ht.PREFIX}{Q_PROJ}.lora_A.weight": torch.zeros(4, 16), "evil": _Evil(marker)}
    path = adapter / "adapter_model.bin"
    if fmt == "torch-zip":
        torch.save(payload, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(payload, f, protocol=2)
    fails(capsys, merge_argv(base, adapter, out), INPUT, "adapter_model.bin", "weights_only",
          "adapter_model.safetensors", output=out)
    assert not marker.exists(), "the pickle executed code"


def test_plain_bin_adapter_works(capsys, base, adapter, out):
    """The weights_only path still reads an honest adapter_model.bin."""
    from safetensors.torch import load_file

    t = load_file(str(adapter / "adapter_model.safetensors"))
    (adapter / "adapter_model.safetensors").unlink()
    torch.save(t, adapter / "adapter_model.bin")
    rc, _, err = ht.run_cli(merge_argv(base, adapter, out), capsys)
    assert rc == 0, err


def test_bin_adapter_not_a_dict(capsys, base, adapter, out):
    (adapter / "adapter_model.safetensors").unlink()
    torch.save([torch.zeros(2)], adapter / "adapter_model.bin")
    fails(capsys, merge_argv(base, adapter, out), INPUT, "adapter_model.bin", "dict of tensors", output=out)


# ---------------------------------------------------------------------------------------------------------------
# invalid flags: argparse's usage errors, but still one `error:` line, exit 2, no output


@pytest.mark.parametrize("extra,needle", [
    (["--dtype", "q4"], "--dtype"),
    (["--max-shard-size", "lots"], "invalid size"),
    (["--max-shard-size", "0"], "invalid size"),
    (["--max-memory", "-5MB"], "--max-memory"),
    (["--max-memory", "0.5"], "--max-memory"),
    (["--loader", "nonsense"], "--loader"),
    (["--frobnicate"], "--frobnicate"),
])
def test_invalid_flags(capsys, base, adapter, out, extra, needle):
    fails(capsys, merge_argv(base, adapter, out, *extra), USAGE, needle, output=out)


def test_missing_required_flag(capsys, base, out):
    fails(capsys, ["--base", base, "--output", out], USAGE, "--adapter", output=out)


@pytest.mark.parametrize("extra,needle", [(["--sample", "0"], "--sample"), (["--sample", "x"], "--sample"),
                                          (["--bogus"], "--bogus")])
def test_invalid_verify_flags(capsys, base, adapter, out, extra, needle):
    fails(capsys, ["verify", "--base", base, "--adapter", adapter, "--merged", out, *extra], USAGE, needle)


def test_clamp_without_f16_warns(capsys, base, adapter, out):
    rc, _, err = ht.run_cli(merge_argv(base, adapter, out, "--clamp-f16"), capsys)
    assert rc == 0 and err.startswith("warning: --clamp-f16 has no effect with --dtype bf16"), err


# ---------------------------------------------------------------------------------------------------------------
# dry run never writes, real processes behave the same


def test_dry_run_reports_problems_and_writes_nothing(capsys, base, adapter, out):
    (adapter / "adapter_config.json").write_text("{")
    fails(capsys, merge_argv(base, adapter, out, "--dry-run"), INPUT, "adapter_config.json", output=out)


def test_subprocess_contract(tmp_path, good):
    """One real process per family: exit code, single stderr line, no traceback, nothing at --output."""
    base, _, adapter = good
    bad = Path(shutil.copytree(base, tmp_path / "bad"))
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[:-1])
    out = tmp_path / "o" / "merged"
    r = ht.run_subprocess(["--base", bad, "--adapter", adapter, "--output", out])
    assert r.returncode == INPUT, r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    assert r.stderr.strip().count("\n") == 0 and r.stderr.startswith("error: "), r.stderr
    assert "model.safetensors" in r.stderr and "truncated" in r.stderr
    assert not out.exists()
    r = ht.run_subprocess(["--base", base, "--adapter", adapter, "--output", out, "--dtype", "int4"])
    assert r.returncode == USAGE and r.stderr.strip().count("\n") == 0 and "Traceback" not in r.stderr, r.stderr


# ---------------------------------------------------------------------------------------------------------------
# the token never leaks


def test_token_never_printed_on_errors(capsys, base, adapter, out, monkeypatch):
    import huggingface_hub.constants as constants

    token = "hf_SECRETsecret0123456789abcdef"
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # read from the environment at import: patch both
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(out.parent / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(out.parent / "cache"))
    # an error message that would contain the token if anything echoed argv or the environment
    rc, o, e = ht.run_cli(merge_argv(base, f"someorg/{token}-missing", out, "--hf-token", token), capsys)
    assert rc == HUB and token not in o + e and "***" in e, e
    monkeypatch.setenv("HF_TOKEN", token)
    rc, o, e = ht.run_cli(merge_argv(base, adapter, out, "--verify"), capsys)
    assert rc == 0 and token not in o + e


# ---------------------------------------------------------------------------------------------------------------
# API-level: every refusal is a StreamMergeError subclass with its exit code (no bare ValueError/OSError)


@pytest.mark.parametrize("kind,exc", [
    ("missing-base", MissingFileError), ("bad-header", CheckpointError), ("bad-config", AdapterError),
    ("plan", PlanError), ("unsupported", UnsupportedError), ("numeric", NumericError), ("output", OutputError),
])
def test_api_raises_typed_errors(base, adapter, out, tmp_path, kind, exc):
    import streammerge

    b, a = base, adapter
    if kind == "missing-base":
        b = tmp_path / "nope"
    elif kind == "bad-header":
        _shard(base).write_bytes(b"\x00" * 16)
    elif kind == "bad-config":
        (adapter / "adapter_config.json").write_text("{")
    elif kind == "plan":
        a = ht.make_adapter(tmp_path / "ad2", ht.make_base(tmp_path / "b2", hidden=32))
    elif kind == "unsupported":
        cfg = json.loads((adapter / "adapter_config.json").read_text())
        cfg["peft_type"] = "OFT"
        (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    elif kind == "numeric":
        _overflowing_adapter(adapter)
    elif kind == "output":
        out.write_text("x")
    with pytest.raises(exc) as ei:
        streammerge.merge(b, a, out, dtype="f16" if kind == "numeric" else "bf16")
    assert isinstance(ei.value, StreamMergeError)
    assert "\n" not in str(ei.value)


# ---------------------------------------------------------------------------------------------------------------
# hypothesis: safetensors headers


_KNOWN = ["F32", "F16", "BF16", "I64", "I32", "I8", "U8", "BOOL", "F64", "I16"]
_WEIRD = ["F4", "Q8", "f32", "", "BF16 ", "F8_E4M3", "U16", "C64"]


def _entry():
    dims = st.lists(st.one_of(st.integers(0, 6), st.integers(-3, -1), st.just(2**62), st.booleans(),
                              st.floats(0, 4), st.text(max_size=2)), max_size=3)
    offs = st.one_of(
        st.lists(st.one_of(st.integers(-10, 400), st.just(2**64), st.booleans(), st.none()), min_size=0, max_size=3),
        st.integers(), st.none(), st.text(max_size=3))
    return st.fixed_dictionaries(
        {}, optional={"dtype": st.one_of(st.sampled_from(_KNOWN + _WEIRD), st.integers(), st.none()),
                      "shape": st.one_of(dims, st.none(), st.integers()), "data_offsets": offs})


_headers = st.dictionaries(
    st.one_of(st.text(min_size=0, max_size=6), st.just("__metadata__")),
    st.one_of(_entry(), st.dictionaries(st.text(max_size=3), st.text(max_size=3), max_size=2), st.integers(),
              st.lists(st.integers(), max_size=2)),
    max_size=4)


def _valid_tensors():
    """Random small tensors: a header both parsers must accept (and agree on)."""
    return st.dictionaries(
        st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=8).filter(
            lambda s: s != "__metadata__"),
        st.tuples(st.sampled_from(["F32", "F16", "BF16", "I64", "U8", "BOOL"]),
                  st.lists(st.integers(0, 4), max_size=3)),
        max_size=5)


def _safetensors_accepts(path: Path) -> bool:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            for k in f.keys():  # noqa: SIM118 - safe_open handles are not iterable
                f.get_slice(k)
        return True
    except Exception:
        return False


def _check_file(path: Path) -> None:
    """Our reader either accepts (and the tensors tile the file, and safetensors agrees) or raises CheckpointError
    with one line naming the file. Nothing else may escape."""
    try:
        tensors, _meta = read_header(path)
    except CheckpointError as e:
        msg = str(e)
        assert "\n" not in msg and str(path) in msg
        return
    size = path.stat().st_size
    for info in tensors.values():
        assert info.offset + info.nbytes <= size
    assert _safetensors_accepts(path), "we accepted a file the reference parser refuses"


_fuzz = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@_fuzz
@given(header=_headers, data=st.binary(max_size=64), lie=st.one_of(st.none(), st.integers(0, 2**64 - 1)))
def test_fuzz_structured_headers(tmp_path, header, data, lie):
    path = tmp_path / "f.safetensors"
    ht.write_raw(path, json.dumps(header).encode(), data, header_len=lie)
    _check_file(path)


@_fuzz
@given(raw=st.binary(max_size=96))
def test_fuzz_raw_bytes(tmp_path, raw):
    path = tmp_path / "f.safetensors"
    path.write_bytes(raw)
    _check_file(path)


@_fuzz
@given(raw=st.binary(max_size=64), data=st.binary(max_size=32))
def test_fuzz_raw_header_with_true_length(tmp_path, raw, data):
    path = tmp_path / "f.safetensors"
    ht.write_raw(path, raw, data)
    _check_file(path)


@_fuzz
@given(spec=_valid_tensors(), flip=st.integers(0, 10_000), byte=st.integers(0, 255))
def test_fuzz_valid_then_mutated(tmp_path, spec, flip, byte):
    """A file save_file wrote is accepted with the same tensors; the same file with one header byte changed is
    accepted only if safetensors accepts it too, else refused with a CheckpointError."""
    from streammerge.io.formats import DTYPES

    tensors = {name: torch.zeros(shape, dtype=DTYPES[dt]) for name, (dt, shape) in spec.items()}
    path = tmp_path / "f.safetensors"
    save_file(tensors, str(path))
    got, _ = read_header(path)
    assert {k: (v.dtype, list(v.shape)) for k, v in got.items()} == {k: (dt, sh) for k, (dt, sh) in spec.items()}
    data = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    pos = flip % (n + 8)
    data[pos] = byte
    path.write_bytes(bytes(data))
    _check_file(path)


def test_header_size_limit_matches_safetensors():
    assert MAX_HEADER_SIZE == 100_000_000


def test_errors_have_distinct_exit_codes():
    codes = {c: c.exit_code for c in (InputError, PlanError, UnsupportedError, OutputError, NumericError, HubError)}
    assert sorted(codes.values()) == [3, 4, 5, 6, 7, 8]
