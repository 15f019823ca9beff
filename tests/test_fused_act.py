"""The MLP's activation product in C (rayeval.eval.fused, kernels/elementwise.c): against the
fp32 function it computes, on both activations, odd lengths, extreme inputs and 1-2 threads; the
fallback for what it does not take; the engine identity it implies.  On a CPU without
AVX512-BF16 (or without a C compiler) the kernel does not load and the kernel tests skip."""

from __future__ import annotations

import pytest

from rayeval.eval import fused

lib = fused.c_act_lib()
needs_kernel = pytest.mark.skipif(lib is None, reason="no AVX512-BF16 CPU or no C compiler here")


def _want(act, g, u):
    """In fp32: SiLU, or the tanh GELU in its sigmoid form (the same function; torch's tanh form
    cancels to exactly 0 below x = -5 where this one keeps values under 1e-6)."""
    import torch

    x = g.float()
    a = x * torch.sigmoid(x if act == "silu" else fused._GELU_K * (x + 0.044715 * x ** 3))
    return a * u.float()


@needs_kernel
@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("shape", [(1, 1), (3, 37), (257, 1536)])
@pytest.mark.parametrize("threads", [1, 2])
def test_c_act_mul_equals_the_fp32_function_to_bf16_rounding(act, shape, threads):
    import torch

    g = (torch.randn(shape, generator=torch.Generator().manual_seed(shape[1])) * 4).to(torch.bfloat16)
    g.view(-1)[:4] = torch.tensor([-100.0, 100.0, 0.0, -0.5])[: g.numel()]   # exp's overflow / underflow ends
    u = torch.randn(shape, generator=torch.Generator().manual_seed(7)).to(torch.bfloat16)
    called = []
    fn = fused._c_act_mul(act, lambda g, u: called.append(1))
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = fn(g, u)
    finally:
        torch.set_num_threads(old)
    assert not called and got.dtype == torch.bfloat16 and got.shape == g.shape
    want = _want(act, g, u)
    assert torch.isfinite(got).all()
    # one rounding to bf16 of an fp32 value: within half an ulp of it (2**-9 relative), plus the
    # exp polynomial's 2.4e-6
    err = (got.float() - want).abs()
    assert bool((err <= want.abs() * (2 ** -8) + 1e-30).all()), err.max()
    eager = torch.nn.functional.silu(g.float()) if act == "silu" else torch.nn.functional.gelu(g.float(), approximate="tanh")
    assert torch.allclose(got.float(), eager * u.float(), rtol=2 ** -7, atol=1e-5)
    assert abs(got.view(-1)[0].item()) < 1e-30                 # act(-100): 0 to fp32's smallest normals
    if g.numel() > 1:
        assert got.view(-1)[1].item() == pytest.approx(100.0 * u.view(-1)[1].item(), rel=2 ** -7)   # act(100) = 100


@needs_kernel
def test_c_act_mul_leaves_what_it_does_not_take_to_the_fallback():
    import torch

    seen = []

    def fallback(g, u):
        seen.append((g.dtype, g.is_contiguous()))
        return _want("silu", g, u).to(g.dtype)

    fn = fused._c_act_mul("silu", fallback)
    g, u = torch.randn(8, 32), torch.randn(8, 32)
    fn(g, u)                                                   # fp32
    gb, ub = g.to(torch.bfloat16), u.to(torch.bfloat16)
    fn(gb.t(), ub.t())                                         # not contiguous
    fn(gb, ub[:1].contiguous())                                # shapes differ (u broadcast)
    assert seen == [(torch.float32, True), (torch.bfloat16, False), (torch.bfloat16, True)]
    assert torch.equal(fn(gb, ub), fn(gb.clone(), ub.clone())) and len(seen) == 3


def test_kernel_identity_follows_the_host_and_the_switch(monkeypatch):
    assert fused.kernels_version("float32") == fused.KERNELS
    assert fused.kernels_version("bfloat16") == (fused.KERNELS_C if fused.c_act_available() else fused.KERNELS)
    monkeypatch.setenv("RAYEVAL_CPU_KERNELS", "0")
    assert not fused.c_act_available() and fused.kernels_version("bfloat16") == fused.KERNELS
    from rayeval.eval.engines import engine_identity

    assert engine_identity("hf", "smollm2-135m", {"dtype": "bfloat16"})["kernels"] == fused.KERNELS
    monkeypatch.delenv("RAYEVAL_CPU_KERNELS")
    assert engine_identity("hf", "smollm2-135m", {"dtype": "bfloat16"})["kernels"] == fused.kernels_version("bfloat16")
