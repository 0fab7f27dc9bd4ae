"""A tiny synthetic Llama-shaped base + PEFT LoRA adapter, written directly as safetensors and JSON.

No transformers, no peft: the reliability tests only need files with the right names, shapes and configs, and
they need them fast (a few ms each). `run_cli` runs the command line in-process (main() returns the exit code and
prints `error: ...` itself); `run_subprocess` runs it as a real process for the few tests that need one.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
PREFIX = "base_model.model."


def base_tensors(layers: int = 2, hidden: int = 16, inter: int = 32, vocab: int = 64, kv: int | None = None,
                 dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> dict[str, torch.Tensor]:
    kv = hidden // 2 if kv is None else kv
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * 0.05).to(dtype)

    t = {"model.embed_tokens.weight": rnd(vocab, hidden), "model.norm.weight": torch.ones(hidden, dtype=dtype),
         "lm_head.weight": rnd(vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = torch.ones(hidden, dtype=dtype)
        t[p + "post_attention_layernorm.weight"] = torch.ones(hidden, dtype=dtype)
        t[p + "self_attn.q_proj.weight"] = rnd(hidden, hidden)
        t[p + "self_attn.k_proj.weight"] = rnd(kv, hidden)
        t[p + "self_attn.v_proj.weight"] = rnd(kv, hidden)
        t[p + "self_attn.o_proj.weight"] = rnd(hidden, hidden)
        t[p + "mlp.gate_proj.weight"] = rnd(inter, hidden)
        t[p + "mlp.up_proj.weight"] = rnd(inter, hidden)
        t[p + "mlp.down_proj.weight"] = rnd(hidden, inter)
    return t


def config(layers: int = 2, hidden: int = 16, inter: int = 32, vocab: int = 64, kv: int | None = None,
           dtype: str = "bfloat16") -> dict:
    kv = hidden // 2 if kv is None else kv
    heads = 4
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": max(1, heads * kv // hidden), "head_dim": hidden // heads, "vocab_size": vocab,
        "tie_word_embeddings": False, "torch_dtype": dtype, "rms_norm_eps": 1e-6,
    }


def write_sharded(folder: Path, tensors: dict[str, torch.Tensor], shards: int) -> None:
    """Split `tensors` over `shards` files named like transformers does, plus model.safetensors.index.json."""
    names = list(tensors)
    per = -(-len(names) // shards)
    weight_map, total = {}, 0
    for i in range(shards):
        part = names[i * per:(i + 1) * per]
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: tensors[n] for n in part}, str(folder / fname), metadata={"format": "pt"})
        for n in part:
            weight_map[n] = fname
            total += tensors[n].numel() * tensors[n].element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def make_base(folder: Path, *, shards: int = 1, seed: int = 0, **shape) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    dtype = shape.pop("dtype", torch.bfloat16)
    tensors = base_tensors(seed=seed, dtype=dtype, **shape)
    if shards == 1:
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    else:
        write_sharded(folder, tensors, shards)
    dname = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}[dtype]
    (folder / "config.json").write_text(json.dumps(config(dtype=dname, **shape), indent=2))
    (folder / "generation_config.json").write_text(json.dumps({"max_new_tokens": 8}))
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 128}))
    return folder


def adapter_tensors(base: dict[str, torch.Tensor] | Path, r: int = 4, targets=("q_proj", "v_proj"),
                    seed: int = 1, scale: float = 0.1) -> dict[str, torch.Tensor]:
    if not isinstance(base, dict):
        base = read_shapes(base)
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, w in sorted(base.items()):
        mod = name[: -len(".weight")]
        if not any(mod == t or mod.endswith("." + t) for t in targets):
            continue
        shape = w.shape if isinstance(w, torch.Tensor) else w
        o, i = shape
        out[f"{PREFIX}{mod}.lora_A.weight"] = torch.randn(r, i, generator=g) * scale
        out[f"{PREFIX}{mod}.lora_B.weight"] = torch.randn(o, r, generator=g) * scale
    return out


def adapter_config(r: int = 4, alpha: int = 8, targets=("q_proj", "v_proj"), **extra) -> dict:
    cfg = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha, "lora_dropout": 0.0,
        "target_modules": list(targets), "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
        "use_dora": False, "modules_to_save": None, "init_lora_weights": True, "base_model_name_or_path": "tiny",
        "inference_mode": True, "rank_pattern": {}, "alpha_pattern": {},
    }
    cfg.update(extra)
    return cfg


def make_adapter(folder: Path, base: Path, *, r: int = 4, alpha: int = 8, targets=("q_proj", "v_proj"),
                 seed: int = 1, tensors: dict[str, torch.Tensor] | None = None, **cfg_extra) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if tensors is None:
        tensors = adapter_tensors(Path(base), r=r, targets=targets, seed=seed)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps(adapter_config(r, alpha, targets, **cfg_extra), indent=2))
    return folder


def read_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """name -> shape of every tensor of a checkpoint folder, from the headers."""
    folder = Path(folder)
    files = sorted(folder.glob("*.safetensors"))
    shapes = {}
    for f in files:
        header, _ = read_raw_header(f)
        for k, v in header.items():
            if k != "__metadata__":
                shapes[k] = tuple(v["shape"])
    return shapes


def read_raw_header(path: Path) -> tuple[dict, int]:
    """(parsed header, header length) of a safetensors file."""
    data = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), n


def write_raw(path: Path, header: bytes | dict, data: bytes, *, header_len: int | None = None) -> None:
    """A safetensors-like file with an arbitrary header (dict → JSON) and data; `header_len` may lie."""
    if isinstance(header, dict):
        header = json.dumps(header).encode()
    n = len(header) if header_len is None else header_len
    Path(path).write_bytes(struct.pack("<Q", n) + header + data)


# ---------------------------------------------------------------------------------------------------------------
# running


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """streammerge.cli.main in-process: (exit code, stdout, stderr). SystemExit (argparse) counts as its code."""
    from streammerge.cli import main

    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:  # argparse errors
        code = e.code if isinstance(e.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def run_subprocess(argv: list[str], *, env: dict | None = None, timeout: float = 120,
                   **kw) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "STREAMMERGE_DEBUG": "", **(env or {})}
    return subprocess.run([PY, "-m", "streammerge", *map(str, argv)], capture_output=True, text=True,
                          env=full_env, timeout=timeout, cwd=REPO, **kw)


def tree_digest(path: Path) -> dict[str, str] | None:
    """relative path -> sha256 of every file under `path` (None if it does not exist): 'untouched' checks."""
    path = Path(path)
    if not path.exists():
        return None
    if path.is_file():
        return {".": hashlib.sha256(path.read_bytes()).hexdigest()}
    return {p.relative_to(path).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def looks_complete(path: Path) -> bool:
    """Would a loader take `path` for a finished checkpoint?"""
    path = Path(path)
    return path.is_dir() and (path / "config.json").exists() and (
        (path / "model.safetensors").exists() or (path / "model.safetensors.index.json").exists())


def wait_for(proc: subprocess.Popen, cond: Callable[[], bool], timeout: float = 120.0, poll: float = 0.003) -> bool:
    """Poll `cond` until true (True) or the process exits / time runs out (False)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(poll)
    return False

