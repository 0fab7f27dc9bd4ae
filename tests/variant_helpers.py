"""Helpers for the LoRA-variant oracle tests: tiny bases of any class, PEFT adapters with
perturbed trainables, PEFT references mapped back to on-disk names, and comparisons.

Reference convention (spec §4): streammerge computes every merged tensor in float32 and rounds once to the
output dtype. PEFT does the same for Linear/Conv/DoRA on a bf16 base, but rounds twice for embeddings and
target_parameters. So the oracle here is always PEFT's merge on the base *loaded in float32* (the bf16 values
upcast exactly), then cast once to the output dtype: that is PEFT's math with a single rounding. 1 ulp is
allowed for a different fp32 summation order. The reference is written with transformers' save_pretrained so
its names are the on-disk names (transformers reverses its load-time renames and MoE fusing on save).

Nothing here imports streammerge.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import oracle
import torch
from oracle import bit_equal, read_adapter_tensors, read_checkpoint, ulp_diff
from torch import nn

BF16 = torch.bfloat16
F32 = torch.float32
IDS = torch.randint(3, 120, (2, 10), generator=torch.Generator().manual_seed(11))


# ------------------------------------------------------------------------------------------------------
# bases

def tiny_config(model_type: str, **overrides):
    """oracle's tiny config (h=64, 2 layers, vocab 256, untied unless qwen2) with overrides."""
    return oracle._tiny_config(model_type, **overrides)


def save_base(model: nn.Module, out: Path, dtype: torch.dtype = BF16, *, seed: int = 0,
              perturb_small: bool = True) -> Path:
    """Save a transformers model (random 1-D params so copies are checked) in `dtype`."""
    if perturb_small:
        oracle._perturb_small_params(model, seed)
    model = model.to(dtype).eval()
    model.save_pretrained(str(out))
    return Path(out)


def build_base(model_type: str, out: Path, dtype: torch.dtype = BF16, *, cls=None, seed: int = 0,
               **overrides) -> Path:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = tiny_config(model_type, **overrides)
    model = cls(cfg) if cls is not None and not hasattr(cls, "from_config") else (cls or AutoModelForCausalLM).from_config(cfg)
    return save_base(model, out, dtype, seed=seed)


# ------------------------------------------------------------------------------------------------------
# adapters

def perturb(pm: nn.Module, name_filter: Callable[[str], bool], scale: float = 0.5, *, multiplicative=False,
            seed: int = 5) -> list[str]:
    """Add noise to (or scale by 1+noise) every parameter of the PEFT model whose name passes the filter,
    so a merger that ignores the tensor cannot pass. Returns the names touched (must be non-empty)."""
    g = torch.Generator().manual_seed(seed)
    hit = []
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if name_filter(n):
                noise = torch.randn(p.shape, generator=g, dtype=F32)
                if multiplicative:
                    p.mul_((1 + scale * noise).abs().to(p.dtype) + 0.1)
                else:
                    p.add_((scale * noise * (p.detach().float().abs().mean() + 0.05)).to(p.dtype))
                hit.append(n)
    assert hit, "perturb: no parameter matched; the test setup is wrong"
    return hit


def save_adapter(model: nn.Module, out: Path, *, seed: int = 1, mutate: Callable | None = None,
                 save_kwargs: dict | None = None, **lora_kwargs) -> Path:
    """get_peft_model(model, LoraConfig(r=4, alpha=8, init_lora_weights=False, **kw)), `mutate(peft_model)`,
    save_pretrained. B is non-zero by construction (init_lora_weights=False)."""
    from peft import LoraConfig, get_peft_model

    kw = dict(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False)
    kw.update(lora_kwargs)
    torch.manual_seed(seed)
    pm = get_peft_model(model, LoraConfig(**kw))
    if mutate is not None:
        mutate(pm)
    pm.save_pretrained(str(out), **(save_kwargs or {}))
    return Path(out)


def load_causal(base: Path, dtype=BF16, cls=None):
    from transformers import AutoModelForCausalLM

    return (cls or AutoModelForCausalLM).from_pretrained(str(base), dtype=dtype)


def adapter_config(adapter: Path) -> dict:
    return json.loads((Path(adapter) / "adapter_config.json").read_text())


def edit_adapter_config(adapter: Path, **changes) -> None:
    p = Path(adapter) / "adapter_config.json"
    cfg = json.loads(p.read_text())
    cfg.update(changes)
    p.write_text(json.dumps(cfg, indent=2, sort_keys=True))


def scale_of(cfg: dict, r: int | None = None) -> float:
    r = r or cfg["r"]
    return cfg["lora_alpha"] / math.sqrt(r) if cfg.get("use_rslora") else cfg["lora_alpha"] / r


# ------------------------------------------------------------------------------------------------------
# PEFT references

def peft_merged(base_dir: Path, adapter_dir: Path, *, cls=None, dtype=F32, prepare: Callable | None = None,
                **peft_kwargs):
    """PeftModel.from_pretrained(base loaded in `dtype`).merge_and_unload(); `prepare(model)` runs first
    (e.g. resize_token_embeddings, as a user of a resized adapter must)."""
    from peft import PeftModel

    model = load_causal(base_dir, dtype, cls)
    if prepare is not None:
        prepare(model)
    pm = PeftModel.from_pretrained(model, str(adapter_dir), **peft_kwargs)
    return pm.merge_and_unload().eval()


def peft_unmerged(base_dir: Path, adapter_dir: Path, *, cls=None, dtype=F32, prepare=None, **peft_kwargs):
    from peft import PeftModel

    model = load_causal(base_dir, dtype, cls)
    if prepare is not None:
        prepare(model)
    return PeftModel.from_pretrained(model, str(adapter_dir), **peft_kwargs).eval()


def reference_on_disk(base_dir: Path, adapter_dir: Path, out_dir: Path, *, cls=None, out_dtype=BF16,
                      prepare=None, **peft_kwargs) -> dict[str, torch.Tensor]:
    """PEFT's float32 merge, rounded once to `out_dtype`, saved by transformers (=> on-disk names/layout)."""
    if not Path(out_dir).exists():
        merged = peft_merged(base_dir, adapter_dir, cls=cls, dtype=F32, prepare=prepare, **peft_kwargs)
        merged.to(out_dtype).save_pretrained(str(out_dir))
    return read_checkpoint(out_dir)


def logits(model, ids=IDS, **kw) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=ids, **kw)
    return (out.logits if hasattr(out, "logits") else out.last_hidden_state).float()


# ------------------------------------------------------------------------------------------------------
# comparisons

def compare_to_reference(out_t: dict, base_t: dict, ref_t: dict, must_change: set[str] | list[str],
                         max_ulp: int = 1) -> dict[str, int]:
    """Output tensors == reference (names, shapes, dtypes) within `max_ulp`; every name in `must_change`
    differs from the base (so the test can fail); tensors the reference leaves equal to the base are
    bit-identical to the base. Returns name -> ulp for the changed tensors."""
    assert set(out_t) == set(ref_t), (
        f"output vs reference keys: missing {sorted(set(ref_t) - set(out_t))[:8]}, "
        f"extra {sorted(set(out_t) - set(ref_t))[:8]}"
    )
    must_change = set(must_change)
    assert must_change, "a test that cannot fail: nothing is expected to change"
    bad, ulps = {}, {}
    for k, ref in ref_t.items():
        o = out_t[k]
        assert o.shape == ref.shape, (k, tuple(o.shape), tuple(ref.shape))
        assert o.dtype == ref.dtype, (k, o.dtype, ref.dtype)
        b = base_t.get(k)
        ref_changed = b is None or b.shape != ref.shape or not torch.equal(b.to(ref.dtype), ref)
        if k in must_change:
            assert ref_changed, f"{k}: the reference did not change it; the test setup is wrong"
        if ref_changed:
            d = ulp_diff(o, ref)
            ulps[k] = d
            if d > max_ulp:
                bad[k] = d
        else:
            if not bit_equal(o, ref):
                bad[k] = f"untouched in the reference but differs by {ulp_diff(o, ref)} ulp"
    assert not bad, f"tensors off the PEFT reference (>{max_ulp} ulp): {bad}"
    missing = must_change - set(ulps)
    assert not missing, f"expected to change: {sorted(missing)}"
    return ulps


def assert_logits_close(ours: torch.Tensor, ref: torch.Tensor, rel: float = 2e-2, what: str = "") -> float:
    """Max abs logit difference within `rel` of the logit scale (bf16 rounding of merged weights)."""
    scale = ref.abs().max().item()
    err = (ours - ref).abs().max().item()
    assert err <= rel * scale, f"{what}: logits differ by {err:.4g} (scale {scale:.4g}, allowed {rel * scale:.4g})"
    return err


def lora_pairs(adapter_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    """module -> {A, B} (float32) for lora_A/B.weight and lora_embedding_A/B keys (prefix stripped)."""
    out: dict[str, dict] = {}
    for k, v in read_adapter_tensors(adapter_dir).items():
        k2 = k.removeprefix("base_model.model.")
        for suf, role in ((".lora_A.weight", "A"), (".lora_B.weight", "B"), (".lora_embedding_A", "eA"),
                          (".lora_embedding_B", "eB")):
            if k2.endswith(suf):
                out.setdefault(k2[: -len(suf)], {})[role] = v.float()
    return out


def expect_nothing_written(out: Path) -> None:
    assert not Path(out).exists() or not any(Path(out).iterdir()), f"{out} was written despite the refusal"
    leftovers = [p for p in Path(out).parent.iterdir() if p.name.startswith(Path(out).name) and p != Path(out)]
    assert not leftovers, f"staging leftovers: {leftovers}"


# ------------------------------------------------------------------------------------------------------
# a custom conv model (not transformers): base = save_file(state_dict) + a config.json

class ConvNet(nn.Module):
    """Conv1d k3, Conv2d (3,5) stride 2, Conv2d 1x1, Conv3d k3, a grouped Conv2d and a Linear."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(4, 8, 3, padding=1)
        self.c2 = nn.Conv2d(4, 6, (3, 5), stride=2)
        self.c3 = nn.Conv2d(6, 10, 1)
        self.c4 = nn.Conv3d(2, 4, 3)
        self.grouped = nn.Conv2d(4, 8, 3, groups=2)
        self.fc = nn.Linear(10, 5)

    def forward(self, x):  # only to make the module a complete model; merges are checked on tensors
        return self.fc(self.c3(self.c2(x)).mean(dim=(2, 3)))


def save_convnet(out: Path, dtype=BF16, seed: int = 0) -> Path:
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    net = ConvNet()
    out = Path(out)
    out.mkdir(parents=True)
    save_file({k: v.to(dtype).contiguous() for k, v in net.state_dict().items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps({"model_type": "convnet", "architectures": ["ConvNet"]}))
    return out


def load_convnet(base: Path, dtype=F32) -> ConvNet:
    from safetensors.torch import load_file

    net = ConvNet()
    net.load_state_dict({k: v.to(dtype) for k, v in load_file(str(Path(base) / "model.safetensors")).items()})
    return net.to(dtype)


def convnet_reference(base: Path, adapter: Path, out_dtype=BF16) -> dict[str, torch.Tensor]:
    from peft import PeftModel

    merged = PeftModel.from_pretrained(load_convnet(base), str(adapter)).merge_and_unload()
    return {k: v.detach().to(out_dtype).contiguous() for k, v in merged.state_dict().items()}


def other_peft_adapter(base: Path, out: Path, kind: str, cls=None) -> Path:
    """A real non-LoRA PEFT adapter (LOHA, LOKR, IA3, VERA, OFT) on `base` with non-trivial weights."""
    import peft

    model = load_causal(base, cls=cls)
    cfgs = {
        "LOHA": lambda: peft.LoHaConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"], init_weights=False),
        "LOKR": lambda: peft.LoKrConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"], init_weights=False),
        "IA3": lambda: peft.IA3Config(target_modules=["q_proj", "down_proj"], feedforward_modules=["down_proj"],
                                      init_ia3_weights=False),
        "VERA": lambda: peft.VeraConfig(r=4, target_modules=["q_proj", "v_proj"], save_projection=True),
        "OFT": lambda: peft.OFTConfig(r=0, oft_block_size=8, target_modules=["q_proj", "v_proj"],
                                      init_weights=False),
    }
    torch.manual_seed(2)
    pm = peft.get_peft_model(model, cfgs[kind]())
    if kind == "VERA":  # lambda_b starts at zero: the delta would be zero
        perturb(pm, lambda n: "vera_lambda" in n)
    pm.save_pretrained(str(out))
    assert json.loads((Path(out) / "adapter_config.json").read_text())["peft_type"] == kind
    return Path(out)
