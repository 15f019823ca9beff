"""Attention of packed rows on AMX tiles: the HF engine's attention on a bf16 CPU that has them.

PyTorch's CPU flash-attention kernel runs the packed passes' attention groups at 170-230 GFLOP/s
on SmolLM2's shapes (head size 64, keys 80-160 per row; bench/results), a quarter of a pass's
time on zero-shot MMLU, while the same products on AMX tiles are several times faster; most of
the difference is per-block overhead on such small blocks, and the padded copies of each
group's queries, keys and values that a call to it needs.  ``kernels/attention.c`` computes a
whole group in one call: it gathers the group's rows by index from the pass and the KV store,
multiplies on AMX tiles (bf16 in, fp32 accumulate), and runs the masked softmax in fp32, the
probabilities rounded to bf16 for the second product as SDPA's CPU kernel does.

:func:`load` compiles it once per host (the C compiler torch's inductor uses; ~0.3 s) into
rayeval's cache folder, keyed by the source, compiler and flags, loads it with ctypes, and checks
it against SDPA on random groups before anything uses it; None (SDPA stays) on a CPU without
AMX-BF16 and AVX512-BF16, without a compiler, or when the check fails.  ``RAYEVAL_CPU_ATTENTION=0``
turns it off."""

from __future__ import annotations

import ctypes
import functools
import logging
import subprocess
from pathlib import Path

from rayeval.host import kernel_host_ok, load_kernel

log = logging.getLogger("rayeval.eval")

SOURCE = Path(__file__).with_name("kernels") / "attention.c"
FLAGS = ["-O3", "-fopenmp", "-fPIC", "-shared", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16",
         "-mfma", "-mamx-tile", "-mamx-bf16"]
NEEDS = {"amx_tile", "amx_bf16", "avx512_bf16", "avx512bw", "avx512f"}
# What the score cache's engine identity says of this kernel: a new value whenever what it computes changes
VERSION = "amx-1"


def supports(head_dim: int) -> bool:
    """Head sizes the kernel takes: multiples of 32 (two AMX tile columns) up to 256."""
    return head_dim % 32 == 0 and 0 < head_dim <= 256


class Kernel:
    """The loaded kernel: ``kernel(...)`` computes one attention group (see :meth:`__call__`)."""

    def __init__(self, lib):
        self._fn = lib.rayeval_amx_attention
        self._fn.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_int64] * 4 + [ctypes.c_void_p] * 5 + \
            [ctypes.c_int64] * 6 + [ctypes.c_float, ctypes.c_int]
        self._fn.restype = ctypes.c_int

    def __call__(self, qrows, take, out, put, k0, v0, sk, sv, qidx, pidx, bias, rows: int, qmax: int,
                 pmax: int, scale: float, threads: int) -> None:
        """``qrows [*, D]`` the pass's query rows, ``take``/``put [rows * kv_heads * L]`` the row
        each folded query reads and writes (``out [*, D]``); ``k0``/``v0 [N, kv_heads, D]`` the
        pass's keys/values (head dimension contiguous), ``sk``/``sv [slots, kv_heads, D]`` the
        store, ``qidx [rows * qmax]`` / ``pidx [rows * pmax]`` their rows of each attention row,
        ``bias [rows, L, pmax + qmax]`` (bf16, 0 / -inf), ``L`` = queries per row and kv head."""
        D, hkv = k0.shape[-1], k0.shape[1]
        L = bias.shape[-2]
        for t in (qrows, out, bias, take, put, qidx) + ((sk, sv, pidx) if pmax else ()):
            assert t.is_contiguous()
        assert k0.stride(2) == 1 and v0.stride(2) == 1 and take.numel() == rows * hkv * L
        rc = self._fn(qrows.data_ptr(), take.data_ptr(), out.data_ptr(), put.data_ptr(),
                      k0.data_ptr(), v0.data_ptr(), k0.stride(0), k0.stride(1), v0.stride(0), v0.stride(1),
                      sk.data_ptr() if pmax else None, sv.data_ptr() if pmax else None, qidx.data_ptr(),
                      pidx.data_ptr() if pmax else None, bias.data_ptr(),
                      rows, hkv, L, qmax, pmax, D, float(scale), int(threads))
        if rc:
            raise RuntimeError(f"AMX attention kernel failed ({rc}) on a group of {rows} rows, head size {D}")


def available() -> bool:
    """Whether this host can build the kernel (CPU flags, a compiler; nothing compiled): what the
    score cache's engine identity goes by, on the driver as in the actors."""
    return kernel_host_ok(NEEDS, "RAYEVAL_CPU_ATTENTION")


@functools.cache
def load() -> Kernel | None:
    """The kernel for this host, built, loaded and checked once per process; None where it cannot run."""
    if not available():
        return None
    try:
        lib = load_kernel(SOURCE, FLAGS)
        if lib.rayeval_amx_init() != 0:  # the kernel asks Linux for the AMX tile state
            return None
        k = Kernel(lib)
        if not self_check(k):
            log.warning("AMX attention kernel differs from SDPA on random groups: SDPA stays")
            return None
        return k
    except (OSError, RuntimeError, subprocess.CalledProcessError, AttributeError) as e:
        log.warning("AMX attention kernel unavailable (%s): SDPA stays", getattr(e, "stderr", None) or e)
        return None


def reference(qrows, take, put, n_out, k0, v0, sk, sv, qidx, pidx, bias, rows, qmax, pmax, scale):
    """The same group with PyTorch's SDPA, as the engine runs it without the kernel: the check."""
    from rayeval.eval.packed import sdpa_group

    out = qrows.new_zeros(n_out, k0.shape[-1])
    sdpa_group(qrows, take, out, put, k0, v0, sk, sv, qidx, pidx, bias, rows, qmax, pmax, scale)
    return out


def random_group(rows: int, qmax: int, pmax: int, hkv: int, fold: int, D: int, seed: int = 0):
    """A random attention group in the engine's layout (for the check and the tests)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    N, slots, L = rows * qmax + 5, max(rows * pmax, 1) + 3, fold * qmax
    bf = torch.bfloat16
    k0 = torch.randn(N, hkv, D, generator=g).to(bf)
    v0 = torch.randn(N, hkv, D, generator=g).to(bf)
    sk = torch.randn(slots, hkv, D, generator=g).to(bf)
    sv = torch.randn(slots, hkv, D, generator=g).to(bf)
    qrows = torch.randn(N * hkv * fold, D, generator=g).to(bf)
    qidx = torch.randperm(N, generator=g)[: rows * qmax].contiguous()
    pidx = torch.randint(0, slots, (rows * pmax,), generator=g)
    take = torch.randint(0, qrows.shape[0], (rows * hkv * L,), generator=g)
    put = torch.randperm(rows * hkv * L + 7, generator=g)[: rows * hkv * L].contiguous()
    visible = torch.rand(rows, L, pmax + qmax, generator=g) < 0.6
    visible[..., -1] = True
    bias = torch.zeros(visible.shape, dtype=bf).masked_fill_(~visible, float("-inf"))
    return dict(qrows=qrows, take=take, put=put, k0=k0, v0=v0, sk=sk, sv=sv, qidx=qidx, pidx=pidx, bias=bias,
                rows=rows, qmax=qmax, pmax=pmax, n_out=rows * hkv * L + 7)


def run_group(k: Kernel, grp: dict, scale: float, threads: int = 1):
    import torch

    out = torch.zeros(grp["n_out"], grp["k0"].shape[-1], dtype=torch.bfloat16)
    k(grp["qrows"], grp["take"], out, grp["put"], grp["k0"], grp["v0"], grp["sk"], grp["sv"], grp["qidx"],
      grp["pidx"], grp["bias"], grp["rows"], grp["qmax"], grp["pmax"], scale, threads)
    return out


def self_check(k: Kernel) -> bool:
    """The kernel against :func:`reference` on random groups (head sizes 64 and 256, with and
    without parents, lengths off the tile sizes): equal to bf16 rounding of the output."""
    import torch

    for rows, qmax, pmax, hkv, fold, D in ((3, 7, 0, 3, 3, 64), (2, 19, 37, 1, 4, 256), (5, 33, 17, 3, 3, 64)):
        grp = random_group(rows, qmax, pmax, hkv, fold, D)
        got = run_group(k, grp, D ** -0.5, threads=torch.get_num_threads())
        want = reference(**{n: grp[n] for n in ("qrows", "take", "put", "n_out", "k0", "v0", "sk", "sv", "qidx",
                                                 "pidx", "bias", "rows", "qmax", "pmax")}, scale=D ** -0.5)
        if not bool(((got.float() - want.float()).abs() <= 0.02 * want.float().abs().max() + 1e-3).all()):
            return False
    return True
