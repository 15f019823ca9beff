"""The decoder layers' elementwise kernels in C (rayeval.eval.fused, kernels/elementwise.c): the
MLP's activation product, RMSNorm alone and with its residual add, and the rotary embedding,
against eager PyTorch's functions they replace (both activations, every norm mode, the layouts
the engine passes, odd sizes, extreme inputs, 1-2 threads); the fallback for what they do not
take; the engine identity they imply.  On a CPU without AVX512-BF16 (or without a C compiler)
the kernels do not load and the kernel tests skip."""

from __future__ import annotations

import pytest

from rayeval.eval import fused

lib = fused.c_kernels()
needs_kernel = pytest.mark.skipif(lib is None, reason="no AVX512-BF16 CPU or no C compiler here")


def _want(act, g, u):
    """In fp32: SiLU, or the tanh GELU in its sigmoid form (the same function; torch's tanh form
    cancels to exactly 0 below x = -5 where this one keeps values under 1e-6)."""
    import torch

    x = g.float()
    a = x * torch.sigmoid(x if act == "silu" else fused._GELU_K * (x + 0.044715 * x ** 3))
    return a.to(torch.bfloat16).float() * u.float()     # the activation rounded to bf16, as eager rounds it


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
    # the product's rounding to bf16 (half an ulp: up to 2**-8 relative) and, where the exp
    # polynomial's 2.4e-6 moved the activation's own rounding, one ulp of it (up to 2**-7)
    err = (got.float() - want).abs()
    assert bool((err <= want.abs() * 3 * 2 ** -8 + 1e-30).all()), err.max()
    # eager's own result (its two roundings) exactly, but where the exp polynomial moved a rounding
    normal = want.abs() > 1e-6      # below it: the clamped exp's ends, 0 to fp32 (checked above)
    assert float((got != want.to(torch.bfloat16))[normal].float().sum()) <= 0.01 * int(normal.sum())
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
    assert fused.kernels_version("bfloat16") == (fused.KERNELS_C if fused.c_kernels_available() else fused.KERNELS)
    monkeypatch.setenv("RAYEVAL_CPU_KERNELS", "0")
    assert not fused.c_kernels_available() and fused.kernels_version("bfloat16") == fused.KERNELS
    from rayeval.eval.engines import engine_identity

    assert engine_identity("hf", "smollm2-135m", {"dtype": "bfloat16"})["kernels"] == fused.KERNELS
    monkeypatch.delenv("RAYEVAL_CPU_KERNELS")
    assert engine_identity("hf", "smollm2-135m", {"dtype": "bfloat16"})["kernels"] == fused.kernels_version("bfloat16")


def _threads(n):
    import torch

    class _T:
        def __enter__(self):
            self.old = torch.get_num_threads()
            torch.set_num_threads(n)

        def __exit__(self, *a):
            torch.set_num_threads(self.old)
    return _T()


@needs_kernel
@pytest.mark.parametrize("key", ["rms_llama", "rms_gemma", "add_rms_llama", "norm_add_rms_gemma", "norm_add_gemma"])
@pytest.mark.parametrize("threads", [1, 2])
def test_c_norms_equal_eager_pytorch(key, threads):
    import torch

    g = torch.Generator().manual_seed(len(key))
    bf = torch.bfloat16
    D = 640
    x = (torch.randn(37, D, generator=g) * 3).to(bf)
    r = (torch.randn(37, D, generator=g) * 5).to(bf)
    w1, w2 = (torch.randn(D, generator=g) * 0.5).to(bf), (torch.randn(D, generator=g) * 0.5).to(bf)
    eager = {"rms_llama": fused._rms_llama, "rms_gemma": fused._rms_gemma, "add_rms_llama": fused._add_rms_llama,
             "norm_add_rms_gemma": fused._norm_add_rms_gemma, "norm_add_gemma": fused._norm_add_gemma}[key]
    called = []
    fn = fused._c_norm(key, lambda *a: called.append(1))
    args = {"rms_llama": (x, w1), "rms_gemma": (x, w1), "add_rms_llama": (x, r, w1),
            "norm_add_rms_gemma": (x, r, w1, w2), "norm_add_gemma": (x, r, w1)}[key]
    with _threads(threads):
        got = fn(*args, 1e-6)
    want = eager(*args, 1e-6)
    got, want = (got, want) if isinstance(want, tuple) else ((got,), (want,))
    assert not called and len(got) == len(want)
    for a, b in zip(got, want):
        assert a.dtype == bf and a.shape == b.shape
        # eager's roundings; mean(x^2) summed in another order may move one rounding by an ulp
        assert float((a != b).float().mean()) < 0.01
        assert torch.allclose(a.float(), b.float(), rtol=2 ** -7, atol=1e-6)


@needs_kernel
@pytest.mark.parametrize("shape,view", [((3, 5, 64), None), ((3, 5, 64), "slice"), ((1, 7, 9, 64), "heads"),
                                         ((1, 9, 4, 256), "heads")])
def test_c_norm_reads_rows_in_place(shape, view):
    """The norms alone read a [1, H, T, D] view of token-major rows (Gemma-3's q/k norms) and
    sliced rows without a copy; the result is contiguous in the input's shape, as the compiled
    kernel's was."""
    import torch

    x = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    if view == "slice":
        x = x[:, :2]
    elif view == "heads":
        x = x.transpose(1, 2)          # [1, H, T, D] over a [1, T, H, D] buffer
    w = torch.randn(shape[-1]).to(torch.bfloat16)
    for key, eager in (("rms_llama", fused._rms_llama), ("rms_gemma", fused._rms_gemma)):
        got = fused._c_norm(key, None)(x, w, 1e-6)
        want = eager(x, w, 1e-6)
        assert got.is_contiguous() and got.shape == x.shape
        assert float((got != want).float().mean()) < 0.01
        assert torch.allclose(got.float(), want.float(), rtol=2 ** -7, atol=1e-6)


@needs_kernel
@pytest.mark.parametrize("H,T,D,token_major", [(9, 13, 64, True), (4, 5, 256, False), (3, 1, 64, True), (1, 40, 32, False)])
@pytest.mark.parametrize("threads", [1, 2])
def test_c_rotary_equals_transformers(H, T, D, token_major, threads):
    import torch
    from transformers.models.llama import modeling_llama

    # transformers' own function, also where an engine built earlier in this process installed its kernel
    rot = modeling_llama.apply_rotary_pos_emb
    apply_rotary_pos_emb = getattr(rot, "_rayeval_plain", rot)
    g = torch.Generator().manual_seed(H * T)
    bf = torch.bfloat16
    if token_major:   # as Llama's projections leave q/k: a transposed [1, T, H, D]
        q = torch.randn(1, T, H, D, generator=g).to(bf).transpose(1, 2)
        k = torch.randn(1, T, 1, D, generator=g).to(bf).transpose(1, 2)
    else:             # head-major, as after Gemma-3's q/k norms
        q, k = torch.randn(1, H, T, D, generator=g).to(bf), torch.randn(1, 1, T, D, generator=g).to(bf)
    ang = torch.randn(1, T, D // 2, generator=g)
    cos, sin = torch.cat([ang.cos()] * 2, -1).to(bf), torch.cat([ang.sin()] * 2, -1).to(bf)
    called = []
    with _threads(threads):
        got = fused._c_rotary(lambda *a: called.append(1))(q, k, cos, sin)
    want = apply_rotary_pos_emb(q, k, cos, sin)
    assert not called
    for a, b, x in zip(got, want, (q, k)):
        assert torch.equal(a, b)                  # eager's three roundings, exactly
        assert a.stride() == x.stride()           # in its input's layout


@needs_kernel
def test_c_norm_and_rotary_leave_what_they_do_not_take_to_the_fallback():
    import torch

    seen = []
    norm = fused._c_norm("rms_llama", lambda x, w, eps: seen.append("norm") or x)
    x32 = torch.randn(4, 64)
    norm(x32, torch.ones(64), 1e-6)                                          # fp32
    norm(torch.randn(4, 40).to(torch.bfloat16), torch.ones(40, dtype=torch.bfloat16), 1e-6)   # D % 16
    rot = fused._c_rotary(lambda *a: seen.append("rotary") or a[:2])
    q = torch.randn(2, 3, 5, 64).to(torch.bfloat16)                           # a batch of two
    cs = torch.randn(2, 5, 64).to(torch.bfloat16)
    rot(q, q, cs, cs)
    assert seen == ["norm", "norm", "rotary"]
