"""checkpoint.py: strict header parsing, index cross-checks, and zero-copy reads (files built in tmp_path)."""

from __future__ import annotations

import gc
import json
import os
import struct
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

from streammerge.errors import CheckpointError, MissingFileError
from streammerge.io.checkpoint import Checkpoint, open_checkpoint
from streammerge.io.formats import DTYPES, ITEMSIZE, TORCH_TO_ST
from streammerge.io.reader import TensorReader
from streammerge.io.safetensors import TensorInfo, read_header

# ------------------------------------------------------------------------------------------------------------------
# helpers


def raw_file(path: Path, header: dict, data: bytes, pad: bool = True) -> Path:
    """A safetensors-like file with an arbitrary (possibly invalid) header."""
    text = json.dumps(header, separators=(",", ":")).encode()
    if pad:
        text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


def sample_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "model.embed.weight": torch.randn(6, 4, generator=g).to(torch.bfloat16),
        "model.norm.weight": torch.randn(4, generator=g).to(torch.float16),
        "lm_head.weight": torch.randn(3, 2, 2, generator=g),
        "ids": torch.arange(5),
        "mask": torch.tensor([True, False, True]),
        "scale": torch.tensor(1.5),
        "empty": torch.zeros(0, 3, dtype=torch.float16),
    }


def single_model(root: Path, tensors: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    tensors = sample_tensors() if tensors is None else tensors
    root.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(root / "model.safetensors"), metadata={"format": "pt"})
    return tensors


def sharded_model(root: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    tensors = sample_tensors()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[:3], "model-00002-of-00002.safetensors": names[3:]}
    root.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    for file, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(root / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(keys, file))
    write_index(root, weight_map)
    return tensors, weight_map


def write_index(root: Path, weight_map: dict, extra: dict | None = None) -> None:
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map, **(extra or {})}
    (root / "model.safetensors.index.json").write_text(json.dumps(index))


# ------------------------------------------------------------------------------------------------------------------
# dtype tables


def test_dtype_tables_cover_safetensors_and_are_inverse():
    for name in ("BOOL", "U8", "I8", "I16", "U16", "I32", "U32", "I64", "U64", "F16", "BF16", "F32", "F64",
                 "F8_E4M3", "F8_E5M2", "F8_E8M0"):
        assert name in DTYPES
    assert all(TORCH_TO_ST[dt] == name for name, dt in DTYPES.items())
    assert ITEMSIZE["BF16"] == 2 and ITEMSIZE["F8_E4M3"] == 1 and ITEMSIZE["U64"] == 8 and ITEMSIZE["BOOL"] == 1


# ------------------------------------------------------------------------------------------------------------------
# read_header: valid files


def test_read_header_matches_safetensors(tmp_path):
    tensors = single_model(tmp_path)
    path = tmp_path / "model.safetensors"
    infos, metadata = read_header(path)
    assert metadata == {"format": "pt"}
    assert set(infos) == set(tensors)
    offsets = [i.offset for i in infos.values()]
    assert offsets == sorted(offsets), "tensors come in data-offset order"
    raw = path.read_bytes()
    for name, info in infos.items():
        t = tensors[name]
        assert info.path == path
        assert info.shape == tuple(t.shape)
        assert info.torch_dtype == t.dtype and info.dtype == TORCH_TO_ST[t.dtype]
        assert info.nbytes == t.numel() * t.element_size() == info.numel * info.itemsize
        # the absolute offset points at the tensor's bytes
        expected = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        assert raw[info.offset:info.offset + info.nbytes] == expected


def test_tensor_info_properties():
    p = Path("x")
    assert TensorInfo("a", "BF16", (4, 3), p, 8, 24).rows == 4
    assert TensorInfo("a", "BF16", (4, 3), p, 8, 24).row_nbytes == 6
    scalar = TensorInfo("s", "F32", (), p, 8, 4)
    assert scalar.rows == 1 and scalar.row_nbytes == 4 and scalar.numel == 1
    empty = TensorInfo("e", "F16", (0, 3), p, 8, 0)
    assert empty.rows == 0 and empty.numel == 0 and empty.row_nbytes == 6
    assert TensorInfo("v", "I64", (5,), p, 8, 40).row_nbytes == 8


def test_read_header_without_metadata_and_without_tensors(tmp_path):
    infos, md = read_header(raw_file(tmp_path / "a.safetensors", {}, b""))
    assert infos == {} and md == {}
    infos, md = read_header(raw_file(tmp_path / "b.safetensors", {"__metadata__": {"k": "v"}}, b""))
    assert md == {"k": "v"}


# ------------------------------------------------------------------------------------------------------------------
# read_header: every rule


GOOD = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}


def entry(**kw):
    e = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
    e.update(kw)
    return {k: v for k, v in e.items() if v is not ...}


@pytest.mark.parametrize(
    "header,data,needle",
    [
        ({"__metadata__": {"k": 1}, **GOOD}, b"\0" * 8, "__metadata__"),
        ({"__metadata__": ["x"], **GOOD}, b"\0" * 8, "__metadata__"),
        ({"a": entry(dtype=...)}, b"\0" * 8, "lacks dtype"),
        ({"a": entry(shape=...)}, b"\0" * 8, "lacks shape"),
        ({"a": entry(data_offsets=...)}, b"\0" * 8, "lacks data_offsets"),
        ({"a": "F32"}, b"\0" * 8, "not an object"),
        ({"a": entry(dtype=7)}, b"\0" * 8, "not a string"),
        ({"a": entry(dtype="F31")}, b"\0" * 8, "unknown dtype 'F31'"),
        ({"a": entry(dtype="F4", shape=[16])}, b"\0" * 8, "sub-byte"),
        ({"a": entry(shape="2")}, b"\0" * 8, "not a list of integers"),
        ({"a": entry(shape=[2.0])}, b"\0" * 8, "not a list of integers"),
        ({"a": entry(shape=[True, 2])}, b"\0" * 8, "not a list of integers"),
        ({"a": entry(shape=[-2, -1])}, b"\0" * 8, "negative"),
        ({"a": entry(shape=[2**40, 2**40])}, b"\0" * 8, "too large"),
        ({"a": entry(data_offsets=[0])}, b"\0" * 8, "not [begin, end]"),
        ({"a": entry(data_offsets=[0, "8"])}, b"\0" * 8, "not [begin, end]"),
        ({"a": entry(data_offsets=[8, 0])}, b"\0" * 8, "begin <= end"),
        ({"a": entry(data_offsets=[-8, 0])}, b"\0" * 8, "begin <= end"),
        ({"a": entry(data_offsets=[0, 4])}, b"\0" * 4, "needs 8"),
        ({"a": entry(), "b": entry(data_offsets=[4, 12])}, b"\0" * 12, "overlaps"),
        ({"a": entry(), "b": entry(data_offsets=[12, 20])}, b"\0" * 20, "gap of 4 bytes"),
        ({"a": entry(data_offsets=[4, 12])}, b"\0" * 12, "gap of 4 bytes"),
        (GOOD, b"\0" * 4, "truncated"),
        (GOOD, b"\0" * 12, "4 bytes after the last tensor"),
        ([1, 2], b"", "not a JSON object"),
    ],
)
def test_read_header_rejects(tmp_path, header, data, needle):
    path = raw_file(tmp_path / "bad.safetensors", header, data)
    with pytest.raises(CheckpointError) as err:
        read_header(path)
    msg = str(err.value)
    assert needle in msg
    assert str(path) in msg and "\n" not in msg


@pytest.mark.parametrize(
    "blob,needle",
    [
        (b"", "too short"),
        (b"\x01\x00\x00", "too short"),
        (struct.pack("<Q", 100), "exceeds the file size"),
        (struct.pack("<Q", 2**63) + b"{}", "100 MB"),
        (struct.pack("<Q", 4) + b"\xff\xfe{}", "not UTF-8"),
        (struct.pack("<Q", 8) + b"{not js}", "not valid JSON"),
        (struct.pack("<Q", 8) + b"[]      ", "not a JSON object"),
        (struct.pack("<Q", 16) + b'{"a":1,"a":2}   ', "twice"),
        (struct.pack("<Q", 8) + b"[" * 4 + b"]" * 4, "not a JSON object"),
    ],
)
def test_read_header_rejects_raw_bytes(tmp_path, blob, needle):
    path = tmp_path / "raw.safetensors"
    path.write_bytes(blob)
    with pytest.raises(CheckpointError, match=needle):
        read_header(path)


def test_read_header_deeply_nested_json(tmp_path):
    text = b"[" * 100_000 + b"]" * 100_000
    path = tmp_path / "deep.safetensors"
    path.write_bytes(struct.pack("<Q", len(text)) + text)
    with pytest.raises(CheckpointError):
        read_header(path)


def test_read_header_missing_file(tmp_path):
    with pytest.raises(MissingFileError, match="not found"):
        read_header(tmp_path / "nope.safetensors")
    with pytest.raises(CheckpointError, match="directory"):
        read_header(tmp_path)


def test_truncated_real_file_is_caught_before_reading(tmp_path):
    single_model(tmp_path)
    path = tmp_path / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:-1])
    with pytest.raises(CheckpointError, match="truncated"):
        read_header(path)


# ------------------------------------------------------------------------------------------------------------------
# fuzzing: every malformed input gives CheckpointError, and anything we accept safetensors accepts too


def _valid_file_bytes() -> bytes:
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "m.safetensors"
        save_file(sample_tensors(), str(p), metadata={"format": "pt"})
        return p.read_bytes()


VALID = _valid_file_bytes()
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _check(blob: bytes) -> None:
    """read_header either raises CheckpointError or returns what safetensors itself reads."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "f.safetensors"
        path.write_bytes(blob)
        try:
            infos, _ = read_header(path)
        except CheckpointError as exc:
            assert "\n" not in str(exc)
            return
        with safe_open(str(path), "pt") as f, TensorReader() as reader:
            assert set(f.keys()) == set(infos)
            for name, info in infos.items():
                ref = f.get_tensor(name)
                got = reader.tensor(info)
                assert got.shape == ref.shape and got.dtype == ref.dtype
                assert torch.equal(got.reshape(-1).view(torch.uint8), ref.reshape(-1).view(torch.uint8))


@FUZZ
@given(st.binary(max_size=300))
def test_fuzz_random_bytes(blob):
    _check(blob)


@FUZZ
@given(st.binary(max_size=200))
def test_fuzz_random_header_text(text):
    _check(struct.pack("<Q", len(text)) + text)


@FUZZ
@given(st.integers(0, len(VALID)))
def test_fuzz_truncate(n):
    _check(VALID[:n])


@FUZZ
@given(st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.integers(0, 255)), min_size=1, max_size=4))
def test_fuzz_flip_bytes(flips):
    header_end = 8 + struct.unpack("<Q", VALID[:8])[0]
    blob = bytearray(VALID)
    for i, v in flips:
        blob[i % header_end] = v  # mutate the length or the header text, where the checks live
    _check(bytes(blob))


_HEADER = json.loads(VALID[8:8 + struct.unpack("<Q", VALID[:8])[0]])
_NAMES = sorted(k for k in _HEADER if k != "__metadata__")
_VALUES = st.one_of(
    st.integers(-3, 300), st.sampled_from(["F32", "BF16", "I64", "U8", "F99", "", "F4"]),
    st.lists(st.integers(-2, 40), max_size=3), st.none(), st.booleans(), st.text(max_size=3),
)


@FUZZ
@given(
    st.lists(
        st.tuples(st.sampled_from(_NAMES), st.sampled_from(["dtype", "shape", "data_offsets", "begin", "end", "drop"]),
                  _VALUES),
        min_size=1, max_size=3,
    ),
    st.integers(-16, 16),
    st.booleans(),
)
def test_fuzz_mutated_header(mutations, data_delta, repad):
    header = json.loads(json.dumps(_HEADER))
    for name, field, value in mutations:
        if name not in header:
            continue
        e = header[name]
        if field == "drop":
            del header[name]
        elif field in ("begin", "end"):
            offsets = e.get("data_offsets")
            if isinstance(offsets, list) and len(offsets) == 2 and isinstance(value, int):
                offsets[field == "end"] = value
        elif field in ("dtype", "shape", "data_offsets"):
            e[field] = value
    text = json.dumps(header, separators=(",", ":")).encode()
    if repad:
        text += b" " * (-len(text) % 8)
    data = VALID[8 + struct.unpack("<Q", VALID[:8])[0]:]
    data = data[:len(data) + data_delta] if data_delta < 0 else data + b"\0" * data_delta
    _check(struct.pack("<Q", len(text)) + text + data)


# ------------------------------------------------------------------------------------------------------------------
# open_checkpoint


def test_open_single_file(tmp_path):
    tensors = single_model(tmp_path)
    ckpt = open_checkpoint(str(tmp_path))
    assert isinstance(ckpt, Checkpoint)
    assert ckpt.index_path is None and ckpt.files == (tmp_path / "model.safetensors",)
    assert set(ckpt.tensors) == set(tensors)


def test_open_sharded_order_and_paths(tmp_path):
    _tensors, weight_map = sharded_model(tmp_path)
    ckpt = open_checkpoint(tmp_path)
    assert ckpt.index_path == tmp_path / "model.safetensors.index.json"
    assert ckpt.files == (tmp_path / "model-00001-of-00002.safetensors", tmp_path / "model-00002-of-00002.safetensors")
    expected = []
    for f in ckpt.files:
        infos, _ = read_header(f)
        expected += list(infos)
    assert list(ckpt.tensors) == expected
    for name, info in ckpt.tensors.items():
        assert info.path.name == weight_map[name]


def test_open_sharded_in_subfolder(tmp_path):
    (tmp_path / "weights").mkdir()
    save_file({"a": torch.ones(2)}, str(tmp_path / "weights" / "s.safetensors"))
    write_index(tmp_path, {"a": "weights/s.safetensors"})
    assert open_checkpoint(tmp_path).tensors["a"].path == tmp_path / "weights" / "s.safetensors"


def test_hub_cache_layout_symlinks_into_blobs_are_accepted(tmp_path):
    repo = tmp_path / "models--org--name"
    snap = repo / "snapshots" / "abc123"
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    save_file({"a": torch.ones(2)}, str(repo / "blobs" / "deadbeef"))
    (repo / "blobs" / "idx").write_text(json.dumps({"weight_map": {"a": "model-00001-of-00001.safetensors"}}))
    (snap / "model-00001-of-00001.safetensors").symlink_to("../../blobs/deadbeef")
    (snap / "model.safetensors.index.json").symlink_to("../../blobs/idx")
    ckpt = open_checkpoint(snap)
    assert list(ckpt.tensors) == ["a"]


@pytest.mark.parametrize("value", ["/etc/passwd", "../outside.safetensors", "sub/../../outside.safetensors", "", "a\0b",
                                   7])
def test_index_paths_outside_root_are_refused(tmp_path, value):
    root = tmp_path / "model"
    root.mkdir()
    save_file({"a": torch.ones(2)}, str(tmp_path / "outside.safetensors"))
    write_index(root, {"a": value})
    with pytest.raises(CheckpointError) as err:
        open_checkpoint(root)
    assert "index" in str(err.value) and "\n" not in str(err.value)


def test_index_symlink_escaping_root_is_refused(tmp_path):
    root = tmp_path / "model"
    root.mkdir()
    save_file({"a": torch.ones(2)}, str(tmp_path / "outside.safetensors"))
    (root / "link.safetensors").symlink_to(tmp_path / "outside.safetensors")
    write_index(root, {"a": "link.safetensors"})
    with pytest.raises(CheckpointError, match="outside the model folder"):
        open_checkpoint(root)
    (root / "dirlink").symlink_to(tmp_path, target_is_directory=True)
    write_index(root, {"a": "dirlink/outside.safetensors"})
    with pytest.raises(CheckpointError, match="outside the model folder"):
        open_checkpoint(root)


def test_index_errors(tmp_path):
    _tensors, weight_map = sharded_model(tmp_path)
    first, second = sorted(set(weight_map.values()))
    idx = tmp_path / "model.safetensors.index.json"

    idx.write_text("{not json")
    with pytest.raises(CheckpointError, match="not a readable JSON"):
        open_checkpoint(tmp_path)
    idx.write_text(json.dumps({"metadata": {}}))
    with pytest.raises(CheckpointError, match="weight_map"):
        open_checkpoint(tmp_path)
    idx.write_text(json.dumps({"weight_map": []}))
    with pytest.raises(CheckpointError, match="weight_map"):
        open_checkpoint(tmp_path)
    idx.write_text(json.dumps({"weight_map": {}}))
    with pytest.raises(CheckpointError, match="lists no tensors"):
        open_checkpoint(tmp_path)

    # a listed tensor that the shard does not hold
    write_index(tmp_path, {**weight_map, "ghost": first})
    with pytest.raises(CheckpointError, match="'ghost' is listed for this shard but not in it"):
        open_checkpoint(tmp_path)
    # a tensor listed under the other shard
    moved = next(k for k, v in weight_map.items() if v == first)
    write_index(tmp_path, {**weight_map, moved: second})
    with pytest.raises(CheckpointError, match="disagree"):
        open_checkpoint(tmp_path)
    # a tensor in a shard header but not in the index
    write_index(tmp_path, {k: v for k, v in weight_map.items() if k != moved})
    with pytest.raises(CheckpointError, match=f"'{moved}' is in this shard but not in"):
        open_checkpoint(tmp_path)
    # a missing shard
    write_index(tmp_path, {**weight_map, "x": "model-00003-of-00003.safetensors"})
    with pytest.raises(MissingFileError, match="missing"):
        open_checkpoint(tmp_path)


def test_same_tensor_in_two_shards(tmp_path):
    save_file({"a": torch.ones(2), "b": torch.ones(1)}, str(tmp_path / "s1.safetensors"))
    save_file({"a": torch.ones(2)}, str(tmp_path / "s2.safetensors"))
    write_index(tmp_path, {"a": "s1.safetensors", "b": "s1.safetensors"})
    # s2 is not listed so it is not read; list it for another tensor to force the duplicate
    save_file({"a": torch.ones(2), "c": torch.ones(1)}, str(tmp_path / "s2.safetensors"))
    write_index(tmp_path, {"a": "s1.safetensors", "b": "s1.safetensors", "c": "s2.safetensors"})
    with pytest.raises(CheckpointError, match="'a' is also in s1.safetensors"):
        open_checkpoint(tmp_path)


def test_corrupt_shard_names_the_shard(tmp_path):
    sharded_model(tmp_path)
    shard = tmp_path / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-3])
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors.*truncated"):
        open_checkpoint(tmp_path)


def test_missing_root_and_weights(tmp_path):
    with pytest.raises(MissingFileError, match="does not exist"):
        open_checkpoint(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(MissingFileError, match="not a folder"):
        open_checkpoint(tmp_path / "file")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(MissingFileError, match="no model.safetensors"):
        open_checkpoint(empty)
    (empty / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(MissingFileError, match="safetensors only.*convert"):
        open_checkpoint(empty)
    other = tmp_path / "other"
    other.mkdir()
    save_file({"a": torch.ones(1)}, str(other / "consolidated.safetensors"))
    with pytest.raises(MissingFileError, match="consolidated.safetensors"):
        open_checkpoint(other)


# ------------------------------------------------------------------------------------------------------------------
# TensorReader


def test_reader_tensor_and_rows_match(tmp_path):
    tensors = single_model(tmp_path)
    ckpt = open_checkpoint(tmp_path)
    with TensorReader() as reader:
        for name, info in ckpt.tensors.items():
            whole = reader.tensor(info)
            assert whole.dtype == tensors[name].dtype and torch.equal(whole, tensors[name])
            if info.shape:
                for a, b in [(0, info.rows), (0, 0), (min(1, info.rows), info.rows)]:
                    part = reader.rows(info, a, b)
                    assert part.shape == (b - a, *info.shape[1:])
                    assert torch.equal(part, tensors[name][a:b])
            else:
                assert torch.equal(reader.rows(info, 0, 1), tensors[name])
        with pytest.raises(ValueError):
            reader.rows(ckpt.tensors["model.embed.weight"], 2, 99)


def test_reader_views_are_zero_copy_and_share_one_mapping(tmp_path):
    single_model(tmp_path)
    info = open_checkpoint(tmp_path).tensors["model.embed.weight"]
    other = open_checkpoint(tmp_path).tensors["lm_head.weight"]
    with TensorReader() as reader:
        a = reader.rows(info, 0, 2)
        b = reader.rows(info, 2, 6)
        c = reader.tensor(other)
        assert b.data_ptr() - a.data_ptr() == 2 * info.row_nbytes
        assert c.data_ptr() - a.data_ptr() == other.offset - info.offset
        assert len(reader._maps) == 1


@pytest.mark.parametrize("st_dtype", sorted(DTYPES))
def test_reader_every_dtype(tmp_path, st_dtype):
    dt = DTYPES[st_dtype]
    # 32 varied bytes viewed as 2 rows of `dt` (bools must stay 0/1 to be valid)
    raw = torch.tensor([i % 2 if dt == torch.bool else 7 * i + 1 for i in range(32)], dtype=torch.uint8)
    t = raw.view(dt).reshape(2, -1)
    save_file({"t": t, "s": t.reshape(-1)[0].clone(), "e": t[:0]}, str(tmp_path / "m.safetensors"))
    infos, _ = read_header(tmp_path / "m.safetensors")
    with TensorReader() as reader:
        for name, ref in (("t", t), ("s", t.reshape(-1)[0]), ("e", t[:0])):
            got = reader.tensor(infos[name])
            assert got.dtype == dt and got.shape == ref.shape
            assert torch.equal(got.reshape(-1).view(torch.uint8), ref.reshape(-1).view(torch.uint8))


def test_reader_release_and_reuse(tmp_path):
    tensors = single_model(tmp_path)
    info = open_checkpoint(tmp_path).tensors["model.embed.weight"]
    with TensorReader() as reader:
        view = reader.tensor(info)
        reader.release(info)
        # private pages were never written, so dropping them just re-reads the file
        assert torch.equal(view, tensors["model.embed.weight"])
        assert torch.equal(reader.tensor(info), tensors["model.embed.weight"])
        reader.release(TensorInfo("e", "F16", (0, 3), info.path, info.offset, 0))


def test_views_survive_reader_close(tmp_path):
    tensors = single_model(tmp_path)
    info = open_checkpoint(tmp_path).tensors["lm_head.weight"]
    reader = TensorReader()
    view = reader.tensor(info)
    reader.close()
    gc.collect()
    assert torch.equal(view, tensors["lm_head.weight"])


def test_reader_fd_reads_raw_bytes(tmp_path):
    single_model(tmp_path)
    info = open_checkpoint(tmp_path).tensors["ids"]
    with TensorReader() as reader:
        fd = reader.fd(info.path)
        assert reader.fd(info.path) == fd
        assert os.pread(fd, info.nbytes, info.offset) == torch.arange(5).numpy().tobytes()
    with pytest.raises(OSError):
        os.fstat(fd)


def test_reader_file_truncated_after_header_is_caught(tmp_path):
    single_model(tmp_path)
    ckpt = open_checkpoint(tmp_path)
    path = tmp_path / "model.safetensors"
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    last = max(ckpt.tensors.values(), key=lambda i: i.offset + i.nbytes)
    with TensorReader() as reader, pytest.raises(CheckpointError, match="changed after its header"):
        reader.tensor(last)


@pytest.mark.skipif(not hasattr(__import__("mmap"), "MADV_DONTNEED"), reason="needs madvise")
def test_release_rows_returns_mapped_pages(tmp_path):
    psutil = pytest.importorskip("psutil")
    t = torch.ones(64, 1 << 18, dtype=torch.uint8)  # 16 MiB
    save_file({"t": t}, str(tmp_path / "m.safetensors"))
    info = read_header(tmp_path / "m.safetensors")[0]["t"]
    proc = psutil.Process()
    with TensorReader() as reader:
        before = proc.memory_info().rss
        for a in range(0, 64, 16):
            assert int(reader.rows(info, a, a + 16).sum()) == 16 << 18  # touch every page
        touched = proc.memory_info().rss
        for a in range(0, 64, 16):
            reader.release(info, a, a + 16)  # block by block, as the merge loop does
        released = proc.memory_info().rss
        assert touched - before > 8 << 20
        assert touched - released > 8 << 20
        assert int(reader.rows(info, 3, 5).sum()) == 2 << 18  # still readable
