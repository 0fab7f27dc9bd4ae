"""`streammerge verify`: recompute base + adapter, compare in ulps per tensor, report missing/extra
tensors and config problems, and catch a single corrupted byte anywhere in an output shard."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import helpers_tiny as ht
import pytest
import torch
from safetensors.torch import load_file, save_file

from streammerge.errors import VerifyError
from streammerge.verify import ulp_distance, verify

VERIFY_FAILED, INPUT = 9, 3
Q0 = "model.layers.0.self_attn.q_proj.weight"
EMBED = "model.embed_tokens.weight"


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("verify")
    base = ht.make_base(root / "base", hidden=32, inter=64, vocab=128)
    adapter = ht.make_adapter(root / "adapter", base, targets=("q_proj", "v_proj", "down_proj"))
    return base, adapter


@pytest.fixture(scope="module")
def merged_once(pair, tmp_path_factory):
    import streammerge

    base, adapter = pair
    single = tmp_path_factory.mktemp("m1") / "merged"
    sharded = tmp_path_factory.mktemp("m2") / "merged"
    streammerge.merge(base, adapter, single)
    streammerge.merge(base, adapter, sharded, max_shard_size="4KB")
    return single, sharded


@pytest.fixture
def merged(merged_once, tmp_path):
    return Path(shutil.copytree(merged_once[0], tmp_path / "merged"))


@pytest.fixture
def merged_sharded(merged_once, tmp_path):
    return Path(shutil.copytree(merged_once[1], tmp_path / "merged-sharded"))


def run_verify(capsys, pair, merged, *extra):
    base, adapter = pair
    return ht.run_cli(["verify", "--base", base, "--adapter", adapter, "--merged", merged, *extra], capsys)


def assert_verify_fails(capsys, pair, merged, *needles, extra=()):
    rc, out, err = run_verify(capsys, pair, merged, *extra)
    assert rc == VERIFY_FAILED, (rc, out, err)
    assert "Traceback" not in out + err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return out, lines[0]


def _tensor_span(path: Path, name: str) -> tuple[int, int]:
    header, n = ht.read_raw_header(path)
    b, e = header[name]["data_offsets"]
    return 8 + n + b, 8 + n + e


def _flip(path: Path, pos: int, mask: int = 0xFF) -> None:
    data = bytearray(path.read_bytes())
    data[pos] ^= mask
    path.write_bytes(bytes(data))


# ---------------------------------------------------------------------------------------------------------------


def test_clean_merge_verifies(capsys, pair, merged):
    rc, out, err = run_verify(capsys, pair, merged)
    assert rc == 0, err
    assert "largest difference 0 ulp" in out and "Verify: OK" in out
    report = verify(*pair, merged)
    assert report.ok and not report.missing and not report.extra and not report.config_problems
    names = set(ht.read_shapes(merged))
    assert {c.name for c in report.checks} == names
    assert all(c.rows_checked == c.rows for c in report.checks)


def test_sharded_merge_verifies(capsys, pair, merged_sharded):
    assert len(list(merged_sharded.glob("*.safetensors"))) > 2
    rc, _out, err = run_verify(capsys, pair, merged_sharded)
    assert rc == 0, err


@pytest.mark.parametrize("which,offset", [(Q0, 0), (Q0, 1), (Q0, -1), (EMBED, 7), ("model.norm.weight", -2)])
def test_flipped_data_byte_detected(capsys, pair, merged, which, offset):
    """One flipped byte anywhere (low or high byte; merged or copied tensor; first or last row) fails verify."""
    shard = merged / "model.safetensors"
    b, e = _tensor_span(shard, which)
    _flip(shard, b + offset if offset >= 0 else e + offset)
    _out, line = assert_verify_fails(capsys, pair, merged, which, "ulp")
    assert "differs by up to" in line


@pytest.mark.parametrize("mask", [0x01, 0x80])
def test_single_bit_flip_detected(capsys, pair, merged, mask):
    shard = merged / "model.safetensors"
    b, _ = _tensor_span(shard, Q0)
    _flip(shard, b + 10, mask)
    assert_verify_fails(capsys, pair, merged, Q0)


def test_sign_flip_of_zero_detected(pair, merged, tmp_path):
    """-0.0 vs +0.0 are equal numbers but different bytes: still a corrupted output."""
    base, adapter = pair
    shard = merged / "model.safetensors"
    t = load_file(str(shard))
    name = "model.layers.0.input_layernorm.weight"
    t[name] = torch.zeros_like(t[name])
    # make the base agree (a zero tensor) so only the sign bit differs
    b2 = Path(shutil.copytree(base, tmp_path / "b2"))
    bt = load_file(str(b2 / "model.safetensors"))
    bt[name] = torch.zeros_like(bt[name])
    save_file(bt, str(b2 / "model.safetensors"), metadata={"format": "pt"})
    t[name][3] = -0.0
    save_file(t, str(shard), metadata={"format": "pt"})
    report = verify(b2, adapter, merged)
    assert not report.ok and any(c.name == name and c.max_ulps >= 1 for c in report.checks)


def test_flipped_byte_in_sharded_output(capsys, pair, merged_sharded):
    shards = sorted(merged_sharded.glob("model-*.safetensors"))
    victim = shards[len(shards) // 2]
    header, _n = ht.read_raw_header(victim)
    name = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
    b, e = _tensor_span(victim, name)
    _flip(victim, (b + e) // 2)
    assert_verify_fails(capsys, pair, merged_sharded, name)


def test_flipped_header_byte_detected(capsys, pair, merged):
    shard = merged / "model.safetensors"
    _flip(shard, 8 + 3)  # inside the JSON header
    assert_verify_fails(capsys, pair, merged, "merged output is damaged", "model.safetensors")


def test_truncated_output_shard_detected(capsys, pair, merged_sharded):
    shard = sorted(merged_sharded.glob("model-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-1])
    assert_verify_fails(capsys, pair, merged_sharded, "damaged", shard.name, "truncated")


def test_missing_output_shard_detected(capsys, pair, merged_sharded):
    shard = sorted(merged_sharded.glob("model-*.safetensors"))[1]
    shard.unlink()
    assert_verify_fails(capsys, pair, merged_sharded, "incomplete", shard.name)


def test_sampled_verify_checks_fewer_rows_and_catches_edges(capsys, pair, tmp_path):
    import streammerge

    _base, _adapter = pair
    big = ht.make_base(tmp_path / "big", hidden=64, inter=128, vocab=40000)  # embed: 40000 rows, 4 blocks
    ad = ht.make_adapter(tmp_path / "ad", big)
    out = tmp_path / "out"
    streammerge.merge(big, ad, out)
    report = verify(big, ad, out, sample_blocks=1)
    assert report.ok
    emb = next(c for c in report.checks if c.name == EMBED)
    assert emb.rows_checked < emb.rows
    # the first and the last block are always in the sample
    shard = out / "model.safetensors"
    _, e = _tensor_span(shard, EMBED)
    _flip(shard, e - 1)
    rc, _o, err = ht.run_cli(["verify", "--base", big, "--adapter", ad, "--merged", out, "--sample", "1"], capsys)
    assert rc == VERIFY_FAILED and EMBED in err, err


def test_missing_and_extra_tensors(capsys, pair, merged):
    shard = merged / "model.safetensors"
    t = load_file(str(shard))
    del t["model.norm.weight"]
    t["model.extra.weight"] = torch.zeros(3, dtype=torch.bfloat16)
    save_file(t, str(shard), metadata={"format": "pt"})
    _, _line = assert_verify_fails(capsys, pair, merged, "missing tensor model.norm.weight",
                                  "unexpected tensor model.extra.weight")


def test_shape_or_dtype_mismatch(capsys, pair, merged):
    shard = merged / "model.safetensors"
    t = load_file(str(shard))
    t[Q0] = t[Q0].to(torch.int16)
    save_file(t, str(shard), metadata={"format": "pt"})
    assert_verify_fails(capsys, pair, merged, Q0, "expected BF16")


def test_config_inconsistency(capsys, pair, merged):
    cfg = json.loads((merged / "config.json").read_text())
    cfg["hidden_size"] = 999
    (merged / "config.json").write_text(json.dumps(cfg))
    assert_verify_fails(capsys, pair, merged, "config.json field 'hidden_size'", "999")


def test_config_missing(capsys, pair, merged):
    (merged / "config.json").unlink()
    assert_verify_fails(capsys, pair, merged, "config.json is missing")


def test_side_file_not_copied(capsys, pair, merged):
    (merged / "generation_config.json").unlink()
    assert_verify_fails(capsys, pair, merged, "generation_config.json was not copied")


def test_merged_folder_missing(capsys, pair, tmp_path):
    rc, _out, err = run_verify(capsys, pair, tmp_path / "nothing")
    assert rc == INPUT and "nothing" in err and "Traceback" not in err, err


@pytest.mark.parametrize("dtype", ["f16", "f32", "auto"])
def test_other_output_dtypes_verify(capsys, pair, tmp_path, dtype):
    import streammerge

    out = tmp_path / dtype
    streammerge.merge(*pair, out, dtype=dtype)
    rc, _o, err = run_verify(capsys, pair, out)
    assert rc == 0, err


def test_merge_with_verify_flag(capsys, pair, tmp_path):
    base, adapter = pair
    out = tmp_path / "merged"
    rc, o, err = ht.run_cli(["--base", base, "--adapter", adapter, "--output", out, "--verify"], capsys)
    assert rc == 0, err
    assert "Verify: OK" in o and "largest difference 0 ulp" in o


def test_merge_with_verify_flag_reports_failure(capsys, pair, tmp_path, monkeypatch):
    """If the bytes on disk went bad between writing and --verify, the command fails with VerifyError's code."""
    import streammerge.verify as verify_mod

    real = verify_mod.verify

    def corrupt_then_verify(base, adapter, merged, **kw):
        shard = Path(merged) / "model.safetensors"
        b, _ = _tensor_span(shard, Q0)
        _flip(shard, b + 5)
        return real(base, adapter, merged, **kw)

    monkeypatch.setattr(verify_mod, "verify", corrupt_then_verify)
    base, adapter = pair
    rc, _o, err = ht.run_cli(["--base", base, "--adapter", adapter, "--output", tmp_path / "m", "--verify"], capsys)
    assert rc == VERIFY_FAILED and Q0 in err and "Traceback" not in err, err


def test_verify_api_raises_only_for_damage(pair, merged):
    _flip(merged / "model.safetensors", 8 + 1)
    with pytest.raises(VerifyError):
        verify(*pair, merged)


def test_verify_does_not_write(pair, merged):
    before = ht.tree_digest(merged)
    verify(*pair, merged)
    assert ht.tree_digest(merged) == before


# ---------------------------------------------------------------------------------------------------------------
# ulp arithmetic


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_ulp_distance_neighbours(dtype):
    x = torch.tensor([1.0, -2.5, 0.0, 3e-3], dtype=dtype)
    ints = {2: torch.int16, 4: torch.int32}[x.element_size()]
    up = (x.view(ints) + 1).view(dtype)
    assert ulp_distance(x, x.clone()) == 0
    assert ulp_distance(x, up) == 1
    up3 = (x.view(ints) + 3).view(dtype)
    assert ulp_distance(x, up3) == 3


def test_ulp_distance_across_zero_and_signs():
    a = torch.tensor([0.0], dtype=torch.bfloat16)
    b = torch.tensor([-0.0], dtype=torch.bfloat16)
    assert ulp_distance(a, b) == 1
    tiny = torch.tensor([1], dtype=torch.int16).view(torch.bfloat16)
    neg_tiny = torch.tensor([-32767], dtype=torch.int16).view(torch.bfloat16)  # 0x8001: -smallest subnormal
    assert ulp_distance(tiny, neg_tiny) == 2
    assert ulp_distance(torch.tensor([1.0]), torch.tensor([-1.0])) > 2**29


def test_ulp_distance_nan_and_ints():
    nan = torch.tensor([float("nan")])
    assert ulp_distance(nan, nan.clone()) == 0
    assert ulp_distance(nan, torch.tensor([1.0])) > 0
    assert ulp_distance(torch.tensor([1, 2]), torch.tensor([1, 3])) == 1
    assert ulp_distance(torch.tensor([]), torch.tensor([])) == 0


# ---------------------------------------------------------------------------------------------------------------


def test_verify_after_small_max_memory_merge(tmp_path):
    import streammerge

    base = ht.make_base(tmp_path / "b", hidden=1024, inter=4096, layers=2, vocab=256)
    ad = ht.make_adapter(tmp_path / "a", base, r=16, targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                               "up_proj", "down_proj"))
    out = tmp_path / "out"
    streammerge.merge(base, ad, out, max_memory="2MB")  # 128 KB blocks: 32 rows of down_proj instead of 256
    report = verify(base, ad, out)
    assert report.ok, report.problems()


def test_verify_with_the_merges_max_memory(capsys, tmp_path):
    """Until the merge is block-size independent, verify recomputes in the merge's blocks when told its
    --max-memory; `--max-memory X --verify` passes it on by itself."""
    base = ht.make_base(tmp_path / "b", hidden=1024, inter=4096, layers=2, vocab=256)
    ad = ht.make_adapter(tmp_path / "a", base, r=16, targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                               "up_proj", "down_proj"))
    out = tmp_path / "out"
    rc, o, err = ht.run_cli(["--base", base, "--adapter", ad, "--output", out, "--max-memory", "2MB", "--verify"],
                            capsys)
    assert rc == 0 and "Verify: OK" in o, err
    rc, o, err = ht.run_cli(["verify", "--base", base, "--adapter", ad, "--merged", out, "--max-memory", "2MB"],
                            capsys)
    assert rc == 0, err
    rc, o, err = ht.run_cli(["verify", "--base", base, "--adapter", ad, "--merged", out, "--max-memory", "x"],
                            capsys)
    assert rc == 2 and err.startswith("error: argument --max-memory"), err
