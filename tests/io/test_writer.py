"""writer.py: byte-identical to safetensors.save_file, streamed in chunks, with a strict protocol."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

import streammerge.io.writer as writer_mod
from streammerge.errors import OutputError, StreamMergeError
from streammerge.io.checkpoint import open_checkpoint
from streammerge.io.formats import DTYPES, TORCH_TO_ST
from streammerge.io.safetensors import read_header
from streammerge.io.sharding import PlannedTensor, header_bytes, plan_shards, shard_file_names, write_index
from streammerge.io.writer import ShardWriter, WriterStateError
from streammerge.options import parse_size


def mixed_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        "b.weight": torch.randn(7, 5, generator=g).to(torch.bfloat16),
        "a.weight": torch.randn(3, 4, generator=g).to(torch.bfloat16),
        "h.half": torch.randn(9, generator=g).to(torch.float16),
        "f.full": torch.randn(2, 3, 4, generator=g),
        "ids": torch.arange(11),
        "mask": torch.rand(6, generator=g) > 0.5,
        "scalar": torch.tensor(3.25),
        "empty": torch.zeros(0, 4, dtype=torch.float32),
        "empty_tail": torch.zeros(5, 0, dtype=torch.bfloat16),
        "z.f8": torch.randn(4, 2, generator=g).to(torch.float8_e4m3fn),
        "ü.unicode": torch.ones(2, dtype=torch.int32),
    }


def planned(tensors: dict[str, torch.Tensor]) -> list[PlannedTensor]:
    return [PlannedTensor(k, TORCH_TO_ST[v.dtype], tuple(v.shape)) for k, v in tensors.items()]


def write_streamed(path: Path, tensors: dict[str, torch.Tensor], chunk_rows: int = 2, **kw) -> list[PlannedTensor]:
    """Write tensors in row chunks (alternating tensors and bytes-like inputs) in the writer's order."""
    with ShardWriter(path, planned(tensors), **kw) as w:
        for i, p in enumerate(w.order):
            t = tensors[p.name]
            if t.dim() == 0:
                w.write(p.name, t)
                continue
            for r in range(0, t.shape[0], chunk_rows):
                block = t[r:r + chunk_rows]
                if i % 3 == 1:  # also exercise bytes-like inputs
                    block = memoryview(bytearray(block.contiguous().reshape(-1).view(torch.uint8).numpy()))
                w.write(p.name, block)
        return w.order


# ------------------------------------------------------------------------------------------------------------------
# byte-for-byte equality with safetensors


@pytest.mark.parametrize("metadata", [{"format": "pt"}, None, {}])
def test_header_and_file_match_save_file(tmp_path, metadata):
    tensors = mixed_tensors()
    ref = tmp_path / "ref.safetensors"
    save_file(tensors, str(ref), metadata=metadata)
    ours = tmp_path / "ours.safetensors"
    header, order = header_bytes(planned(tensors), metadata)
    assert ref.read_bytes()[:len(header)] == header
    write_streamed(ours, tensors, metadata=metadata)
    assert ours.read_bytes() == ref.read_bytes()
    # the order is the data order of the reference file
    infos, _ = read_header(ref)
    assert [p.name for p in order] == list(infos)


def test_safe_open_loads_our_file(tmp_path):
    tensors = mixed_tensors()
    path = tmp_path / "m.safetensors"
    write_streamed(path, tensors, chunk_rows=3)
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert set(f.keys()) == set(tensors)
        for k, v in tensors.items():
            got = f.get_tensor(k)
            assert got.dtype == v.dtype and got.shape == v.shape
            assert torch.equal(got.view(torch.uint8), v.view(torch.uint8)) if v.dim() else torch.equal(got, v)
    assert read_header(path)[0].keys() == tensors.keys()


def test_default_metadata_is_format_pt():
    h1, _ = header_bytes([PlannedTensor("a", "F32", (1,))])
    assert b'"__metadata__":{"format":"pt"}' in h1


def test_empty_shard_with_empty_metadata_is_valid(tmp_path):
    with ShardWriter(tmp_path / "e.safetensors", [], metadata={}):
        pass
    assert read_header(tmp_path / "e.safetensors") == ({}, {})
    with safe_open(str(tmp_path / "e.safetensors"), "pt") as f:
        assert list(f.keys()) == []


def test_empty_shard_matches_save_file(tmp_path):
    save_file({}, str(tmp_path / "ref.safetensors"))
    with ShardWriter(tmp_path / "ours.safetensors", [], metadata=None):
        pass
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()


_NAME = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=1, max_size=6).filter(
    lambda s: s != "__metadata__")
_DT = st.sampled_from(["F32", "BF16", "F16", "I64", "I32", "U8", "BOOL", "F64", "I8", "F8_E5M2", "U16"])


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(_NAME, st.tuples(_DT, st.lists(st.integers(0, 3), max_size=3)), max_size=6),
       st.one_of(st.none(), st.dictionaries(_NAME, st.text(max_size=5), max_size=1)))
def test_header_matches_save_file_property(tmp_path_factory, specs, metadata):
    """Any names (unicode, quotes, control chars), dtypes and shapes: same header bytes as safetensors."""
    # safetensors 0.8 writes invalid JSON (`{},"__metadata__":{}}`) for no tensors + empty metadata: not a reference
    assume(specs or metadata != {})
    tensors = {n: torch.zeros(shape, dtype=DTYPES[dt]) for n, (dt, shape) in specs.items()}
    path = tmp_path_factory.mktemp("h") / "ref.safetensors"
    save_file(tensors, str(path), metadata=metadata)
    header, _ = header_bytes(planned(tensors), metadata)
    assert path.read_bytes()[:len(header)] == header
    assert len(header) % 8 == 0


def test_multi_key_metadata_round_trips():
    # safetensors orders metadata keys by hash, so only the parsed content can be compared
    header, _ = header_bytes([], {"b": "1", "a": "2"})
    assert json.loads(header[8:])["__metadata__"] == {"b": "1", "a": "2"}


def test_header_bytes_rejects_bad_plans():
    with pytest.raises(ValueError, match="twice"):
        header_bytes([PlannedTensor("a", "F32", (1,)), PlannedTensor("a", "F16", (1,))])
    with pytest.raises(ValueError, match="dtype"):
        header_bytes([PlannedTensor("a", "F4", (2,))])
    with pytest.raises(ValueError, match="shape"):
        header_bytes([PlannedTensor("a", "F32", (-1,))])
    with pytest.raises(ValueError, match="__metadata__"):
        header_bytes([PlannedTensor("__metadata__", "F32", (1,))])
    with pytest.raises(ValueError, match="metadata"):
        header_bytes([], {"a": 1})


# ------------------------------------------------------------------------------------------------------------------
# copy_from


def test_copy_from_is_exact(tmp_path):
    tensors = mixed_tensors()
    src = tmp_path / "src.safetensors"
    save_file(tensors, str(src))
    infos, _ = read_header(src)
    out = tmp_path / "out.safetensors"
    fd = os.open(src, os.O_RDONLY)
    try:
        with ShardWriter(out, planned(tensors), metadata=None) as w:
            for i, p in enumerate(w.order):
                if i % 2:
                    w.copy_from(p.name, fd, infos[p.name].offset, infos[p.name].nbytes)
                else:
                    w.write(p.name, tensors[p.name])
    finally:
        os.close(fd)
    assert out.read_bytes() == src.read_bytes()


@pytest.mark.parametrize("disable", [("copy_file_range",), ("copy_file_range", "sendfile")])
def test_copy_from_fallbacks(tmp_path, monkeypatch, disable):
    src = tmp_path / "src.bin"
    payload = os.urandom(3 * 1024 + 5)
    src.write_bytes(b"xx" + payload)
    for name in disable:
        def unsupported(*a, **k):
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        monkeypatch.setattr(os, name, unsupported)
    monkeypatch.setattr(writer_mod, "COPY_CHUNK", 1000)
    out = tmp_path / "o.safetensors"
    fd = os.open(src, os.O_RDONLY)
    try:
        with ShardWriter(out, [PlannedTensor("p", "U8", (len(payload),))], metadata=None) as w:
            w.copy_from("p", fd, 2, len(payload))
    finally:
        os.close(fd)
    infos, _ = read_header(out)
    assert out.read_bytes()[infos["p"].offset:] == payload


def test_copy_from_short_source(tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(b"abc")
    fd = os.open(src, os.O_RDONLY)
    try:
        with pytest.raises(StreamMergeError, match="ended at byte 3"):
            with ShardWriter(tmp_path / "o.safetensors", [PlannedTensor("p", "U8", (8,))]) as w:
                w.copy_from("p", fd, 0, 8)
    finally:
        os.close(fd)
    assert not (tmp_path / "o.safetensors").exists()


# ------------------------------------------------------------------------------------------------------------------
# the protocol


def small_plan():
    return [PlannedTensor("w", "F32", (2, 2)), PlannedTensor("e", "F32", (0,)), PlannedTensor("v", "F32", (3,))]


def test_out_of_order_unknown_and_repeated(tmp_path):
    with ShardWriter(tmp_path / "s.safetensors", small_plan()) as w:
        assert [p.name for p in w.order] == ["e", "v", "w"]
        with pytest.raises(WriterStateError, match="'w' written out of order: 'v' still needs 12 of 12 bytes"):
            w.write("w", torch.zeros(2, 2))
        with pytest.raises(WriterStateError, match="not planned"):
            w.write("nope", torch.zeros(1))
        w.write("v", torch.zeros(1))
        with pytest.raises(WriterStateError, match="out of order"):
            w.write("w", torch.zeros(2))
        w.write("v", torch.zeros(2))
        w.write("w", torch.zeros(1, 2))
        with pytest.raises(WriterStateError, match="already written"):
            w.write("v", torch.zeros(1))
        with pytest.raises(WriterStateError, match="got 20 bytes but is planned as F32\\[2, 2\\] = 16 bytes"):
            w.write("w", torch.zeros(3))
        with pytest.raises(WriterStateError, match="planned as F32 but got torch.float16"):
            w.write("w", torch.zeros(2, dtype=torch.float16))
        w.write("w", torch.zeros(1, 2))
    assert read_header(tmp_path / "s.safetensors")[0].keys() == {"e", "v", "w"}


def test_errors_are_value_errors_and_streammerge_errors():
    assert issubclass(WriterStateError, StreamMergeError) and issubclass(WriterStateError, ValueError)


def test_missing_bytes_on_close_deletes_file(tmp_path):
    path = tmp_path / "s.safetensors"
    w = ShardWriter(path, small_plan())
    w.write("v", torch.zeros(3))
    w.write("w", torch.zeros(3))
    with pytest.raises(WriterStateError, match="'w' got 12 of its 16 bytes"):
        w.close()
    assert not path.exists()
    with pytest.raises(WriterStateError, match="aborted"):
        w.write("w", torch.zeros(1))


def test_untouched_tensor_on_close(tmp_path):
    with pytest.raises(WriterStateError, match="'v' got 0 of its 12 bytes"):
        with ShardWriter(tmp_path / "s.safetensors", small_plan()):
            pass
    assert not (tmp_path / "s.safetensors").exists()


def test_write_after_close_and_double_close(tmp_path):
    w = ShardWriter(tmp_path / "s.safetensors", [PlannedTensor("a", "I64", ())])
    w.write("a", torch.tensor(5))
    w.close()
    w.close()  # idempotent
    with pytest.raises(WriterStateError, match="closed"):
        w.write("a", torch.tensor(5))
    w.abort()  # a finished file is kept
    with safe_open(str(tmp_path / "s.safetensors"), "pt") as f:
        assert f.get_tensor("a").item() == 5


def test_exception_in_body_aborts(tmp_path):
    path = tmp_path / "s.safetensors"
    with pytest.raises(RuntimeError):
        with ShardWriter(path, small_plan()) as w:
            w.write("v", torch.zeros(3))
            raise RuntimeError("boom")
    assert not path.exists()


def test_large_writes_bypass_the_buffer(tmp_path, monkeypatch):
    monkeypatch.setattr(writer_mod, "BUFFER_SIZE", 64)
    sizes = []
    real_write = os.write

    def spy(fd, data):
        sizes.append(len(data))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", spy)
    big = torch.arange(1000, dtype=torch.float32)
    path = tmp_path / "s.safetensors"
    with ShardWriter(path, [PlannedTensor("big", "F32", (1000,)), PlannedTensor("s", "U8", (3,))]) as w:
        w.write("big", big)
        w.write("s", torch.tensor([1, 2, 3], dtype=torch.uint8))
    assert 4000 in sizes and max(sizes) == 4000
    with safe_open(str(path), "pt") as f:
        assert torch.equal(f.get_tensor("big"), big)


def test_partial_os_writes_are_completed(tmp_path, monkeypatch):
    real_write = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: real_write(fd, bytes(data[:7])))
    tensors = mixed_tensors()
    path = tmp_path / "s.safetensors"
    write_streamed(path, tensors)
    ref = tmp_path / "ref.safetensors"
    save_file(tensors, str(ref), metadata={"format": "pt"})
    assert path.read_bytes() == ref.read_bytes()


def test_non_contiguous_tensor_is_written_in_logical_order(tmp_path):
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    with ShardWriter(tmp_path / "s.safetensors", [PlannedTensor("t", "F32", (4, 3))]) as w:
        w.write("t", t.T)
    with safe_open(str(tmp_path / "s.safetensors"), "pt") as f:
        assert torch.equal(f.get_tensor("t"), t.T)


# ------------------------------------------------------------------------------------------------------------------
# OS errors


@pytest.mark.parametrize(
    "code,needle",
    [
        (errno.ENOSPC, "no space left on device while writing .*s.safetensors: free at least .* GB or choose another"),
        (errno.EDQUOT, "quota"),
        (errno.EROFS, "read-only"),
        (errno.EACCES, "permission denied"),
        (errno.EIO, "cannot write"),
    ],
)
def test_write_errors_become_output_errors(tmp_path, monkeypatch, code, needle):
    path = tmp_path / "s.safetensors"
    w = ShardWriter(path, [PlannedTensor("t", "F32", (1 << 20,))])

    def failing(fd, data):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "write", failing)
    with pytest.raises(OutputError, match=needle) as err:
        with w:
            w.write("t", torch.zeros(1 << 20))
    assert err.value.errno == code and "\n" not in str(err.value)
    assert not path.exists()
    with pytest.raises(WriterStateError):
        w.write("t", torch.zeros(1))


def test_enospc_on_fsync_and_copy(tmp_path, monkeypatch):
    path = tmp_path / "s.safetensors"
    w = ShardWriter(path, [PlannedTensor("t", "U8", (4,))])
    w.write("t", b"abcd")
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full")))
    with pytest.raises(OutputError, match="no space left"):
        w.close()
    w.abort()
    assert not path.exists()
    monkeypatch.undo()

    src = tmp_path / "src"
    src.write_bytes(b"abcd")
    monkeypatch.setattr(os, "copy_file_range",
                        lambda *a: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full")), raising=False)
    fd = os.open(src, os.O_RDONLY)
    try:
        with pytest.raises(OutputError, match="no space left"), ShardWriter(path, [PlannedTensor("t", "U8", (4,))]) as w:
            w.copy_from("t", fd, 0, 4)
    finally:
        os.close(fd)
    assert not path.exists()


def test_open_errors(tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(OutputError, match="is a directory"):
        ShardWriter(tmp_path / "d", [])
    with pytest.raises(OutputError):
        ShardWriter(tmp_path / "missing" / "x.safetensors", [])


# ------------------------------------------------------------------------------------------------------------------
# sizes, shard plans, names, index


@pytest.mark.parametrize(
    "text,value",
    [("5GB", 5 * 10**9), ("500MB", 500 * 10**6), ("2GiB", 2 * 2**30), ("1000", 1000), (1000, 1000),
     ("10KB", 10_000), ("3kib", 3072), ("1.5GB", 1_500_000_000), (" 4 MiB ", 4 * 2**20), ("7B", 7), ("1TB", 10**12)],
)
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "GB", "5XB", "-5GB", "5 G B", "0", 0, -3, "1e9", "five", True, "5GBs"])
def test_parse_size_rejects(text):
    with pytest.raises(ValueError, match="size"):
        parse_size(text)


def P(name: str, n: int) -> PlannedTensor:
    return PlannedTensor(name, "U8", (n,))


def test_plan_shards_greedy():
    ts = [P("a", 4), P("b", 4), P("c", 3), P("d", 10), P("e", 1), P("f", 0)]
    shards = plan_shards(ts, 8)
    assert [[t.name for t in s] for s in shards] == [["a", "b"], ["c"], ["d"], ["e", "f"]]
    assert [[t.name for t in s] for s in plan_shards(ts, 100)] == [["a", "b", "c", "d", "e", "f"]]
    assert plan_shards([], 10) == [[]]
    assert [len(s) for s in plan_shards([P("x", 50), P("y", 50)], 10)] == [1, 1]
    with pytest.raises(ValueError):
        plan_shards(ts, 0)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 40), max_size=20), st.integers(1, 50))
def test_plan_shards_properties(sizes, limit):
    ts = [P(f"t{i}", n) for i, n in enumerate(sizes)]
    shards = plan_shards(ts, limit)
    assert [t for s in shards for t in s] == ts
    assert shards and (all(shards) or shards == [[]])
    for s in shards:
        assert sum(t.nbytes for t in s) <= limit or len(s) == 1  # only a lone oversized tensor breaks the limit
    # greedy: the first tensor of each next shard would not have fit
    for s, nxt in zip(shards, shards[1:]):
        assert sum(t.nbytes for t in s) + nxt[0].nbytes > limit


def test_shard_file_names():
    assert shard_file_names(1) == ["model.safetensors"]
    assert shard_file_names(3) == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert shard_file_names(12)[-1] == "model-00012-of-00012.safetensors"
    with pytest.raises(ValueError):
        shard_file_names(0)


def test_write_index_and_open_sharded_output(tmp_path):
    tensors = mixed_tensors()
    plan = planned(tensors)
    shards = plan_shards(plan, 64)
    names = shard_file_names(len(shards))
    for shard, name in zip(shards, names):
        write_streamed(tmp_path / name, {t.name: tensors[t.name] for t in shard})
    write_index(tmp_path / "model.safetensors.index.json", shards, names, {"total_parameters": 7})
    text = (tmp_path / "model.safetensors.index.json").read_text()
    index = json.loads(text)
    assert index["metadata"] == {"total_parameters": 7, "total_size": sum(t.nbytes for t in plan)}
    assert list(index["weight_map"]) == sorted(tensors)
    assert text == json.dumps(index, indent=2, sort_keys=True) + "\n"
    ckpt = open_checkpoint(tmp_path)
    assert set(ckpt.tensors) == set(tensors) and len(ckpt.files) == len(shards) > 1
    with pytest.raises(ValueError):
        write_index(tmp_path / "i.json", shards, names[:-1])
    with pytest.raises(OutputError):
        write_index(tmp_path / "nodir" / "i.json", shards, names)


# ----------------------------------------------------------------------------------------------------------------
# any_order: tensors in any order, each at its planned offset


def _planned(tensors: dict[str, torch.Tensor]) -> list[PlannedTensor]:
    return [PlannedTensor(n, TORCH_TO_ST[t.dtype], tuple(t.shape)) for n, t in tensors.items()]


def test_any_order_writes_the_bytes_save_file_writes(tmp_path):
    tensors = mixed_tensors()
    ref = tmp_path / "ref.safetensors"
    save_file(tensors, str(ref), metadata={"format": "pt"})
    out = tmp_path / "out.safetensors"
    with ShardWriter(out, _planned(tensors), any_order=True) as w:
        for t in reversed(w.order):  # the file's last tensor first
            rows = tensors[t.name].reshape(-1)
            half = rows.numel() // 2
            w.write(t.name, rows[:half])
            w.write(t.name, rows[half:])
    assert out.read_bytes() == ref.read_bytes()


def test_any_order_raw_copies_land_at_their_offsets(tmp_path):
    tensors = mixed_tensors()
    ref = tmp_path / "ref.safetensors"
    save_file(tensors, str(ref), metadata={"format": "pt"})
    infos, _ = read_header(ref)
    out = tmp_path / "out.safetensors"
    fd = os.open(ref, os.O_RDONLY)
    try:
        with ShardWriter(out, _planned(tensors), any_order=True) as w:
            for t in sorted(w.order, key=lambda t: t.name, reverse=True):
                w.copy_from(t.name, fd, infos[t.name].offset, infos[t.name].nbytes)
    finally:
        os.close(fd)
    assert out.read_bytes() == ref.read_bytes()


def test_any_order_still_refuses_a_missing_or_extra_byte(tmp_path):
    tensors = mixed_tensors()
    name = next(iter(tensors))
    w = ShardWriter(tmp_path / "a.safetensors", _planned(tensors), any_order=True)
    with pytest.raises(WriterStateError, match="is not planned"):
        w.write("nope", torch.zeros(1))
    w.write(name, tensors[name])
    with pytest.raises(WriterStateError, match="bytes but is planned as"):
        w.write(name, tensors[name].reshape(-1)[:1])
    with pytest.raises(WriterStateError, match="when the shard was closed"):
        w.close()
    assert not (tmp_path / "a.safetensors").exists()
