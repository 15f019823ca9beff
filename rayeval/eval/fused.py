"""Fused elementwise kernels for the HF engine on a bf16 CPU (AMX / AVX512-BF16).

With native bf16 matmuls the decoder's linear layers run 4-5x faster than in fp32, and what is
left of a forward pass is mostly elementwise work that eager PyTorch runs one op at a time over
bf16 tensors: RMSNorm (an fp32 upcast, pow, mean, rsqrt, two multiplies and a cast back), the
MLP's ``act(gate) * up`` and the rotary embedding.  A profile of zero-shot MMLU scoring on
SmolLM2-135M put those at ~25% of the time against ~41% for every matmul (docs/benchmarks.md).
``fuse_elementwise(model)`` swaps them for ``torch.compile``-d functions (one compiled kernel per
kind, dynamic shapes, shared by every layer and every engine of the process).  The tanh GELU
(Gemma-3) is compiled in its sigmoid form, which the CPU kernel vectorises.

On a CPU with AVX512-BF16 (bf16 models) the same functions run as C kernels instead
(``kernels/elementwise.c``, built once per host like the attention kernel, :func:`c_kernels`):
RMSNorm alone and with its residual add, the rotary embedding of a packed sequence and the MLP's
``act(gate) * up`` (SiLU, tanh GELU), with eager PyTorch's roundings to bf16.  Nothing is then
compiled at an engine's start (dynamo's tracing and inductor's probe were 2.5-3.5 s of each
actor's start), the MLP's product runs 1.3x faster than the compiled kernel in the engine (an
exp polynomial instead of Sleef's), and Gemma-3's q/k norms read the projections' token-major
rows in place instead of a head-major copy.  What a C kernel does not take (another dtype, a
layout it does not know) goes to the compiled function.

Nothing here changes what is computed: each replacement is checked against the module it
replaces on random inputs before it is installed (to bf16 rounding: one ulp), and a model whose
modules are not the known shapes keeps them.  Without a working ``torch.compile`` (no C++
compiler, say) every module stays as it was.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib
import json
import logging
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger("rayeval.eval")

_COMPILED: dict[str, Any] = {}

# What the score cache's engine identity says of these kernels: a new value whenever what they
# compute changes, even by rounding (fused residual adds and halves-rotary: the second set; the
# engine's vocabulary head in chunks of the vocabulary, which comes with them: the third)
KERNELS = "fused-3"
KERNELS_C = "fused-3c"

C_SOURCE = Path(__file__).with_name("kernels") / "elementwise.c"
C_FLAGS = ["-O3", "-fopenmp", "-fPIC", "-shared", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mfma"]
C_NEEDS = {"avx512f", "avx512bw", "avx512vl", "avx512_bf16"}
_ACTS = {"silu": 0, "gelu_tanh": 1}   # the C kernel's act codes
# rayeval_rms's modes: the function each replaces
_NORM_MODES = {"rms_llama": 0, "rms_gemma": 1, "add_rms_llama": 2, "norm_add_rms_gemma": 3, "norm_add_gemma": 4}


def c_kernels_available() -> bool:
    """Whether this host can build the C kernels (CPU flags, a C compiler; nothing is compiled):
    what the engine identity's ``kernels`` goes by, on the driver as in the actors.
    ``RAYEVAL_CPU_KERNELS=0`` turns them off."""
    from rayeval.host import kernel_host_ok

    return kernel_host_ok(C_NEEDS, "RAYEVAL_CPU_KERNELS")


def kernels_version(dtype: str) -> str:
    """The engine identity's ``kernels`` for fused engines of ``dtype`` on this host: the C
    kernels' set (bf16 on a host that can build them) or the compiled one."""
    return KERNELS_C if str(dtype) in ("bfloat16", "torch.bfloat16") and c_kernels_available() else KERNELS


@functools.cache
def c_kernels():
    """The C kernels (ctypes functions ``act_mul``, ``rms``, ``rotary``), built and loaded once per
    process; None where they cannot be."""
    if not c_kernels_available():
        return None
    from types import SimpleNamespace

    from rayeval.host import load_kernel

    try:
        lib = load_kernel(C_SOURCE, C_FLAGS)
        i64, p = ctypes.c_int64, ctypes.c_void_p
        sig = {"act_mul": [p, p, p, i64, ctypes.c_int, ctypes.c_int],
               "rms": [p, i64, i64, i64, i64, p, p, p, p, p, i64, ctypes.c_float, ctypes.c_int, ctypes.c_int],
               "rotary": [p, p, i64, i64, i64, i64, p, p, i64, ctypes.c_int]}
        out = {}
        for name, args in sig.items():
            fn = getattr(lib, f"rayeval_{name}")
            fn.argtypes, fn.restype = args, ctypes.c_int
            out[name] = fn
        return SimpleNamespace(**out)
    except (OSError, AttributeError, subprocess.CalledProcessError) as e:
        log.warning("C elementwise kernels unavailable (%s): the compiled ones stay", getattr(e, "stderr", None) or e)
        return None


def _is_bf16_cpu(*ts) -> bool:
    import torch

    return all(t.dtype == torch.bfloat16 and t.device.type == "cpu" for t in ts)


def _c(fn):
    fn._rayeval_c = True
    return fn


def _c_act_mul(act: str, fallback):
    """``act(g) * u`` by the C kernel for contiguous bf16 ``g``, ``u`` of one shape on the CPU,
    ``fallback`` (the compiled kernel) for anything else; ``fallback`` itself where the kernels
    are unavailable.  Checked against the eager module where it is installed, as every kernel here."""
    import torch

    lib = c_kernels()
    if lib is None:
        return fallback
    code = _ACTS[act]

    def act_mul(g, u):
        if not _is_bf16_cpu(g, u) or g.shape != u.shape or not g.is_contiguous() or not u.is_contiguous():
            return fallback(g, u)
        out = torch.empty_like(g)
        if lib.act_mul(g.data_ptr(), u.data_ptr(), out.data_ptr(), g.numel(), code, torch.get_num_threads()):
            raise RuntimeError(f"C activation kernel failed on act {act!r}")
        return out
    return _c(act_mul)


def _row_layout(x):
    """``(A, B, sa, sb)``: row ``a * B + b`` of ``x`` viewed as rows of its last dimension starts
    ``a * sa + b * sb`` elements in (its last dimension contiguous); None for another layout."""
    D = x.shape[-1]
    if x.stride(-1) != 1:
        return None
    if x.is_contiguous():
        return 1, x.numel() // max(D, 1), 0, D
    lead = [(n, st) for n, st in zip(x.shape[:-1], x.stride()[:-1]) if n != 1]
    if len(lead) == 2:
        return lead[0][0], lead[1][0], lead[0][1], lead[1][1]
    return None


def _c_norm(key: str, fallback):
    """``fallback`` (:func:`_rms_llama` ... :func:`_norm_add_gemma`, compiled) by the C kernel
    ``rayeval_rms`` in its mode for ``key``, same arguments and results; the norms alone take
    ``x`` of any shape whose rows :func:`_row_layout` reads (the result is contiguous, in ``x``'s
    shape), the layer adds 2-D contiguous rows.  ``fallback`` for anything else."""
    import torch

    lib = c_kernels()
    if lib is None:
        return fallback
    mode = _NORM_MODES[key]

    def run(x, r, w1, w2, h, y, eps, layout):
        A, B, sa, sb = layout
        rc = lib.rms(x.data_ptr(), A, B, sa, sb, r.data_ptr() if r is not None else None, w1.data_ptr(),
                     w2.data_ptr() if w2 is not None else None, h.data_ptr() if h is not None else None,
                     y.data_ptr() if y is not None else None, x.shape[-1], float(eps), mode, torch.get_num_threads())
        if rc:
            raise RuntimeError(f"C norm kernel failed ({key}, size {x.shape[-1]})")

    def fits(x, *ts) -> bool:
        D = x.shape[-1]
        return _is_bf16_cpu(x, *ts) and D % 16 == 0 and 0 < D <= 8192 and all(t.is_contiguous() for t in ts)

    if mode in (0, 1):
        def norm(x, w, eps):
            layout = _row_layout(x) if fits(x, w) and w.numel() == x.shape[-1] else None
            if layout is None:
                D = x.shape[-1]
                return fallback(*_tokens_dynamic(x.reshape(-1, D)), w, eps).view(x.shape)
            y = torch.empty(x.shape, dtype=x.dtype)
            run(x, None, w, None, None, y, eps, layout)
            return y
        return _c(norm)

    def rows_ok(x, r):
        return x.dim() == 2 and r.shape == x.shape and x.is_contiguous()

    if mode == 2:
        def add_rms(x, r, w, eps):
            if not (fits(x, r, w) and rows_ok(x, r)):
                return fallback(x, r, w, eps)
            h, y = torch.empty_like(x), torch.empty_like(x)
            run(x, r, w, None, h, y, eps, (1, x.shape[0], 0, x.shape[1]))
            return h, y
        return _c(add_rms)
    if mode == 3:
        def norm_add_rms(x, r, w1, w2, eps):
            if not (fits(x, r, w1, w2) and rows_ok(x, r)):
                return fallback(x, r, w1, w2, eps)
            h, y = torch.empty_like(x), torch.empty_like(x)
            run(x, r, w1, w2, h, y, eps, (1, x.shape[0], 0, x.shape[1]))
            return h, y
        return _c(norm_add_rms)

    def norm_add(x, r, w, eps):
        if not (fits(x, r, w) and rows_ok(x, r)):
            return fallback(x, r, w, eps)
        h = torch.empty_like(x)
        run(x, r, w, None, h, None, eps, (1, x.shape[0], 0, x.shape[1]))
        return h
    return _c(norm_add)


def _c_rotary(fallback):
    """The rotary embedding of one packed sequence (``q``, ``k`` ``[1, H, T, D]`` in any layout
    with D contiguous, ``cos``/``sin`` ``[1, T, D]``) by the C kernel, each result in its input's
    layout; ``fallback`` (the compiled :func:`_rotary_halves`) for anything else."""
    import torch

    lib = c_kernels()
    if lib is None:
        return fallback

    def rotary(q, k, cos, sin):
        if q.dim() != 4 or k.dim() != 4:
            return fallback(q, k, cos, sin)
        T, D = q.shape[2], q.shape[3]
        ok = (_is_bf16_cpu(q, k, cos, sin) and q.shape[0] == 1 and k.shape[0] == 1
              and k.shape[2:] == q.shape[2:] and D % 32 == 0 and q.stride(-1) == 1 and k.stride(-1) == 1
              and tuple(cos.shape) == (1, T, D) and tuple(sin.shape) == (1, T, D) and cos.is_contiguous()
              and sin.is_contiguous())
        if not ok:
            return fallback(q, k, cos, sin)
        outs = []
        for x in (q, k):
            o = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype)
            if lib.rotary(x.data_ptr(), o.data_ptr(), x.shape[1], T, x.stride(1), x.stride(2), cos.data_ptr(),
                          sin.data_ptr(), D, torch.get_num_threads()):
                raise RuntimeError(f"C rotary kernel failed (head size {D})")
            outs.append(o)
        return tuple(outs)
    return _c(rotary)


def _rms_llama(x, w, eps: float):
    import torch

    h = x.float()
    return w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _rms_gemma(x, w, eps: float):
    import torch

    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (h * (1.0 + w.float())).type_as(x)


# A decoder layer's residual adds, fused with the norm next to them (one pass over the hidden
# states instead of two or three): returns (new residual stream, what the next module reads).

def _add_rms_llama(x, r, w, eps: float):
    """Llama: ``h = r + x`` (attention out), then ``post_attention_layernorm(h)``."""
    h = r + x
    return h, _rms_llama(h, w, eps)


def _norm_add_rms_gemma(x, r, w1, w2, eps: float):
    """Gemma-3: ``h = r + post_attention_layernorm(x)``, then ``pre_feedforward_layernorm(h)``."""
    h = r + _rms_gemma(x, w1, eps)
    return h, _rms_gemma(h, w2, eps)


def _norm_add_gemma(x, r, w, eps: float):
    """Gemma-3: ``r + post_feedforward_layernorm(x)`` (the layer's output)."""
    return r + _rms_gemma(x, w, eps)


def _rotary_halves(q, k, cos, sin):
    """transformers' ``apply_rotary_pos_emb`` (``q * cos + rotate_half(q) * sin``, cos/sin
    ``[B, T, D]`` unsqueezed at dim 1) written on halves of the head dimension and on the
    token-major layout the projections wrote (``[B, T, H, D]``): no ``cat`` of a negated copy
    inside the kernel, 1.5x faster than compiling the module's own function on SmolLM2's
    ``[6800, 12, 64]`` q/k (docs/benchmarks.md).  Output strides as the input's transpose."""
    import torch

    d = q.shape[-1] // 2
    c, s = cos.unsqueeze(2), sin.unsqueeze(2)
    ca, cb, sa, sb = c[..., :d], c[..., d:], s[..., :d], s[..., d:]

    def one(x):
        t = x.transpose(1, 2)
        a, b = t[..., :d], t[..., d:]
        return torch.cat([a * ca - b * sa, b * cb + a * sb], -1).transpose(1, 2)

    return one(q), one(k)


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
    # every size symbolic from the start: its first call is mid-run (the first vocabulary head)
    return _compiled("logsumexp_fp32", _logsumexp_fp32, dynamic=True) if compiled else _logsumexp_fp32


def _is_gelu_tanh(act) -> bool:
    name = type(act).__name__
    return name in ("GELUTanh", "PytorchGELUTanh", "NewGELUActivation", "FastGELUActivation") or (
        name == "GELU" and getattr(act, "approximate", "none") == "tanh")


def _isa_record_key(torch) -> str:
    """What inductor's instruction-set probe depends on: this CPU's flags, the C++ compiler (path,
    size, mtime) and torch's version."""
    from torch._inductor.cpp_builder import get_cpp_compiler

    from rayeval.host import cpu_flags, executable_identity

    flags = " ".join(sorted(cpu_flags()))
    cxx = executable_identity(get_cpp_compiler())
    return hashlib.sha256("\0".join([torch.__version__, cxx, flags]).encode()).hexdigest()[:20]


@functools.cache
def probe_isas_once() -> list[str] | None:
    """Inductor's vector instruction sets for this CPU, probed once per host, compiler and torch.

    Before its first kernel, inductor checks every instruction set ``/proc/cpuinfo`` reports by
    building and loading a test library in a Python subprocess, in every process: 1.1 s of each
    engine's start here (eleven subprocesses), and each Ray actor is a new process.  The first
    process's answer is kept in rayeval's cache folder; a later one with the same key trusts the
    CPU's flags (inductor's ``cpp.vec_isa_ok``) only if they give exactly the recorded answer, and
    probes as usual otherwise.  An operator's own ``TORCHINDUCTOR_VEC_ISA_OK`` is left alone.
    Returns the instruction sets in use (None off x86 Linux or when the operator decided); once
    per process."""
    import torch
    from torch._inductor import config
    from torch._inductor import cpu_vec_isa as isa

    if config.cpp.vec_isa_ok is not None or not sys.platform.startswith("linux") or platform.machine() != "x86_64":
        return None
    from rayeval.config import cache_dir, write_record

    path = want = None
    try:
        path = cache_dir() / "inductor" / f"isa-{_isa_record_key(torch)}.json"
        want = json.loads(path.read_text())["isas"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    if want is not None:
        config.cpp.vec_isa_ok = True
        try:
            got = [str(i) for i in isa.valid_vec_isa_list()]
        except Exception:  # noqa: BLE001 - never left trusting flags that were not compared
            got = None
        if got == want:
            return got
        config.cpp.vec_isa_ok = None  # the flags say more than the probe allowed: probe
        isa.valid_vec_isa_list.cache_clear()
    got = [str(i) for i in isa.valid_vec_isa_list()]
    if path is not None:
        write_record(path, {"isas": got, "torch": torch.__version__})  # read-only: the next process probes too
    return got


def _compiled(key: str, fn, dynamic: bool | None = None):
    """``fn`` compiled once per process and key.  ``dynamic=None``: the sizes are constants for
    the kernel (the head and hidden sizes; the rotary kernel ran 1.6-1.9x faster than with every
    size symbolic, docs/benchmarks.md), except the token count, which the callers mark dynamic
    (:func:`_tokens_dynamic`), so a kernel compiles once per shape family, at install.  Each key
    compiles its own copy of ``fn``'s code: dynamo keeps compiled entries on the code object, so
    keys sharing one function (two rotary kernels, two models' ``act * up``) would otherwise pile
    their entries onto one another up to dynamo's recompile limit.  ``torch.compile`` itself runs
    at the first call (:class:`_Lazy`)."""
    import types

    if key not in _COMPILED:
        own = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
        _COMPILED[key] = _Lazy(own, dynamic)
    return _COMPILED[key]


class _Lazy:
    """``torch.compile(fn, dynamic=dynamic)``, made at the first call.  Making it imports
    inductor (~1 s of an engine's start), and on a host with the C kernels the compiled
    functions are only their fallbacks, which a packed engine rarely or never calls."""

    def __init__(self, fn, dynamic: bool | None):
        self.fn, self.dynamic, self.compiled = fn, dynamic, None

    def __call__(self, *args, **kwargs):
        if self.compiled is None:
            import torch

            self.compiled = torch.compile(self.fn, dynamic=self.dynamic)
        return self.compiled(*args, **kwargs)


def _tokens_dynamic(*xs, dim: int = 0):
    """Mark the token dimension of each tensor dynamic for the compiled kernel it goes to."""
    from torch._dynamo import maybe_mark_dynamic

    for x in xs:
        maybe_mark_dynamic(x, dim)
    return xs


# Every compiled kernel sees one shape family only (2-D, more than one row; rotary: length > 1,
# and either batch > 1 or one packed sequence, a kernel each), its token count symbolic from the
# first call, so it never compiles again mid-run (a size of 1 would be a specialisation of its
# own); the rare size-1 call runs the eager module.

def _norm_forward(m, fn, eps: float, eager):
    def forward(x):
        # 2-D, so one dynamic kernel serves [B, T, D] hidden states and Gemma's [B, H, T, d] q/k norms
        if x.numel() < 2 * x.shape[-1]:
            return eager(x)
        if getattr(fn, "_rayeval_c", False):   # reads x's rows where they are (_c_norm)
            return fn(x, m.weight, eps)
        return fn(*_tokens_dynamic(x.reshape(-1, x.shape[-1])), m.weight, eps).view(x.shape)
    return forward


def _mlp_forward(m, act_mul, eager):
    def forward(x):
        if x.numel() < 2 * x.shape[-1]:
            return eager(x)
        g, u = m.gate_proj(x), m.up_proj(x)
        return m.down_proj(act_mul(*_tokens_dynamic(g.reshape(-1, g.shape[-1]), u.reshape(-1, u.shape[-1]))).view(g.shape))
    return forward


def _rotary_forward(fused, fused_one, eager):
    """``fused_one`` for one packed sequence (batch 1: the HF engine's packed passes), installed
    checked; ``fused`` for padded batches, compiled and checked against ``eager`` on its first
    call (a packed engine never makes one, so it never compiles it: 1.2 s of an engine's start on
    SmolLM2), its batch and token sizes symbolic from then on; it stays eager if it differs."""
    batched: list = []  # [the kernel for batches] once its first call checked it

    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        if args or kwargs or q.shape[2] < 2:
            return eager(q, k, cos, sin, *args, **kwargs)
        if q.shape[0] == 1:
            return fused_one(*_tokens_dynamic(q, k, dim=2), *_tokens_dynamic(cos, sin, dim=1))
        _tokens_dynamic(q, k, cos, sin)  # the batch size too
        if not batched:
            got, want = fused(*_tokens_dynamic(q, k, dim=2), *_tokens_dynamic(cos, sin, dim=1)), eager(q, k, cos, sin)
            ok = all(_same(x, y, q.dtype) for x, y in zip(got, want))
            if not ok:
                log.warning("fused rotary kernel differs from %s on batches; batches stay eager", eager.__name__)
            batched.append(fused if ok else eager)
            return want
        return batched[0](*_tokens_dynamic(q, k, dim=2), *_tokens_dynamic(cos, sin, dim=1))
    apply_rotary_pos_emb._rayeval_fused = True
    apply_rotary_pos_emb._rayeval_plain = eager   # transformers' own function
    apply_rotary_pos_emb._rayeval_batched = batched
    return apply_rotary_pos_emb


def _same(a, b, dtype) -> bool:
    """Equal to rounding, relative to the output's scale (one bf16 ulp is 2**-8 of a value; a
    sum over many rounded terms, as after the MLP's down projection, stays within a few)."""
    import torch

    tol = 0.03 if dtype == torch.bfloat16 else 1e-4
    a, b = a.float(), b.float()
    return bool((a - b).abs().max() <= tol * b.abs().max())


def fuse_elementwise(model, layers: bool = True, rotary: str = "halves") -> list[str]:
    """Install the fused kernels in ``model`` (in place); returns what was fused (e.g.
    ``["LlamaRMSNorm", "LlamaMLP", "apply_rotary_pos_emb", "LlamaDecoderLayer"]``), empty when
    nothing was.  ``layers``: fuse the decoder layers' residual adds into their norms;
    ``rotary``: ``halves`` (:func:`_rotary_halves`) or ``module`` (the model's own function,
    compiled).  The rotary function is a global of the model's transformers module: the first
    engine of a process installs it for every later one.  The engine uses the defaults; the
    others are the earlier kernel set, for ``bench/fused_kernels.py``."""
    import torch

    if rotary not in ("halves", "module"):
        raise ValueError(f"rotary: {rotary!r} is not one of halves, module")
    c = next(model.parameters()).dtype == torch.bfloat16 and c_kernels() is not None
    try:
        if not c:   # the C kernels compile nothing: no instruction sets to probe
            probe_isas_once()
    except Exception as e:  # noqa: BLE001 - inductor internals moved: it probes as it always did
        log.debug("instruction-set record unavailable: %s", e)
    with torch.inference_mode():  # the engine's mode: kernels compiled outside it would recompile inside
        return _fuse(model, torch, layers, rotary)


def _fuse(model, torch, layers: bool = True, rotary: str = "halves") -> list[str]:
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
                key = "rms_gemma" if gemma else "rms_llama"
                fn = _compiled(key, _rms_gemma if gemma else _rms_llama)
                if dtype == torch.bfloat16:   # a compiled kernel compiles only if it is called
                    fn = _c_norm(key, fn)
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
                    c_act = "gelu_tanh"
                else:
                    key = f"act_mul:{type(act).__name__}:{getattr(act, 'approximate', '')}"
                    act_mul = _compiled(key, lambda g, u, act=act: act(g) * u)
                    c_act = "silu" if type(act).__name__ in ("SiLU", "SiLUActivation") else None
                if c_act and dtype == torch.bfloat16:
                    act_mul = _c_act_mul(c_act, act_mul)
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
            fn = _rotary_halves if rotary == "halves" else rot
            key = f"rotary:{rotary}:{mod.__name__}:{heads}:{kv_heads}:{head_dim}"
            one = _compiled(key + ":1", fn)
            if rotary == "halves" and dtype == torch.bfloat16:
                one = _c_rotary(one)
            fused = _rotary_forward(_compiled(key, fn), one, rot)
            ok = True
            # one packed sequence with the model's own head counts; q/k head-major ([1, H, T, D]
            # contiguous, as after Gemma-3's q/k norms) and token-major (a transposed [1, T, H, D], as
            # Llama's projections leave them); batches check themselves on their first call
            for b, t, token_major in ((1, 7, False), (1, 7, True), (1, 1, False)):
                if token_major:
                    q = torch.randn(b, t, heads, head_dim, dtype=dtype).transpose(1, 2)
                    k = torch.randn(b, t, kv_heads, head_dim, dtype=dtype).transpose(1, 2)
                else:
                    q, k = torch.randn(b, heads, t, head_dim, dtype=dtype), torch.randn(b, kv_heads, t, head_dim, dtype=dtype)
                cos, sin = torch.randn(b, t, head_dim, dtype=dtype), torch.randn(b, t, head_dim, dtype=dtype)
                ok = ok and all(_same(x, y, dtype) for x, y in zip(fused(q, k, cos, sin), rot(q, k, cos, sin)))
            if ok:
                mod.apply_rotary_pos_emb = fused   # the attention modules look it up by module global
                done.append("apply_rotary_pos_emb")
        layer = _fuse_layers(model, torch, dtype) if layers else None
        if layer:
            done.append(layer)
    except Exception as e:  # no C++ compiler, an unsupported op: keep the eager modules
        log.warning("fused kernels unavailable (%s: %s); running eager", type(e).__name__, str(e).split("\n")[0])
        return done
    return done


def _eps(norm) -> float:
    return float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))


def _cut(hidden_states, h):
    """The last layer's rows past its attention: in a packed pass that reads only some positions
    (:func:`rayeval.eval.packed.kept_rows`), those; the keys and values of every row are made
    by then, and nothing reads the others' outputs."""
    from rayeval.eval.packed import kept_rows

    keep = kept_rows()
    if keep is None:
        return hidden_states, h
    return hidden_states.index_select(1, keep), h.index_select(1, keep)


def _llama_layer(layer, fn, last: bool = False):
    """``LlamaDecoderLayer.forward`` with its first residual add fused into
    ``post_attention_layernorm`` (:func:`_add_rms_llama`; ``fn`` None: transformers' own ops).
    ``last``: the model's last layer, which cuts its rows past attention (:func:`_cut`)."""
    ln2 = layer.post_attention_layernorm
    eps = _eps(ln2)

    def forward(hidden_states, **kw):
        h, _ = layer.self_attn(hidden_states=layer.input_layernorm(hidden_states), **kw)
        if last:
            hidden_states, h = _cut(hidden_states, h)
        D = h.shape[-1]
        if fn is None or h.numel() < 2 * D:
            res = hidden_states + h
            return res + layer.mlp(ln2(res))
        res, h = fn(*_tokens_dynamic(h.reshape(-1, D), hidden_states.reshape(-1, D)), ln2.weight, eps)
        return res.view(hidden_states.shape) + layer.mlp(h.view(hidden_states.shape))
    forward._rayeval_cut = last
    return forward


def _gemma_layer(layer, fn_mid, fn_out, last: bool = False):
    """``Gemma3DecoderLayer.forward`` with its sandwich norms fused into the residual adds:
    post-attention norm + add + pre-feed-forward norm in one kernel (:func:`_norm_add_rms_gemma`),
    post-feed-forward norm + add in another (:func:`_norm_add_gemma`); ``fn_mid`` None:
    transformers' own ops.  ``last``: as :func:`_llama_layer`'s."""
    n1, n2, n3 = layer.post_attention_layernorm, layer.pre_feedforward_layernorm, layer.post_feedforward_layernorm
    eps = _eps(n1)

    def forward(hidden_states, **kw):
        h, _ = layer.self_attn(hidden_states=layer.input_layernorm(hidden_states), **kw)
        if last:
            hidden_states, h = _cut(hidden_states, h)
        D = h.shape[-1]
        if fn_mid is None or h.numel() < 2 * D:
            res = hidden_states + n1(h)
            return res + n3(layer.mlp(n2(res)))
        res, h = fn_mid(*_tokens_dynamic(h.reshape(-1, D), hidden_states.reshape(-1, D)), n1.weight, n2.weight, eps)
        out = layer.mlp(h.view(hidden_states.shape))
        return fn_out(*_tokens_dynamic(out.reshape(-1, D), res), n3.weight, eps).view(hidden_states.shape)
    forward._rayeval_cut = last
    return forward


_LAYERS = ("LlamaDecoderLayer", "Gemma3DecoderLayer")
_GEMMA_NORMS = ("post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm")


def _decoder_layers(model) -> list:
    """The model's decoder layers where all are of one class this module knows, with its norms; else []."""
    layers = [m for m in model.modules() if type(m).__name__ in _LAYERS]
    if not layers or len({type(m).__name__ for m in layers}) != 1:
        return []
    norms = _GEMMA_NORMS if type(layers[0]).__name__.startswith("Gemma") else ("post_attention_layernorm",)
    if not all(all(hasattr(m, n) and hasattr(getattr(m, n), "weight") for n in norms) for m in layers):
        return []
    return layers


def cut_last_layer(model) -> bool:
    """Make ``model``'s last decoder layer keep only a packed pass's read rows past its attention
    (:func:`_cut`).  A layer fused by :func:`fuse_elementwise` does already; another gets the
    same forward with transformers' own ops.  False (nothing changed) for a model whose layers
    this module does not know."""
    layers = _decoder_layers(model)
    if not layers:
        return False
    last = layers[-1]
    if getattr(last.__dict__.get("forward"), "_rayeval_cut", False):
        return True
    gemma = type(last).__name__.startswith("Gemma")
    last.forward = _gemma_layer(last, None, None, last=True) if gemma else _llama_layer(last, None, last=True)
    return True


def _fuse_layers(model, torch, dtype) -> str | None:
    """Swap the decoder layers' ``forward`` for one with the residual adds fused into the norms
    beside them (Llama, Gemma-3 layers whose norms are fused already).  Checked on the first layer's
    inputs from a short batch: equal to rounding; else kept as is."""
    layers = _decoder_layers(model)
    if not layers:
        return None
    cls = type(layers[0]).__name__
    gemma = cls.startswith("Gemma")
    if gemma:
        mid, out = _compiled("norm_add_rms_gemma", _norm_add_rms_gemma), _compiled("norm_add_gemma", _norm_add_gemma)
        if dtype == torch.bfloat16:
            mid, out = _c_norm("norm_add_rms_gemma", mid), _c_norm("norm_add_gemma", out)
        new = {m: _gemma_layer(m, mid, out, last=m is layers[-1]) for m in layers}
    else:
        fn = _compiled("add_rms_llama", _add_rms_llama)
        if dtype == torch.bfloat16:
            fn = _c_norm("add_rms_llama", fn)
        new = {m: _llama_layer(m, fn, last=m is layers[-1]) for m in layers}
    # the first layer's own inputs (hidden states, position embeddings, masks) from a short batch
    # through the base model; that layer with and without the fused forward must agree to rounding
    # (one layer: in bf16 a whole model's output moves further than rounding)
    base = getattr(model, model.base_model_prefix, model)
    vocab = int(getattr(model.config, "vocab_size", 100) or 100)
    seen: list = []
    hook = layers[0].register_forward_pre_hook(lambda m, a, kw: seen.append((a, kw)) if not seen else None,
                                               with_kwargs=True)
    try:  # one sequence: the packed passes' shapes (a batch would compile the batched rotary kernel)
        base(input_ids=torch.randint(0, min(vocab, 1000), (1, 7)))
    finally:
        hook.remove()
    args, kwargs = seen[0]
    want = layers[0](*args, **kwargs)
    old = {m: m.__dict__.get("forward") for m in layers}
    for m, f in new.items():
        m.forward = f
    got = layers[0](*args, **kwargs)
    if _same(got, want, dtype):
        return cls
    for m, f in old.items():  # not the function it replaces: the layers' own forward again
        if f is None:
            del m.forward
        else:
            m.forward = f
    return None
