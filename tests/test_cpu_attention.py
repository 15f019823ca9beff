"""The AMX attention kernel of packed passes (rayeval.eval.cpu_attention): against PyTorch's SDPA
on random groups, and in the HF engine against its SDPA path.  On a CPU without AMX-BF16 (or
without a C compiler) the kernel does not load and these tests skip; the engine then runs SDPA."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from rayeval.eval import cpu_attention as ca

kernel = ca.load()
needs_amx = pytest.mark.skipif(kernel is None, reason="no AMX-BF16 / AVX512-BF16 CPU or no C compiler here")


@needs_amx
@pytest.mark.parametrize("rows,qmax,pmax,hkv,fold,D", [
    (1, 1, 0, 1, 1, 64),        # one token alone
    (64, 63, 21, 3, 3, 64),     # SmolLM2-135M's zero-shot groups
    (4, 40, 700, 3, 3, 64),     # few-shot: long parents
    (3, 17, 45, 1, 4, 256),     # Gemma-3's heads
    (2, 16, 16, 2, 2, 32),      # exactly tile-sized
])
@pytest.mark.parametrize("threads", [1, 2])
def test_kernel_equals_sdpa_on_random_groups(rows, qmax, pmax, hkv, fold, D, threads):
    import torch

    grp = ca.random_group(rows, qmax, pmax, hkv, fold, D, seed=rows + qmax)
    got = ca.run_group(kernel, grp, D ** -0.5, threads=threads).float()
    want = ca.reference(**{n: grp[n] for n in ("qrows", "take", "put", "n_out", "k0", "v0", "sk", "sv", "qidx",
                                                "pidx", "bias", "rows", "qmax", "pmax")}, scale=D ** -0.5).float()
    exact = ca.reference(**{n: (grp[n].float() if torch.is_tensor(grp[n]) and grp[n].is_floating_point() else grp[n])
                            for n in ("qrows", "take", "put", "n_out", "k0", "v0", "sk", "sv", "qidx", "pidx", "bias",
                                      "rows", "qmax", "pmax")}, scale=D ** -0.5)
    written = torch.zeros(grp["n_out"], dtype=torch.bool)
    written[grp["put"]] = True
    assert torch.isfinite(got).all()
    assert (got[~written] == 0).all()                      # rows nobody puts to are left alone
    # as close to the fp32 answer as SDPA's own bf16 kernel is (both round probabilities to bf16)
    err, sdpa_err = (got - exact).abs().max(), (want - exact).abs().max()
    assert err <= 1.5 * sdpa_err + 2e-3, (err, sdpa_err)


@needs_amx
def test_kernel_is_built_once_per_host_and_reused(tmp_path):
    code = ("from rayeval.config import cache_dir; from rayeval.eval import cpu_attention as ca; "
            "k = ca.load(); print(k is not None, sorted(p.name for p in (cache_dir() / 'kernels').glob('*.so')))")
    env = {**os.environ, "RAYEVAL_CACHE": str(tmp_path)}
    first = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    built = sorted((tmp_path / "kernels").glob("*.so"))
    assert first.startswith("True") and len(built) == 1
    mtime = built[0].stat().st_mtime_ns
    second = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert second == first and built[0].stat().st_mtime_ns == mtime   # loaded, not rebuilt
    off = subprocess.run([sys.executable, "-c", code], env={**env, "RAYEVAL_CPU_ATTENTION": "0"},
                         capture_output=True, text=True, check=True).stdout
    assert off.startswith("False")


def _tiny_llama(folder, hidden: int, heads: int) -> str:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from rayeval.models import resolve_model

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(str(resolve_model("smollm2-135m")))
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=heads, num_key_value_heads=1, max_position_embeddings=2048)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def tiny_llama64(tmp_path_factory):
    """A tiny Llama with SmolLM2's head size (64) and grouped-query attention."""
    return _tiny_llama(tmp_path_factory.mktemp("tiny64") / "llama", hidden=192, heads=3)


@needs_amx
@pytest.mark.model
def test_engine_attends_on_amx_tiles_as_sdpa_does(tiny_llama64, monkeypatch):
    import math

    from rayeval.eval.engines import make_engine
    from rayeval.eval.packed import KVStore
    from test_eval_sharing import _grid_requests, _numbers

    monkeypatch.setattr(KVStore, "unwritten", float("nan"))   # a read of an unwritten slot shows
    calls = []
    real_call = ca.Kernel.__call__
    monkeypatch.setattr(ca.Kernel, "__call__", lambda self, *a, **k: calls.append(a[11]) or real_call(self, *a, **k))
    reqs = _grid_requests()
    bf = {"dtype": "bfloat16", "num_threads": 2, "fuse": False}
    amx = make_engine("hf", tiny_llama64, {**bf, "attention": "amx"})
    sdpa = make_engine("hf", tiny_llama64, {**bf, "attention": "sdpa"})
    alone = make_engine("hf", tiny_llama64, {**bf, "attention": "amx", "prefix_sharing": False})
    assert amx.attention_kernel is not None and sdpa.attention_kernel is None
    assert amx.identity != sdpa.identity          # cached scores say which kernel made them
    a, s, n = amx.score(reqs), sdpa.score(reqs), alone.score(reqs)
    assert calls and any(p > 0 for p in calls)                # groups with parents ran on the kernel
    assert all(math.isfinite(x) for x in _numbers(a))
    # bf16 rounding apart, the same numbers: with SDPA, and without prefix sharing
    assert max(abs(x - y) for x, y in zip(_numbers(a), _numbers(s))) < 0.05
    assert max(abs(x - y) for x, y in zip(_numbers(a), _numbers(n))) < 0.05


def test_attention_option_is_checked(tmp_path):
    from rayeval.eval.engines import make_engine

    with pytest.raises(ValueError, match="attention: 'flash' is not one of auto, sdpa, amx"):
        make_engine("hf", "smollm2-135m", {"attention": "flash"})


@needs_amx
@pytest.mark.model
def test_the_driver_knows_which_attention_an_engine_will_use(tiny_llama64, tmp_path):
    """The plan counts score-cache hits under the identity the driver computes: it must be the one
    the engine writes under (the kernel's for head size 64; SDPA's for a head size it does not take)."""
    from rayeval.eval.engines import engine_identity, make_engine

    bf = {"dtype": "bfloat16", "num_threads": 1, "fuse": False}
    head16 = _tiny_llama(tmp_path / "head16", hidden=64, heads=4)
    for path, kernel in ((tiny_llama64, True), (head16, False)):
        eng = make_engine("hf", path, bf)
        assert (eng.attention_kernel is not None) == kernel
        assert eng.identity == engine_identity("hf", path, bf)
        assert ("attention" in eng.identity) == kernel
    with pytest.raises(ValueError, match="this model's: 16"):
        make_engine("hf", head16, {**bf, "attention": "amx"})
