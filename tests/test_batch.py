"""merge_many: several jobs on one base in one pass. Outputs byte-identical to single merges, every base row
block read once for all jobs, one job's failure (plan problem, NaN, full disk) reported with its exit
code while the others complete, an interrupt cleaning up every job."""

from __future__ import annotations

import os

import helpers_tiny as ht
import pytest
import torch
import variant_helpers as vh
from safetensors.torch import load_file, save_file

import streammerge
from streammerge.io.output import LOCK_TAG, STAGING_TAG
from streammerge.jobs import parse_jobs

PLAN, OUTPUT, NUMERIC = 4, 6, 7


def _spec(base, jobs, where, **options):
    return parse_jobs({"base": str(base), "jobs": jobs, **options}, where / "jobs.json")


def _leftovers(folder):
    """Staging folders and lock files a run left beside its outputs."""
    return sorted(n for n in os.listdir(folder) if STAGING_TAG in n or n.endswith(LOCK_TAG))


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """A transformers base and PEFT adapters of several kinds: plain LoRA, LoRA on every projection and the head,
    DoRA on the embedding (a prepass over all rows), a replaced head (modules_to_save: read from the adapter)."""
    wd = tmp_path_factory.mktemp("batch-real")
    base = vh.build_base("llama", wd / "base", vocab_size=512)
    mag = dict(mutate=lambda pm: vh.perturb(pm, lambda n: "lora_magnitude_vector" in n, multiplicative=True))
    head = dict(mutate=lambda pm: vh.perturb(pm, lambda n: "modules_to_save" in n))
    adapters = [
        vh.save_adapter(vh.load_causal(base), wd / "a-qv", target_modules=["q_proj", "v_proj"]),
        vh.save_adapter(vh.load_causal(base), wd / "a-all", seed=2, r=8, target_modules="all-linear"),
        vh.save_adapter(vh.load_causal(base), wd / "a-dora", use_dora=True,
                        target_modules=["embed_tokens", "q_proj"], **mag),
        vh.save_adapter(vh.load_causal(base), wd / "a-head", target_modules=["k_proj"], modules_to_save=["lm_head"],
                        **head),
    ]
    return wd, base, adapters


@pytest.mark.parametrize("dtype", ["bf16", "f16"])
def test_outputs_equal_single_merges(real, dtype):
    from streammerge.batch import merge_many

    wd, base, adapters = real
    options = dict(dtype=dtype, max_shard_size="40KB", max_memory="1MB")
    singles = {}
    for a in adapters:
        out = wd / f"single-{dtype}-{a.name}"
        streammerge.merge(base, a, out, threads=1, **options)
        singles[a.name] = ht.tree_digest(out)
    assert len(next(iter(singles.values()))) > 3  # several shards and their index
    mix = wd / f"single-{dtype}-mix"
    streammerge.merge(base, adapters[:2], mix, weights=[0.7, -0.3], threads=1, **options)
    jobs = [{"adapter": str(a), "output": str(wd / f"batch-{dtype}" / a.name)} for a in adapters]
    jobs.append({"adapters": [str(a) for a in adapters[:2]], "weights": [0.7, -0.3],
                 "output": str(wd / f"batch-{dtype}" / "mix")})
    results = merge_many(_spec(base, jobs, wd, **options), threads=3)
    assert [r.ok for r in results] == [True] * len(jobs), [r.error for r in results]
    for a, r in zip(adapters, results):
        assert r.summary.output == wd / f"batch-{dtype}" / a.name and r.summary.bytes_written > 0
        assert ht.tree_digest(r.summary.output) == singles[a.name], a.name
    assert results[-1].summary.weights == [0.7, -0.3] and len(results[-1].summary.adapters) == 2
    assert ht.tree_digest(results[-1].summary.output) == ht.tree_digest(mix)
    assert _leftovers(wd / f"batch-{dtype}") == []


def test_every_base_block_is_read_once(real, monkeypatch):
    """--dtype f32 casts every tensor, so every base row goes through a read: one read per block for three jobs."""
    from streammerge.batch import merge_many
    from streammerge.io import reader as reader_mod

    wd, base, adapters = real
    reads: list[tuple] = []
    real_read = reader_mod.TensorReader.read_rows

    def read_rows(self, info, start, stop, out=None):
        if info.path.parent == base:
            reads.append((info.name, start, stop))
        return real_read(self, info, start, stop, out)

    monkeypatch.setattr(reader_mod.TensorReader, "read_rows", read_rows)
    streammerge.merge(base, adapters[0], wd / "once-single", dtype="f32", threads=2)
    single = sorted(reads)
    reads.clear()
    jobs = [{"adapter": str(a), "output": str(wd / "once" / a.name)} for a in adapters[:2] + adapters[3:]]
    results = merge_many(_spec(base, jobs, wd, dtype="f32"), threads=2)
    assert all(r.ok for r in results), [r.error for r in results]
    assert len(reads) == len(set(reads)), "a base block was read twice"
    assert sorted(reads) == single


def test_factor_budget_splits_the_jobs_and_keeps_the_bytes(real, monkeypatch):
    """With a budget of one job's factors, the jobs sharing a tensor are merged one after the other (the source
    read again for each): memory stays that of one job however many there are, and the bytes do not change."""
    from streammerge.batch import merge_many
    from streammerge.engine import groups

    wd, base, adapters = real
    monkeypatch.setattr(groups, "FACTOR_BUDGET", 1)
    jobs = [{"adapter": str(a), "output": str(wd / "budget" / a.name)} for a in adapters]
    results = merge_many(_spec(base, jobs, wd, max_shard_size="40KB", max_memory="1MB"), threads=2)
    assert all(r.ok for r in results), [r.error for r in results]
    for a, r in zip(adapters, results):
        single = wd / f"single-bf16-{a.name}"
        if not single.exists():  # made by test_outputs_equal_single_merges when it ran first
            streammerge.merge(base, a, single, threads=1, dtype="bf16", max_shard_size="40KB", max_memory="1MB")
        assert ht.tree_digest(r.summary.output) == ht.tree_digest(single), a.name


# ---------------------------------------------------------------------------------------------------------------
# failures stay with their job


@pytest.fixture
def tiny(tmp_path):
    base = ht.make_base(tmp_path / "base", hidden=256, inter=512, vocab=1024)  # ~3 MB
    good = ht.make_adapter(tmp_path / "good", base, targets=("q_proj", "v_proj", "down_proj"))
    other = ht.make_adapter(tmp_path / "other", base, seed=4, r=8, targets=("k_proj", "up_proj", "lm_head"))
    wrong = ht.make_adapter(tmp_path / "wrong", ht.make_base(tmp_path / "base-small", hidden=32, inter=64))
    huge = ht.make_adapter(tmp_path / "huge", base, targets=("v_proj",))
    t = load_file(str(huge / "adapter_model.safetensors"))
    for part in ("A", "B"):  # finite factors whose product overflows float32: Inf mid-pass
        key = f"{ht.PREFIX}model.layers.1.self_attn.v_proj.lora_{part}.weight"
        t[key] = torch.full_like(t[key], 1e30)
    save_file(t, str(huge / "adapter_model.safetensors"))
    return tmp_path, base, good, other, wrong, huge


def test_failures_are_reported_per_job_and_the_others_complete(tiny, tmpfs, monkeypatch):
    from streammerge import batch

    tmp, base, good, other, wrong, huge = tiny
    full = tmpfs(tmp / "full", size="1m")  # a real file system that fills up half-way through the job
    monkeypatch.setattr(batch, "check_free_space", lambda *a, **k: None)
    outs = tmp / "outs"
    jobs = [
        {"adapter": str(good), "output": str(outs / "good")},
        {"adapter": str(wrong), "output": str(outs / "wrong")},
        {"adapter": str(huge), "output": str(outs / "huge")},
        {"adapters": [str(good), str(other)], "weights": [0.5, 0.5], "output": str(outs / "mix")},
        {"adapter": str(other), "output": str(full / "full")},
        {"adapter": str(other), "output": str(outs / "other")},
    ]
    results = batch.merge_many(_spec(base, jobs, tmp), threads=2)
    got = {r.job.label: (r.ok, r.exit_code) for r in results}
    assert got == {"good": (True, 0), "wrong": (False, PLAN), "huge": (False, NUMERIC), "mix": (True, 0),
                   "full": (False, OUTPUT), "other": (True, 0)}, [r.error for r in results]
    errors = {r.job.label: r.error for r in results}
    assert "does not fit base" in errors["wrong"]
    assert "v_proj.weight" in errors["huge"] and "NaN/Inf" in errors["huge"]
    assert "no space left on device" in errors["full"]
    for name in ("good", "other"):
        streammerge.merge(base, good if name == "good" else other, tmp / f"single-{name}", threads=1)
        assert ht.tree_digest(outs / name) == ht.tree_digest(tmp / f"single-{name}"), name
    streammerge.merge(base, [good, other], tmp / "single-mix", weights=[0.5, 0.5], threads=1)
    assert ht.tree_digest(outs / "mix") == ht.tree_digest(tmp / "single-mix")
    assert sorted(os.listdir(outs)) == ["good", "mix", "other"]
    assert os.listdir(full) == []


def test_interrupt_cleans_up_every_job(tiny, monkeypatch):
    from streammerge import batch
    from streammerge.engine import rows as rows_mod
    from streammerge.errors import Interrupted

    tmp, base, good, other, *_ = tiny
    calls = []
    real_source = rows_mod.TensorRows.source

    def source(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real_source(self, *args, **kwargs)

    monkeypatch.setattr(rows_mod.TensorRows, "source", source)
    outs = tmp / "outs"
    jobs = [{"adapter": str(a), "output": str(outs / a.name)} for a in (good, other)]
    with pytest.raises(Interrupted, match="interrupted"):
        batch.merge_many(_spec(base, jobs, tmp), threads=2)
    assert len(calls) == 5 and os.listdir(outs) == []


def test_single_job_through_merge_many_equals_merge(tiny):
    from streammerge.batch import merge_many

    tmp, base, good, *_ = tiny
    [r] = merge_many(_spec(base, [{"adapter": str(good), "output": str(tmp / "one")}], tmp, dtype="f16"))
    assert r.ok and r.exit_code == 0 and r.summary.tensors_merged == 6
    streammerge.merge(base, good, tmp / "ref", dtype="f16")
    assert ht.tree_digest(tmp / "one") == ht.tree_digest(tmp / "ref")


@pytest.mark.parametrize("dtype", ["bf16", "keep"])
def test_quantized_base_batch_equals_single_merges_for_any_thread_count(tmp_path, dtype):
    """An FP8 block-wise base: its rows dequantized once per block for every job (bf16), or the merged tensors
    re-quantized per job (keep); each output byte for byte the single merge's, on one thread or several."""
    import quant_fixtures as qf

    from streammerge.batch import merge_many

    ck = qf.make_fp8_block(tmp_path, "qwen3_moe", (16, 16), torch.bfloat16, shards=2)
    adapters = [vh.save_adapter(vh.load_causal(ck.source), tmp_path / f"a{i}", seed=5 + i, r=4 * (i + 1),
                                target_modules=targets)
                for i, targets in enumerate((["q_proj", "v_proj"], ["k_proj", "o_proj", "v_proj"]))]
    options = dict(dtype=dtype, max_memory="1MB")
    singles = {}
    for a in adapters:
        streammerge.merge(ck.path, a, tmp_path / f"single-{a.name}", threads=1, **options)
        singles[a.name] = ht.tree_digest(tmp_path / f"single-{a.name}")
    streammerge.merge(ck.path, adapters, tmp_path / "single-mix", weights=[0.6, 0.4], threads=1, **options)
    threaded = streammerge.merge(ck.path, adapters[0], tmp_path / "threads", threads=3, **options)
    assert ht.tree_digest(tmp_path / "threads") == singles["a0"] and threaded.tensors_merged > 0
    jobs = [{"adapter": str(a), "output": str(tmp_path / "batch" / a.name)} for a in adapters]
    jobs.append({"adapters": [str(a) for a in adapters], "weights": [0.6, 0.4], "output": str(tmp_path / "batch/mix")})
    results = merge_many(_spec(ck.path, jobs, tmp_path, **options), threads=2)
    assert all(r.ok for r in results), [r.error for r in results]
    for a in adapters:
        assert ht.tree_digest(tmp_path / "batch" / a.name) == singles[a.name], a.name
    assert ht.tree_digest(tmp_path / "batch/mix") == ht.tree_digest(tmp_path / "single-mix")
    assert bool(results[0].summary.requantized) == (dtype == "keep")
