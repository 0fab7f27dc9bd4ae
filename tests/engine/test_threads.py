"""Row blocks computed on several threads: the output bytes are the same for any thread count (LoRA, DoRA whose
column norms are summed over every block first, trainable tokens, casts to float16), the blocks really are
spread over the threads, and `--threads` / `threads=` are checked like every other option."""

from __future__ import annotations

import threading

import helpers_tiny as ht
import pytest
import variant_helpers as vh

import streammerge
from streammerge.engine import rows as rows_mod

SMALL_BLOCKS = "1MB"  # 64 KiB float32 blocks: every tensor of the tiny models spans many blocks


@pytest.fixture(scope="module")
def wd(tmp_path_factory):
    return tmp_path_factory.mktemp("threads")


def _is_mag(n):
    return "lora_magnitude_vector" in n


@pytest.fixture(scope="module")
def cases(wd):
    """(base, adapter) pairs covering the operations whose blocks depend on each other or are not products."""
    llama = vh.build_base("llama", wd / "llama", vocab_size=4096)
    gpt2 = vh.build_base("gpt2", wd / "gpt2", vocab_size=4096, bos_token_id=4095, eos_token_id=4095)
    magnitude = dict(mutate=lambda pm: vh.perturb(pm, _is_mag, multiplicative=True))
    return {
        # DoRA on the embedding: norms per column over all 4096 rows (a prepass), and on Linear rows
        "dora-embedding": (llama, vh.save_adapter(vh.load_causal(llama), wd / "a-dora-emb", use_dora=True,
                                                  target_modules=["embed_tokens", "q_proj"], **magnitude)),
        # DoRA on GPT-2's Conv1D: column norms of [in, out] weights
        "dora-conv1d": (gpt2, vh.save_adapter(vh.load_causal(gpt2), wd / "a-dora-gpt2", use_dora=True,
                                              fan_in_fan_out=True, target_modules=["c_attn", "c_fc"], **magnitude)),
        # trainable-token rows written verbatim into some blocks, LoRA on every projection and the head
        "tokens": (llama, vh.save_adapter(
            vh.load_causal(llama), wd / "a-tok", target_modules=["q_proj", "v_proj", "down_proj", "lm_head"],
            trainable_token_indices=[3, 1000, 2047, 4095],
            mutate=lambda pm: vh.perturb(pm, lambda n: "trainable_tokens_delta" in n))),
    }


def _digest(out):
    return ht.tree_digest(out)


@pytest.mark.parametrize("case", ["dora-embedding", "dora-conv1d", "tokens"])
@pytest.mark.parametrize("dtype", ["bf16", "f16"])
def test_bytes_do_not_depend_on_the_thread_count(cases, wd, case, dtype):
    base, adapter = cases[case]
    digests = {}
    for threads in (1, 3, 4):
        out = wd / f"out-{case}-{dtype}-{threads}"
        streammerge.merge(base, adapter, out, dtype=dtype, max_memory=SMALL_BLOCKS, threads=threads)
        digests[threads] = _digest(out)
    assert digests[1] == digests[3] == digests[4], case


def test_blocks_are_computed_on_several_threads(cases, wd, monkeypatch):
    base, adapter = cases["tokens"]
    seen: set[int] = set()
    real = rows_mod.TensorRows.finish

    def finish(self, *args, **kwargs):
        seen.add(threading.get_ident())
        threading.Event().wait(0.001)  # no thread can take every block before the others wake
        return real(self, *args, **kwargs)

    monkeypatch.setattr(rows_mod.TensorRows, "finish", finish)
    streammerge.merge(base, adapter, wd / "out-spread", max_memory=SMALL_BLOCKS, threads=3)
    assert len(seen) == 3 and threading.get_ident() not in seen


def test_threads_option(small_pair, tmp_path, capsys):
    base, adapter = small_pair
    code, _, err = ht.run_cli(["--base", base, "--adapter", adapter, "--output", tmp_path / "o", "--threads", "0"],
                              capsys)
    assert code == 2 and err.startswith("error: argument --threads") and "positive integer" in err, err
    code, _, err = ht.run_cli(["--base", base, "--adapter", adapter, "--output", tmp_path / "o", "--threads", "2",
                               "--no-progress"], capsys)
    assert code == 0, err
    with pytest.raises(ValueError, match="positive integer"):
        streammerge.merge(base, adapter, tmp_path / "o2", threads=0)
    assert not (tmp_path / "o2").exists()


def test_default_is_the_cores_this_process_may_use(monkeypatch):
    from streammerge.options import check_threads, default_threads

    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 3, 5})
    assert default_threads() == 3 and check_threads(None) == 3 and check_threads(7) == 7
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError):
            check_threads(bad)


@pytest.fixture(scope="module")
def small_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("small")
    base = ht.make_base(root / "base")
    return base, ht.make_adapter(root / "adapter", base)
