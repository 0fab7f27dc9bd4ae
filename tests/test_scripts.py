"""scripts/make_synthetic_model.py and scripts/bench.py: the synthetic model is what transformers and PEFT accept,
and bench's memory sampler sees anonymous memory of a child process."""

from __future__ import annotations

import importlib.util
import json
import math
import struct
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = REPO / "scripts"


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"_script_{name}", SCRIPTS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses need the module registered
    spec.loader.exec_module(mod)
    return mod


def make_tiny(out: Path, *extra: str) -> Path:
    r = subprocess.run([sys.executable, str(SCRIPTS / "make_synthetic_model.py"), "--preset", "tiny", "--out", str(out), *extra],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "adapter:" in r.stdout and "base:" in r.stdout
    return out


def st_header(path: Path) -> tuple[dict, int]:
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return json.loads(f.read(n)), 8 + n


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny(tmp_path_factory.mktemp("synthetic") / "tiny")


@pytest.fixture(scope="module")
def tiny_sharded(tmp_path_factory) -> Path:
    return make_tiny(tmp_path_factory.mktemp("synthetic") / "tiny-sharded", "--max-shard-size", "50KB", "--seed", "3")


def test_tiny_layout(tiny):
    base, adapter = tiny / "base", tiny / "adapter"
    for f in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json"):
        assert (base / f).is_file(), f
    assert not (base / "model.safetensors.index.json").exists()
    header, _ = st_header(base / "model.safetensors")
    assert header["__metadata__"] == {"format": "pt"}
    assert "lm_head.weight" not in header  # tied
    assert header["model.layers.1.self_attn.q_norm.weight"]["shape"] == [16]
    assert header["model.layers.0.self_attn.k_proj.weight"]["shape"] == [32, 64]
    assert all(v["dtype"] == "BF16" for k, v in header.items() if k != "__metadata__")
    cfg = json.loads((base / "config.json").read_text())
    assert cfg["dtype"] == cfg["torch_dtype"] == "bfloat16" and cfg["model_type"] == "qwen3"
    aheader, _ = st_header(adapter / "adapter_model.safetensors")
    assert aheader["__metadata__"] == {"format": "pt"}
    a0 = aheader["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    assert (a0["dtype"], a0["shape"]) == ("F32", [16, 64])
    assert aheader["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"]["shape"] == [64, 16]
    assert len(aheader) - 1 == 2 * 7 * 2


def test_tiny_loads_in_transformers_and_peft(tiny):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    base, adapter = tiny / "base", tiny / "adapter"

    model, info = transformers.AutoModelForCausalLM.from_pretrained(base, output_loading_info=True)
    assert model.dtype == torch.bfloat16
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    tok = transformers.AutoTokenizer.from_pretrained(base)
    assert 256 < len(tok) <= model.config.vocab_size and tok.eos_token == "<|endoftext|>"
    batch = tok("merge the adapter into the model", return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape[-1] == 512 and torch.isfinite(logits).all()
    w = model.state_dict()
    assert 0 < w["model.layers.0.mlp.up_proj.weight"].abs().max() <= 0.1
    assert (w["model.norm.weight"].float() - 1).abs().max() < 0.06

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm = peft.PeftModel.from_pretrained(model, adapter)
    bad = [str(c.message) for c in caught if "key" in str(c.message).lower()]
    assert not bad, bad
    res = pm.load_adapter(adapter, adapter_name="again")  # the load result of the same file, inspected
    assert not res.missing_keys or all("lora" not in k for k in res.missing_keys), res.missing_keys
    assert not res.unexpected_keys, res.unexpected_keys
    bs = {n: p for n, p in pm.named_parameters() if "lora_B.default" in n}
    assert len(bs) == 14 and all(p.abs().max() > 0 for p in bs.values())
    with torch.no_grad():
        out = pm(**batch).logits
    assert not torch.equal(out, logits)  # the adapter changes the output


def test_configs_match_the_libraries(tiny):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    cfg = json.loads((tiny / "base" / "config.json").read_text())
    ref = transformers.Qwen3Config.from_pretrained(tiny / "base").to_diff_dict()
    diff = {k for k in set(cfg) | set(ref) if cfg.get(k) != ref.get(k)}
    assert diff <= {"torch_dtype"}, {k: (cfg.get(k), ref.get(k)) for k in diff}

    acfg = json.loads((tiny / "adapter" / "adapter_config.json").read_text())
    lc = peft.LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                         "up_proj", "down_proj"], task_type="CAUSAL_LM", inference_mode=True,
                         base_model_name_or_path=acfg["base_model_name_or_path"]).to_dict()
    lc = {k: sorted(v) if isinstance(v, set) else v for k, v in lc.items()}
    missing = set(lc) - set(acfg)
    assert not missing, f"LoraConfig fields the hand-written adapter_config lacks: {missing}"
    assert {k: v for k, v in acfg.items() if k in lc} == lc


def test_sharded_index_is_consistent(tiny_sharded):
    base = tiny_sharded / "base"
    index = json.loads((base / "model.safetensors.index.json").read_text())
    shards = sorted(base.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1 and all(s.name.endswith(f"-of-{len(shards):05d}.safetensors") for s in shards)
    assert not (base / "model.safetensors").exists()
    seen, data_bytes = {}, 0
    for s in shards:
        header, start = st_header(s)
        end = 0
        for k, v in header.items():
            if k == "__metadata__":
                continue
            seen[k] = s.name
            b, e = v["data_offsets"]
            assert e - b == 2 * max(1, math.prod(v["shape"]))
            end = max(end, e)
        assert s.stat().st_size == start + end  # no gap, nothing after the data
        data_bytes += end
    assert index["weight_map"] == seen
    assert index["metadata"]["total_size"] == data_bytes
    assert set(index["weight_map"].values()) == {s.name for s in shards}

    transformers = pytest.importorskip("transformers")
    _, info = transformers.AutoModelForCausalLM.from_pretrained(base, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info


def test_seed_is_deterministic(tiny, tmp_path):
    other = make_tiny(tmp_path / "again")
    for rel in ("base/model.safetensors", "adapter/adapter_model.safetensors", "base/tokenizer.json"):
        assert (tiny / rel).read_bytes() == (other / rel).read_bytes(), rel


def test_memory_sampler_sees_anonymous_memory_of_a_child():
    bench = load_script("bench")
    code = "b = bytearray(200_000_000); import time; time.sleep(0.5)"
    r = bench.run_measured([sys.executable, "-c", code])
    assert r.ok, r.stderr
    assert r.peak_anon >= 150e6, r
    assert r.peak_rss >= r.peak_anon
    # descendants count too: the same allocation one process further down
    r2 = bench.run_measured(["sh", "-c", f'{sys.executable} -c "{code}"; true'])
    assert r2.ok and r2.peak_anon >= 150e6, r2


def test_memory_sampler_ignores_file_backed_mmap(tmp_path):
    bench = load_script("bench")
    f = tmp_path / "blob"
    f.write_bytes(b"\1" * 100_000_000)
    code = (f"import mmap, time; fh = open({str(f)!r}, 'rb'); m = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ); "
            "s = sum(m[i] for i in range(0, len(m), 4096)); time.sleep(0.3)")
    r = bench.run_measured([sys.executable, "-c", code])
    assert r.ok, r.stderr
    assert r.peak_anon < 60e6 and r.peak_rss >= 90e6, r


@pytest.fixture(scope="module")
def tiny_fp8(tmp_path_factory) -> Path:
    return make_tiny(tmp_path_factory.mktemp("synthetic") / "tiny-fp8", "--quantize", "fp8-block")


def test_fp8_block_base_loads_in_transformers(tiny, tiny_fp8):
    """--quantize fp8-block: every linear weight F8_E4M3 with a float32 scale per 128x128 block (no NaN codes),
    the rest as the bf16 base; transformers loads it through its FP8 path (dequantized on this CPU)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    base = tiny_fp8 / "base"
    cfg = json.loads((base / "config.json").read_text())
    assert cfg["quantization_config"] == {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                          "weight_block_size": [128, 128]}
    header, _ = st_header(base / "model.safetensors")
    plain, _ = st_header(tiny / "base" / "model.safetensors")
    linears = [n for n, v in plain.items() if n.endswith("_proj.weight")]
    assert len(linears) == 14
    for n in linears:
        rows, cols = plain[n]["shape"]
        assert header[n]["dtype"] == "F8_E4M3" and header[n]["shape"] == [rows, cols]
        assert header[n + "_scale_inv"] == {**header[n + "_scale_inv"], "dtype": "F32",
                                            "shape": [math.ceil(rows / 128), math.ceil(cols / 128)]}
    assert {n for n in header if not n.endswith("_scale_inv")} == set(plain)
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    w = model.state_dict()["model.layers.0.mlp.up_proj.weight"]
    assert torch.isfinite(w).all() and 0 < w.abs().max() < 0.1


def test_bench_runs_variants_on_an_fp8_base(tiny_fp8, tmp_path):
    """bench.py with one streammerge contender per --variant (bf16 and keep on the FP8 base): both succeed, each
    has its rows, medians and ratio to cp in the report."""
    out = tmp_path / "perf.md"
    r = subprocess.run([sys.executable, str(SCRIPTS / "bench.py"), "--base", str(tiny_fp8 / "base"), "--adapter",
                        str(tiny_fp8 / "adapter"), "--rounds", "1", "--no-peft", "--work", str(tmp_path / "work"),
                        "--variant", "bf16=", "--variant", "keep=--dtype keep", "--out", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    report = out.read_text()
    for name in ("streammerge bf16", "streammerge keep"):
        assert f"| 1 | {name} |" in report and f"| {name} |" in report and f"{name}/cp wall = " in report
    assert "FAILED" not in report
    assert not any((tmp_path / "work").glob("sm-out*"))  # outputs removed after each run
