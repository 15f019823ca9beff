"""Fused elementwise kernels for the HF engine on a bf16 CPU (AMX / AVX512-BF16).

With native bf16 matmuls the decoder's linear layers run 4-5x faster than in fp32, and what is
left of a forward pass is mostly elementwise work that eager PyTorch runs one op at a time over
bf16 tensors: RMSNorm (an fp32 upcast, pow, mean, rsqrt, two multiplies and a cast back), the
MLP's ``act(gate) * up`` and the rotary embedding.  A profile of zero-shot MMLU scoring on
SmolLM2-135M put those at ~25% of the time against ~41% for every matmul (docs/benchmarks.md).
``fuse_elementwise(model)`` swaps them for ``torch.compile``-d functions (one compiled kernel per
kind, dynamic shapes, shared by every layer and every engine of the process).  The tanh GELU
(Gemma-3) is compiled in its sigmoid form, which the CPU kernel vectorises.

Nothing here changes what is computed: each replacement is checked against the module it
replaces on random inputs before it is installed (to bf16 rounding: one ulp), and a model whose
modules are not the known shapes keeps them.  Without a working ``torch.compile`` (no C++
compiler, say) every module stays as it was.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

log = logging.getLogger("rayeval.eval")

_COMPILED: dict[str, Any] = {}


def _rms_llama(x, w, eps: float):
    import torch

    h = x.float()
    return w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _rms_gemma(x, w, eps: float):
    import torch

    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (h * (1.0 + w.float())).type_as(x)


# 2 * sqrt(2 / pi): 0.5 * (1 + tanh(z)) == sigmoid(2 z)
_GELU_K = 1.5957691216057308


def _gelu_tanh_mul(g, u):
    """``gelu(g, approximate="tanh") * u`` through ``sigmoid`` instead of ``tanh`` (the same
    function): the compiled CPU kernel vectorises ``exp`` but not ``tanh``, 2.6x faster on
    Gemma-3's [2000, 2048] MLP (docs/benchmarks.md); computed in fp32 like the eager op."""
    import torch

    x = g.float()
    return (x * torch.sigmoid(_GELU_K * (x + 0.044715 * x * x * x)) * u.float()).to(g.dtype)


def _logsumexp_fp32(x):
    import torch

    return torch.logsumexp(x.float(), -1)


def logsumexp_fp32(compiled: bool = True):
    """``logsumexp(x.float(), -1)`` of 2-D ``x``; ``compiled``: as one kernel that reads ``x`` in
    its own dtype (no fp32 copy of it is written)."""
    return _compiled("logsumexp_fp32", _logsumexp_fp32) if compiled else _logsumexp_fp32


def _is_gelu_tanh(act) -> bool:
    name = type(act).__name__
    return name in ("GELUTanh", "PytorchGELUTanh", "NewGELUActivation", "FastGELUActivation") or (
        name == "GELU" and getattr(act, "approximate", "none") == "tanh")


def _compiled(key: str, fn):
    import torch

    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(fn, dynamic=True)
    return _COMPILED[key]


# Every compiled kernel sees one shape family only (2-D, more than one row; rotary: length > 1,
# and either batch > 1 or one packed sequence, a kernel each), so it compiles once with dynamic
# sizes and never again mid-run (a size of 1 would be a specialisation of its own); the rare
# size-1 call runs the eager module.

def _norm_forward(m, fn, eps: float, eager):
    def forward(x):
        # 2-D, so one dynamic kernel serves [B, T, D] hidden states and Gemma's [B, H, T, d] q/k norms
        if x.numel() < 2 * x.shape[-1]:
            return eager(x)
        return fn(x.reshape(-1, x.shape[-1]), m.weight, eps).view(x.shape)
    return forward


def _mlp_forward(m, act_mul, eager):
    def forward(x):
        if x.numel() < 2 * x.shape[-1]:
            return eager(x)
        g, u = m.gate_proj(x), m.up_proj(x)
        return m.down_proj(act_mul(g.reshape(-1, g.shape[-1]), u.reshape(-1, u.shape[-1])).view(g.shape))
    return forward


def _rotary_forward(fused, fused_one, eager):
    """``fused`` for batches, ``fused_one`` for one packed sequence (batch 1: its own shape family)."""
    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        if args or kwargs or q.shape[2] < 2:
            return eager(q, k, cos, sin, *args, **kwargs)
        return (fused if q.shape[0] > 1 else fused_one)(q, k, cos, sin)
    apply_rotary_pos_emb._rayeval_fused = True
    return apply_rotary_pos_emb


def _same(a, b, dtype) -> bool:
    """Equal to rounding, relative to the output's scale (one bf16 ulp is 2**-8 of a value; a
    sum over many rounded terms, as after the MLP's down projection, stays within a few)."""
    import torch

    tol = 0.03 if dtype == torch.bfloat16 else 1e-4
    a, b = a.float(), b.float()
    return bool((a - b).abs().max() <= tol * b.abs().max())


def fuse_elementwise(model) -> list[str]:
    """Install the fused kernels in ``model`` (in place); returns what was fused (e.g.
    ``["LlamaRMSNorm", "LlamaMLP", "apply_rotary_pos_emb"]``), empty when nothing was."""
    import torch

    with torch.inference_mode():  # the engine's mode: kernels compiled outside it would recompile inside
        return _fuse(model, torch)


def _fuse(model, torch) -> list[str]:
    done: list[str] = []
    dtype = next(model.parameters()).dtype
    checked: dict[str, bool] = {}
    cfg = getattr(model, "config", None)
    heads = int(getattr(cfg, "num_attention_heads", 4) or 4)
    kv_heads = int(getattr(cfg, "num_key_value_heads", heads) or heads)
    head_dim = int(getattr(cfg, "head_dim", 0) or (getattr(cfg, "hidden_size", 8 * heads) // heads))
    try:
        for m in model.modules():
            cls = type(m).__name__
            if cls.endswith("RMSNorm") and getattr(m, "weight", None) is not None:
                gemma = cls.startswith("Gemma")
                fn = _compiled("rms_gemma" if gemma else "rms_llama", _rms_gemma if gemma else _rms_llama)
                eps = float(getattr(m, "variance_epsilon", getattr(m, "eps", 1e-6)))
                new = _norm_forward(m, fn, eps, m.forward)
                if cls not in checked:
                    x = torch.randn(3, 5, m.weight.shape[-1], dtype=dtype)
                    checked[cls] = all(_same(new(y), m.forward(y), dtype) for y in (x, x[:, :2]))
                if checked[cls]:
                    m.forward = new
            elif all(hasattr(m, a) for a in ("gate_proj", "up_proj", "down_proj", "act_fn")):
                act = m.act_fn
                if _is_gelu_tanh(act):
                    act_mul = _compiled("gelu_tanh_mul", _gelu_tanh_mul)
                else:
                    key = f"act_mul:{type(act).__name__}:{getattr(act, 'approximate', '')}"
                    act_mul = _compiled(key, lambda g, u, act=act: act(g) * u)
                new = _mlp_forward(m, act_mul, m.forward)
                if cls not in checked:
                    x = torch.randn(2, 7, m.gate_proj.in_features, dtype=dtype)
                    checked[cls] = all(_same(new(y), m.forward(y), dtype) for y in (x, x[:1]))
                if checked[cls]:
                    m.forward = new
        done = sorted(c for c, ok in checked.items() if ok)
        mod = importlib.import_module(type(model).__module__)
        rot = getattr(mod, "apply_rotary_pos_emb", None)
        if rot is not None and hasattr(rot, "_rayeval_fused"):   # an earlier engine of this process
            done.append("apply_rotary_pos_emb")
        elif rot is not None:
            fused = _rotary_forward(_compiled(f"rotary:{mod.__name__}", rot), _compiled(f"rotary1:{mod.__name__}", rot), rot)
            ok = True
            for b, t in ((2, 6), (3, 5), (1, 7), (1, 4), (1, 1)):   # the model's own head counts
                q, k = torch.randn(b, heads, t, head_dim, dtype=dtype), torch.randn(b, kv_heads, t, head_dim, dtype=dtype)
                cos, sin = torch.randn(b, t, head_dim, dtype=dtype), torch.randn(b, t, head_dim, dtype=dtype)
                ok = ok and all(_same(x, y, dtype) for x, y in zip(fused(q, k, cos, sin), rot(q, k, cos, sin)))
            if ok:
                mod.apply_rotary_pos_emb = fused   # the attention modules look it up by module global
                done.append("apply_rotary_pos_emb")
    except Exception as e:  # no C++ compiler, an unsupported op: keep the eager modules
        log.warning("fused kernels unavailable (%s: %s); running eager", type(e).__name__, str(e).split("\n")[0])
        return done
    return done
