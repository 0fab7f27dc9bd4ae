"""verify checks a merged output against an independent float64 reference (streammerge/reference.py) instead of
re-running the merge's own engine, and expects exactly the config.json the merge writes for its --dtype.

* Every variant the support matrix lists is merged correctly and verified on every row; then merged again with
  one of the engine's kernels deliberately wrong (scale off, transpose flipped, a step skipped, a replacement read
  wrongly) and verify must report exactly the tensors that changed. The wrong kernel stays in place while verify
  runs, so a verify that recomputed through the engine would reproduce the error and pass.
* `--dtype auto` on a base whose config has no torch_dtype or a wrong one (all-MiniLM-L6-v2: F32 BertModel, no
  torch_dtype) verifies: its output is byte-identical to the f32 merge, and its config is the base's.
* Sampled by default, every row on request; a 1-ulp change of one merged value is still reported.
"""

from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path

import helpers_tiny as ht
import pytest
import torch
import variant_helpers as vh
from conftest import run_merge
from oracle import read_adapter_tensors, read_checkpoint
from safetensors.torch import load_file, save_file

from streammerge.verify import verify

VERIFY_FAILED, USAGE = 9, 2
LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
E = 3


def _is_mag(n: str) -> bool:
    return "lora_magnitude_vector" in n


# ---------------------------------------------------------------------------------------------------------------
# wrong engines: each replaces one kernel of streammerge.kernels (or the adapter reader) with a plausible bug


def _scale_arg(name: str, index: int):
    def make(real):
        def wrong(*args):
            args = list(args)
            args[index] = args[index] * 1.5  # a wrong alpha/r
            return real(*args)
        return wrong
    return name, make


def _skipped(name: str):
    return name, lambda real: (lambda w, *rest: w)


SABOTAGE = {
    "lora_rows_scale": _scale_arg("add_lora_rows", 3),
    "lora_cols_scale": _scale_arg("add_lora_cols", 3),
    "bias_scale": _scale_arg("add_scaled", 2),
    "loha_scale": _scale_arg("add_hadamard_rows", 5),
    "lokr_scale": _scale_arg("add_kron_rows", 5),
    "expert_transpose": ("add_expert_delta", lambda real: (lambda w, a, b, s, t: real(w, a, b, s, not t))),
    "tokens_skipped": _skipped("replace_rows"),
    "dora_rows_skipped": _skipped("dora_rows"),
    "dora_cols_skipped": _skipped("dora_cols"),
    "ia3_rows_skipped": _skipped("scale_rows"),
    "ia3_cols_skipped": _skipped("scale_cols"),
    "replacement_read_wrong": None,  # Adapter.read_rows returns full-replacement tensors shifted by 0.5
}


def _sabotage(monkeypatch, which: str) -> None:
    import streammerge.kernels as kernels
    from streammerge.adapter import Adapter

    if which == "replacement_read_wrong":
        # the engine reads adapter tensors through read_rows (a pread, so a changed file is an error, not a SIGBUS)
        real_read = Adapter.read_rows
        monkeypatch.setattr(Adapter, "read_rows", lambda self, key, *a, **k: real_read(self, key, *a, **k) + 0.5
                            if ".lora_" not in key else real_read(self, key, *a, **k))
        return
    name, make = SABOTAGE[which]
    monkeypatch.setattr(kernels, name, make(getattr(kernels, name)))


# ---------------------------------------------------------------------------------------------------------------
# the variants of docs/support-matrix.md, built once per module


class Built:
    def __init__(self, root: Path) -> None:
        self.root = root
        self._bases: dict[str, Path] = {}
        self._cases: dict[str, tuple[Path, Path, Path]] = {}

    def base(self, kind: str) -> Path:
        if kind not in self._bases:
            d = self.root / f"base-{kind}"
            if kind == "llama":
                b = vh.build_base("llama", d)
            elif kind == "llama-v128":
                b = vh.build_base("llama", d, vocab_size=128)
            elif kind == "gpt2":
                b = vh.build_base("gpt2", d, bos_token_id=255, eos_token_id=255)
            elif kind == "qwen2":
                b = vh.build_base("qwen2", d, tie_word_embeddings=False)
            elif kind == "qwen2-tied":
                b = vh.build_base("qwen2", d, tie_word_embeddings=True)
            elif kind == "convnet":
                b = vh.save_convnet(d)
            elif kind == "mixtral":
                b = vh.build_base("mixtral", d, num_local_experts=E, num_experts_per_tok=2)
            elif kind == "gpt_oss":
                from transformers import AutoConfig, AutoModelForCausalLM

                torch.manual_seed(0)
                cfg = AutoConfig.for_model("gpt_oss", vocab_size=64, hidden_size=32, intermediate_size=24,
                                           num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                           head_dim=8, num_local_experts=E, num_experts_per_tok=2,
                                           max_position_embeddings=64, layer_types=["full_attention"])
                AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16).save_pretrained(d)
                b = d
            else:
                raise KeyError(kind)
            self._bases[kind] = b
        return self._bases[kind]

    def case(self, name: str) -> tuple[Path, Path, Path]:
        """(base, adapter, correct merge)"""
        if name not in self._cases:
            base, ad = CASES[name][0](self, self.root / f"ad-{name}")
            out = self.root / f"out-{name}"
            run_merge(base, ad, out)
            self._cases[name] = (base, ad, out)
        return self._cases[name]


def _lora(b: Built, kind: str, ad: Path, cls=None, **kw) -> tuple[Path, Path]:
    base = b.base(kind)
    model = vh.load_convnet(base, torch.bfloat16) if kind == "convnet" else vh.load_causal(base, cls=cls)
    return base, vh.save_adapter(model, ad, **kw)


def _lora_llama(b, ad):
    """plain LoRA on every linear kind, rsLoRA, rank/alpha patterns, embedding LoRA (with its saved
    base_layer.weight replacing the checkpoint's), modules_to_save lm_head"""
    return _lora(b, "llama", ad, target_modules=LINEAR + ["embed_tokens"], use_rslora=True,
                 rank_pattern={"down_proj": 2}, alpha_pattern={"v_proj": 16}, modules_to_save=["lm_head"],
                 mutate=lambda pm: vh.perturb(pm, lambda n: "lm_head.modules_to_save" in n))


def _dora_llama(b, ad):
    return _lora(b, "llama", ad, use_dora=True, target_modules=["q_proj", "v_proj", "embed_tokens"],
                 mutate=lambda pm: vh.perturb(pm, _is_mag, multiplicative=True))


def _dora_gpt2(b, ad):
    return _lora(b, "gpt2", ad, use_dora=True, fan_in_fan_out=True, target_modules=["c_attn", "c_fc"],
                 mutate=lambda pm: vh.perturb(pm, _is_mag, multiplicative=True))


def _bias_tokens_qwen2(b, ad):
    return _lora(b, "qwen2", ad, target_modules=["q_proj", "k_proj", "v_proj"], lora_bias=True,
                 trainable_token_indices=[3, 5, 7, 200],
                 mutate=lambda pm: vh.perturb(pm, lambda n: ("lora_B" in n and n.endswith("bias"))
                                              or "trainable_tokens_delta" in n))


def _dora_convnet(b, ad):
    return _lora(b, "convnet", ad, use_dora=True, target_modules=["c1", "c2", "c3", "c4", "fc"],
                 mutate=lambda pm: vh.perturb(pm, _is_mag, multiplicative=True))


def _tied_qwen2(b, ad):
    """LoRA on both sides of a tied embedding: embed = E + dE, lm_head = E + dH, untied"""
    return _lora(b, "qwen2-tied", ad, target_modules=["embed_tokens", "lm_head"])


def _resized_vocab(b, ad):
    base = b.base("llama-v128")
    model = vh.load_causal(base)
    model.resize_token_embeddings(136)
    return base, vh.save_adapter(model, ad, target_modules=["q_proj", "v_proj"],
                                 save_kwargs=dict(save_embedding_layers=True))


def _moe_per_expert(b, ad):
    return _lora(b, "mixtral", ad, target_modules=["q_proj"],
                 target_parameters=["experts.gate_up_proj", "experts.down_proj"])


def _moe_fused(b, ad):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = b.base("gpt_oss")
    lc = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], init_lora_weights=False,
                    target_parameters=["experts.gate_up_proj", "experts.down_proj"])
    get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16), lc).save_pretrained(ad)
    return base, ad


def _other(kind: str, on: str):
    def build(b, ad):
        base = b.base(on)
        if on == "llama":
            return base, vh.other_peft_adapter(base, ad, kind)
        import peft

        cfg = {"IA3": peft.IA3Config(target_modules=["c_attn", "c_fc"], feedforward_modules=["c_fc"],
                                     init_ia3_weights=False),
               "VERA": peft.VeraConfig(r=4, target_modules=["c_attn", "c_fc"], save_projection=True)}[kind]
        torch.manual_seed(3)
        pm = peft.get_peft_model(vh.load_causal(base), cfg)
        vh.perturb(pm, lambda n: "vera_lambda" in n or "ia3_l" in n, multiplicative=kind == "IA3")
        pm.save_pretrained(str(ad))
        return base, ad
    return build


# name: (builder, wrong engines to catch, tensors whose check must involve arithmetic)
CASES = {
    "lora-rslora-patterns-embedding-modules_to_save": (
        _lora_llama, ["lora_rows_scale", "lora_cols_scale", "replacement_read_wrong"],
        {"model.layers.0.mlp.down_proj.weight", "model.embed_tokens.weight"}),
    "dora-linear-embedding": (_dora_llama, ["dora_rows_skipped", "dora_cols_skipped"],
                              {"model.layers.1.self_attn.v_proj.weight", "model.embed_tokens.weight"}),
    "dora-gpt2-conv1d": (_dora_gpt2, ["lora_cols_scale", "dora_cols_skipped"], {"transformer.h.0.attn.c_attn.weight"}),
    "lora_bias-trainable_tokens": (_bias_tokens_qwen2, ["bias_scale", "tokens_skipped"],
                                   {"model.layers.0.self_attn.k_proj.bias"}),
    "dora-convnd": (_dora_convnet, ["lora_rows_scale", "dora_rows_skipped"], {"c2.weight", "c4.weight"}),
    "tied-embedding-both-sides": (_tied_qwen2, ["lora_rows_scale", "lora_cols_scale"],
                                  {"lm_head.weight", "model.embed_tokens.weight"}),
    "resized-vocab-save_embedding_layers": (_resized_vocab, ["replacement_read_wrong"],
                                            {"model.layers.0.self_attn.q_proj.weight"}),
    "moe-target_parameters-per-expert": (_moe_per_expert, ["lora_rows_scale"],
                                         {"model.layers.0.block_sparse_moe.experts.2.w3.weight"}),
    "moe-target_parameters-fused": (_moe_fused, ["expert_transpose"], {"model.layers.0.mlp.experts.down_proj"}),
    "loha": (_other("LOHA", "llama"), ["loha_scale"], {"model.layers.0.self_attn.q_proj.weight"}),
    "lokr": (_other("LOKR", "llama"), ["lokr_scale"], {"model.layers.0.self_attn.q_proj.weight"}),
    "ia3": (_other("IA3", "llama"), ["ia3_rows_skipped", "ia3_cols_skipped"],
            {"model.layers.0.mlp.down_proj.weight"}),
    "vera": (_other("VERA", "llama"), ["lora_rows_scale"], {"model.layers.0.self_attn.v_proj.weight"}),
    "ia3-gpt2-conv1d": (_other("IA3", "gpt2"), ["ia3_rows_skipped", "ia3_cols_skipped"],
                        {"transformer.h.0.attn.c_attn.bias"}),
    "vera-gpt2-conv1d": (_other("VERA", "gpt2"), ["lora_cols_scale"], {"transformer.h.1.mlp.c_fc.weight"}),
}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Built:
    return Built(tmp_path_factory.mktemp("verify-reference"))


@pytest.mark.parametrize("case", list(CASES))
def test_correct_merge_verifies_on_every_row(built, case):
    base, ad, out = built.case(case)
    report = verify(base, ad, out, sample_blocks=None)
    assert report.ok, report.problems()
    assert all(c.rows_checked == c.rows for c in report.checks)
    arithmetic = {c.name for c in report.checks if not c.exact}
    assert CASES[case][2] <= arithmetic, sorted(CASES[case][2] - arithmetic)


@pytest.mark.parametrize("case,wrong", [(c, w) for c, spec in CASES.items() for w in spec[1]])
def test_wrong_engine_formula_is_caught(built, case, wrong, monkeypatch, tmp_path):
    base, ad, good = built.case(case)
    _sabotage(monkeypatch, wrong)  # stays in place while verify runs
    out = tmp_path / "wrong"
    run_merge(base, ad, out)
    good_t, bad_t = read_checkpoint(good), read_checkpoint(out)
    changed = {k for k in good_t if not torch.equal(good_t[k].view(torch.uint8) if good_t[k].dtype == torch.bool
                                                    else good_t[k], bad_t[k])}
    assert changed, "setup: the wrong engine wrote the same bytes"
    report = verify(base, ad, out, sample_blocks=None)
    assert not report.ok
    flagged = {c.name for c in report.checks if c.max_ulps}
    assert flagged == changed, (sorted(flagged), sorted(changed))


# ---------------------------------------------------------------------------------------------------------------
# the command line, with a wrong engine


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("verify-ref-pair")
    base = ht.make_base(root / "base", hidden=64, inter=128, vocab=256)
    adapter = ht.make_adapter(root / "adapter", base, targets=("q_proj", "v_proj", "down_proj"))
    return base, adapter


def test_merge_verify_catches_a_dropped_scale(capsys, pair, tmp_path, monkeypatch):
    """`merge --verify` with an engine that forgets s = alpha/r exits 9 and names the tensors."""
    import streammerge.kernels as kernels

    real = kernels.add_lora_rows
    monkeypatch.setattr(kernels, "add_lora_rows", lambda w, a, b, s, tmp=None: real(w, a, b, 1.0, tmp))
    base, adapter = pair
    rc, out, err = ht.run_cli(["--base", base, "--adapter", adapter, "--output", tmp_path / "m", "--verify"], capsys)
    assert rc == VERIFY_FAILED, (rc, out, err)
    line = err.strip()
    assert line.startswith("error: ") and "\n" not in line and "Traceback" not in out + err
    assert "model.layers.0.self_attn.q_proj.weight" in line and "beyond float32 rounding" in line, line
    rc, out, err = ht.run_cli(["verify", "--base", base, "--adapter", adapter, "--merged", tmp_path / "m"], capsys)
    assert rc == VERIFY_FAILED and "model.layers.1.mlp.down_proj.weight" in err, err


def test_reference_does_not_use_the_merge_engine(pair, tmp_path, monkeypatch):
    """The reference is written apart from the engine: verify passes with every kernel of the merge broken, and
    the reference module imports neither the engine nor its kernels."""
    import inspect

    import streammerge.kernels as kernels
    import streammerge.verify.reference as reference

    base, adapter = pair
    run_merge(base, adapter, tmp_path / "m")

    def broken(*args, **kwargs):
        raise AssertionError("verify called a kernel of the merge engine")

    for name, fn in inspect.getmembers(kernels, inspect.isfunction):
        if fn.__module__ == kernels.__name__:
            monkeypatch.setattr(kernels, name, broken)
    report = verify(base, adapter, tmp_path / "m", sample_blocks=None)
    assert report.ok, report.problems()

    tree = ast.parse(Path(reference.__file__).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            imported.add(node.module or "")
            imported.update(a.name for a in node.names)
        elif isinstance(node, ast.Import):
            imported.update(a.name for a in node.names)
    assert not imported & {"engine", "kernels", "streammerge.engine", "streammerge.kernels"}, imported


# ---------------------------------------------------------------------------------------------------------------
# --dtype auto and config.json (all-MiniLM-L6-v2: an F32 BertModel whose config names no dtype)


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    from peft import LoraConfig, get_peft_model
    from transformers import BertConfig, BertModel

    root = tmp_path_factory.mktemp("minilm")
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64)
    BertModel(cfg).save_pretrained(root / "base")
    config = json.loads((root / "base" / "config.json").read_text())
    config.pop("torch_dtype", None)
    config.pop("dtype", None)
    (root / "base" / "config.json").write_text(json.dumps(config, indent=2))
    pm = get_peft_model(BertModel.from_pretrained(root / "base"),
                        LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], init_lora_weights=False))
    pm.save_pretrained(root / "adapter")
    assert "base_model.model.encoder.layer.0.attention.self.query.lora_A.weight" in read_adapter_tensors(root / "adapter")
    return root / "base", root / "adapter"


def _set_config_dtype(base: Path, dest: Path, value: str | None) -> Path:
    shutil.copytree(base, dest)
    config = json.loads((dest / "config.json").read_text())
    config.pop("torch_dtype", None)
    config.pop("dtype", None)
    if value is not None:
        config["torch_dtype"] = value
    (dest / "config.json").write_text(json.dumps(config, indent=2))
    return dest


@pytest.mark.parametrize("config_dtype", [None, "float16"], ids=["absent", "wrong"])
def test_minilm_auto_merge_verifies(capsys, minilm, tmp_path, config_dtype):
    base, adapter = minilm
    base = _set_config_dtype(base, tmp_path / "base", config_dtype)
    outs = {}
    for dtype in ("auto", "f32"):
        outs[dtype] = tmp_path / dtype
        rc, out, err = ht.run_cli(["--base", base, "--adapter", adapter, "--output", outs[dtype], "--dtype", dtype,
                                   "--verify", "--no-progress"], capsys)
        assert rc == 0, (dtype, out, err)
        assert "Verify: OK" in out
    assert (outs["auto"] / "model.safetensors").read_bytes() == (outs["f32"] / "model.safetensors").read_bytes()
    # the auto merge leaves the base's config as it was; the f32 merge names float32
    assert json.loads((outs["auto"] / "config.json").read_text()).get("torch_dtype") == config_dtype
    assert json.loads((outs["f32"] / "config.json").read_text())["torch_dtype"] == "float32"
    for dtype, out_dir in outs.items():
        rc, out, err = ht.run_cli(["verify", "--base", base, "--adapter", adapter, "--merged", out_dir], capsys)
        assert rc == 0, (dtype, err)
        rc, out, err = ht.run_cli(["verify", "--base", base, "--adapter", adapter, "--merged", out_dir, "--dtype",
                                   dtype], capsys)
        assert rc == 0, (dtype, err)
    # pinned to f32, the auto merge's config is wrong (it does not name float32) -- unless it happens to
    rc, out, err = ht.run_cli(["verify", "--base", base, "--adapter", adapter, "--merged", outs["auto"], "--dtype",
                               "f32"], capsys)
    assert rc == VERIFY_FAILED and "torch_dtype" in err, err


def _mixed_base(folder: Path) -> Path:
    """BF16 weights with F32 norms (as some checkpoints ship), config torch_dtype bfloat16."""
    ht.make_base(folder, hidden=32, inter=64, vocab=128)
    shard = folder / "model.safetensors"
    t = load_file(str(shard))
    t = {k: v.float() if "norm" in k else v for k, v in t.items()}
    save_file(t, str(shard), metadata={"format": "pt"})
    return folder


@pytest.mark.parametrize("base_kind", ["bf16-config-absent", "f32-config-wrong", "mixed-dtypes"])
@pytest.mark.parametrize("dtype", ["bf16", "f16", "f32", "auto"])
def test_config_is_exactly_what_the_merge_writes(capsys, tmp_path, base_kind, dtype):
    """For every --dtype and base config, `merge --verify` passes, `verify --dtype` pins the expectation, and
    a config edited after the merge still fails."""
    if base_kind == "mixed-dtypes":
        base = _mixed_base(tmp_path / "base")
    else:
        tensor_dtype, cfg = {"bf16-config-absent": (torch.bfloat16, None),
                             "f32-config-wrong": (torch.float32, "bfloat16")}[base_kind]
        made = ht.make_base(tmp_path / "made", hidden=32, inter=64, vocab=128, dtype=tensor_dtype)
        base = _set_config_dtype(made, tmp_path / "base", cfg)
    adapter = ht.make_adapter(tmp_path / "adapter", base)
    out = tmp_path / "out"
    rc, o, err = ht.run_cli(["--base", base, "--adapter", adapter, "--output", out, "--dtype", dtype, "--verify",
                             "--no-progress"], capsys)
    assert rc == 0, (o, err)
    for pinned in ([], ["--dtype", dtype]):
        rc, o, err = ht.run_cli(["verify", "--base", base, "--adapter", adapter, "--merged", out, *pinned], capsys)
        assert rc == 0, (pinned, err)
    config = json.loads((out / "config.json").read_text())
    config["torch_dtype"] = "float64"
    (out / "config.json").write_text(json.dumps(config))
    rc, o, err = ht.run_cli(["verify", "--base", base, "--adapter", adapter, "--merged", out], capsys)
    assert rc == VERIFY_FAILED and "'torch_dtype'" in err, err


# ---------------------------------------------------------------------------------------------------------------
# sampling, and single values


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """embed_tokens and lm_head of 8192 rows, merged q/v/down: many row blocks per tensor."""
    import streammerge

    root = tmp_path_factory.mktemp("verify-wide")
    base = ht.make_base(root / "base", hidden=512, inter=1024, vocab=8192)
    adapter = ht.make_adapter(root / "adapter", base, targets=("q_proj", "v_proj", "down_proj", "lm_head"))
    out = root / "out"
    streammerge.merge(base, adapter, out)
    return base, adapter, out


def test_sampled_by_default_every_row_on_request(capsys, wide):
    base, adapter, out = wide
    sampled = verify(base, adapter, out)
    assert sampled.ok
    head = next(c for c in sampled.checks if c.name == "lm_head.weight")
    assert 0 < head.rows_checked < head.rows
    assert sum(c.rows_checked for c in sampled.checks) < sum(c.rows for c in sampled.checks)
    full = verify(base, adapter, out, sample_blocks=None)
    assert full.ok and all(c.rows_checked == c.rows for c in full.checks)
    rc, o, err = ht.run_cli(["verify", "--base", base, "--adapter", adapter, "--merged", out, "--all-rows"], capsys)
    total = sum(c.rows for c in full.checks)
    assert rc == 0 and f"({total} of {total} rows)" in o, o
    rc, o, err = ht.run_cli(["verify", "--base", base, "--adapter", adapter, "--merged", out], capsys)
    assert rc == 0 and f" of {total} rows)" in o and f"({total} of" not in o, o
    rc, o, err = ht.run_cli(["verify", "--base", base, "--adapter", adapter, "--merged", out, "--all-rows",
                             "--sample", "3"], capsys)
    assert rc == USAGE and err.startswith("error: argument --sample"), err


def _bump(path: Path, name: str, flat_index: int, ulps: int = 1) -> None:
    """Move one value of a tensor in a safetensors file by `ulps` units in the last place (bytes in place)."""
    header, n = ht.read_raw_header(path)
    begin = 8 + n + header[name]["data_offsets"][0]
    size = {"BF16": 2, "F16": 2, "F32": 4}[header[name]["dtype"]]
    data = bytearray(path.read_bytes())
    pos = begin + flat_index * size
    value = int.from_bytes(data[pos:pos + size], "little", signed=True)
    data[pos:pos + size] = (value + ulps if value >= 0 else value - ulps).to_bytes(size, "little", signed=True)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("name,row", [("model.layers.1.mlp.down_proj.weight", 200),
                                      ("lm_head.weight", 2000), ("model.embed_tokens.weight", 3000)])
def test_one_value_one_ulp_off_is_reported(wide, tmp_path, name, row):
    """A merged bf16 value 1 ulp away from the reference (or a copied one, bit for bit) fails; the row is in
    the middle of the tensor, so only --all-rows is sure to see it."""
    base, adapter, out = wide
    moved = Path(shutil.copytree(out, tmp_path / "out"))
    cols = 1024 if "down_proj" in name else 512
    _bump(moved / "model.safetensors", name, row * cols + 7)
    report = verify(base, adapter, moved, sample_blocks=None)
    bad = [c for c in report.checks if c.max_ulps]
    assert [c.name for c in bad] == [name], report.problems()
    assert bad[0].max_ulps == 1 and f"row {row}, column 7" in bad[0].detail, bad[0]


def test_float32_output_tolerance(pair, tmp_path):
    """An f32 merge is not the float64 value rounded once everywhere (float32 arithmetic), yet passes; a value
    moved further than float32 arithmetic can explain fails."""
    import streammerge

    base, adapter = pair
    out = tmp_path / "f32"
    streammerge.merge(base, adapter, out, dtype="f32")
    report = verify(base, adapter, out, sample_blocks=None)
    assert report.ok, report.problems()
    assert sum(c.off_rounded for c in report.checks) > 0, "setup: expected float32 rounding differences"
    _bump(out / "model.safetensors", "model.layers.0.self_attn.q_proj.weight", 5 * 64 + 3, ulps=64)
    report = verify(base, adapter, out, sample_blocks=None)
    assert [c.name for c in report.checks if c.max_ulps] == ["model.layers.0.self_attn.q_proj.weight"]


def test_output_bounds_follow_float32_rounding():
    """[round(x - e), round(x + e)]: one value when the bound is far from a rounding tie, both neighbours when
    float32 arithmetic could land on either side."""
    from streammerge.verify.reference import output_bounds

    one = torch.tensor([[1.0]], dtype=torch.float64)
    ulp = 2.0 ** -7  # bf16 at 1.0
    rounded, lo, hi = output_bounds(one + 0.3 * ulp, torch.full_like(one, 1e-7), torch.bfloat16)
    assert rounded.item() == lo.item() == hi.item() == 1.0
    rounded, lo, hi = output_bounds(one + 0.5 * ulp, torch.full_like(one, 1e-7), torch.bfloat16)
    assert (lo.item(), hi.item()) == (1.0, 1.0 + ulp)
    big = torch.tensor([[70000.0]], dtype=torch.float64)
    rounded, lo, hi = output_bounds(big, torch.zeros_like(big), torch.float16)
    assert rounded.item() == lo.item() == hi.item() == 65504.0  # an f16 output is clamped, never inf


def test_clamped_float16_output_verifies(capsys, tmp_path):
    """--dtype f16 --clamp-f16: merged and copied values beyond 65504 are written as +-65504, and the reference
    clamps likewise (in float32: bfloat16 itself cannot hold 65504)."""
    base = ht.make_base(tmp_path / "base", hidden=32, inter=64, vocab=128)
    shard = base / "model.safetensors"
    t = load_file(str(shard))
    t["model.norm.weight"][3] = 70000.0  # a copied tensor
    save_file(t, str(shard), metadata={"format": "pt"})
    adapter = ht.make_adapter(tmp_path / "adapter", base)
    t = load_file(str(adapter / "adapter_model.safetensors"))
    b_key = f"{ht.PREFIX}model.layers.1.self_attn.q_proj.lora_B.weight"
    t[b_key][5] = 1e6  # row 5 of a merged tensor
    save_file(t, str(adapter / "adapter_model.safetensors"))
    out = tmp_path / "out"
    rc, o, err = ht.run_cli(["--base", base, "--adapter", adapter, "--output", out, "--dtype", "f16", "--clamp-f16",
                             "--verify", "--no-progress"], capsys)
    assert rc == 0 and "Verify: OK" in o, (o, err)
    merged = load_file(str(out / "model.safetensors"))
    assert merged["model.norm.weight"][3] == 65504 and merged["model.layers.1.self_attn.q_proj.weight"].abs().max() == 65504
