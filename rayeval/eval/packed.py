"""Packed forward passes for the HF engine: many rows in one sequence, no padding.

A forward pass of :class:`~rayeval.eval.engines.HFEngine` holds rows of trie nodes (a row: one
parent path, then sibling nodes that share it).  The linear layers (most of a pass's arithmetic)
see the pass as one sequence of real tokens, ``[1, N, hidden]``: no padding, and ``N`` up to
``max_tokens_per_batch``, where a CPU's bf16 matmuls run fastest.  Only attention sees rows:
:func:`packed_attention` (registered with transformers' ``AttentionInterface``) gathers each
group of rows of similar length into a padded ``[rows, heads, length, dim]`` batch on top of the
rows' parent caches, runs SDPA with the row mask (a token sees its parent path and the earlier
tokens of its own node; siblings never see each other; the sliding window where a layer has
one), and scatters the result back.  In bf16 on a CPU with AMX tiles the whole group is one call
of :mod:`rayeval.eval.cpu_attention`'s kernel instead (gathers, products, mask and scatter).  The key/value states of nodes with children go to a
:class:`KVStore` (written once, read through index tensors of paths): each layer writes the
pass's own before any group attends, so a row may read its parent's keys from the same pass.
Past the last layer's attention a pass keeps only the rows the vocabulary head reads
(``Pass.keep``; the decoder layers of :mod:`rayeval.eval.fused` cut there): the other rows'
last feed-forward would feed nothing.

Nothing here changes what a token computes: the same weights, positions and visible keys as a
plain forward pass over its whole sequence (tests compare against one)."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

NAME = "rayeval_packed"
_LOCAL = threading.local()  # the pass being run in this thread (engines of several models run in threads)


@dataclass
class Group:
    """Rows that attend in one SDPA call: index tensors into the packed sequence and the parent store."""

    qidx: Any          # [R * qmax] packed positions of the rows' tokens (pads: 0)
    pidx: Any | None   # [R * pmax] slots of the rows' parent paths in the KV store (pads: a written slot); None without parents
    rows: int
    qmax: int
    pmax: int
    full: Any          # [R, 1, qmax, pmax + qmax] bool
    sliding: Any | None
    src: Any           # real (non-pad) slots of the flattened [R * qmax] output
    bias: dict = field(default_factory=dict)  # (sliding, heads per kv head, dtype) -> additive mask, made once a pass
    folded: dict = field(default_factory=dict)  # (heads, kv heads, pass length, head-major) -> fold_index

    def fold_index(self, heads: int, kv_heads: int, n: int, head_major: bool):
        """Index tensors for queries folded per key/value head: ``take`` gathers the group's
        ``[R, kv_heads, fold * qmax, D]`` queries in one copy from the pass's ``n * heads`` query
        rows (head-major ``[heads, n, D]`` or token-major ``[n, heads, D]``, as the model wrote
        them); ``put`` sends each output row to its token-major row (pads to row ``n * heads``, a
        scratch row)."""
        key = (heads, kv_heads, n, head_major)
        if key not in self.folded:
            import torch

            R, qm, fold = self.rows, self.qmax, heads // kv_heads
            hd = torch.arange(heads, device=self.qidx.device).view(1, kv_heads, fold, 1)
            tok = self.qidx.view(R, 1, 1, qm)
            token_major = tok * heads + hd
            take = hd * n + tok if head_major else token_major
            real = torch.zeros(R * qm, dtype=torch.bool, device=self.qidx.device)
            real[self.src] = True
            put = torch.where(real.view(R, 1, 1, qm), token_major, n * heads)
            self.folded[key] = (take.reshape(-1), put.reshape(-1))
        return self.folded[key]

    def mask_bias(self, sliding: bool, fold: int, dtype):
        """The row mask as an additive bias for queries folded ``fold`` heads deep: ``[R, 1, fold *
        qmax, K]``, 0 where a key is visible and -inf elsewhere.  Built at the first layer and
        reused by every other (SDPA's CPU kernel turns a boolean mask into this on every call)."""
        key = (sliding, fold, dtype)
        if key not in self.bias:
            import torch

            m = self.sliding if sliding else self.full
            if fold > 1:
                m = m.repeat(1, 1, fold, 1)
            self.bias[key] = torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill_(~m, float("-inf"))
        return self.bias[key]


class KVStore:
    """The keys and values of every trie node with children, one ``[slots, Hkv, D]`` tensor per
    layer (allocated at the first write): each node's tokens get their slots once, and a node's
    path (its ancestors' slots, then its own) is an index tensor into them, so a row's parent
    cache is one ``index_select`` and no path is ever copied whole.  Only written slots may be read,
    padding included (a slot not yet written holds whatever the allocator left there, and a masked
    bf16 NaN still makes NaN): ``unwritten`` (tests: NaN) fills new stores so that a read shows."""

    unwritten: float | None = None

    def __init__(self, trie, device):
        import torch

        self.trie, self.device, self._torch = trie, device, torch
        self.first: dict[int, int] = {}
        n = 0
        for node in range(1, len(trie.parent)):
            if trie.children[node]:
                self.first[node] = n
                n += trie.hi[node] - trie.lo[node]
        self.slots = n
        self.k: dict[int, Any] = {}
        self.v: dict[int, Any] = {}
        self._paths: dict[int, Any] = {0: torch.zeros(0, dtype=torch.long, device=device)}

    def own(self, node: int):
        a = self.first[node]
        return self._torch.arange(a, a + self.trie.hi[node] - self.trie.lo[node], device=self.device)

    def path(self, node: int):
        """Slots of ``node``'s whole sequence (its tokens included; it must have children)."""
        if node not in self._paths:
            self._paths[node] = self._torch.cat([self.path(self.trie.parent[node]), self.own(node)])
        return self._paths[node]

    def write(self, layer: int, k, v, src, dst) -> None:
        """Keys/values ``[N, Hkv, D]`` of a pass: rows ``src`` go to slots ``dst``."""
        if layer not in self.k:
            shape = (self.slots,) + tuple(k.shape[1:])
            if self.unwritten is None:
                self.k[layer], self.v[layer] = k.new_empty(shape), v.new_empty(shape)
            else:
                self.k[layer], self.v[layer] = k.new_full(shape, self.unwritten), v.new_full(shape, self.unwritten)
        self.k[layer].index_copy_(0, dst, k.index_select(0, src))
        self.v[layer].index_copy_(0, dst, v.index_select(0, src))


@dataclass
class Pass:
    groups: list[Group]
    store: KVStore
    src: Any | None = None   # packed positions of the pass's tokens of nodes with children ...
    dst: Any | None = None   # ... and their slots in the store (None: no node of the pass has children)
    kernel: Any | None = None  # rayeval.eval.cpu_attention's kernel for bf16 groups, or None: SDPA
    threads: int = 1
    # packed positions whose hidden states the pass reads (the vocabulary head's), in the order the
    # last layer returns them; None: every position.  Past the last layer's attention only these
    # rows go on (:func:`kept_rows`): its feed-forward and the final norm skip the others.
    keep: Any | None = None


def kept_rows():
    """The current pass's ``keep`` (this thread's; None outside a pass or when it keeps every row)."""
    p = getattr(_LOCAL, "current", None)
    return None if p is None else p.keep


def sdpa_group(qrows, take, out, put, k0, v0, sk, sv, qidx, pidx, bias, rows: int, qmax: int, pmax: int,
               scale: float | None, threads: int = 1) -> None:
    """One attention group with PyTorch's SDPA, written to ``out`` (the arguments of
    :class:`rayeval.eval.cpu_attention.Kernel`: the group's rows gathered by index from the pass's
    ``qrows`` / ``k0`` / ``v0`` and the store's ``sk`` / ``sv``, ``bias [rows, L, pmax + qmax]``;
    ``threads`` is torch's own setting here)."""
    import torch
    import torch.nn.functional as F

    D, hkv = k0.shape[-1], k0.shape[1]
    L = bias.shape[-2]
    k = k0.index_select(0, qidx).view(rows, qmax, hkv, D)
    v = v0.index_select(0, qidx).view(rows, qmax, hkv, D)
    if pmax:
        k = torch.cat([sk.index_select(0, pidx).view(rows, pmax, hkv, D), k], 1)
        v = torch.cat([sv.index_select(0, pidx).view(rows, pmax, hkv, D), v], 1)
    # Grouped-query attention with the query heads of each key/value head folded into the query
    # length ([R, Hkv, fold * qmax, D]): one taller attention per key/value head, no repeated keys,
    # and the mask as a bias made once a pass (1.2-1.8x faster than SDPA's GQA with a boolean mask
    # on short rows, docs/benchmarks.md)
    qf = qrows.index_select(0, take).view(rows, hkv, L, D)
    o = F.scaled_dot_product_attention(qf, k.transpose(1, 2), v.transpose(1, 2), attn_mask=bias[:, None], scale=scale)
    out.index_copy_(0, put, o.reshape(-1, D))


def packed_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                     sliding_window=None, **_):
    """transformers' attention-function contract: ``query [1, H, N, D]``, ``key``/``value``
    ``[1, Hkv, N, D]`` (rotary applied), returns ``([1, N, H, D], None)``."""
    import torch

    p: Pass | None = getattr(_LOCAL, "current", None)
    if p is None:  # the model called directly, outside an engine pass: transformers' own SDPA
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      sliding_window=sliding_window, **_)
    layer = module.layer_idx
    # token-major views ([N, heads, D], contiguous as the projections wrote them): gathering rows
    # of tokens from them copies only the rows, never the whole pass
    q0, k0, v0 = query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1)
    if p.dst is not None:
        p.store.write(layer, k0, v0, p.src, p.dst)
    N, H, D = q0.shape
    hkv = k0.shape[1]
    fold = H // hkv
    head_major = query[0].is_contiguous()  # Gemma-3's q-norm writes [H, N, D]; SmolLM2's projection [N, H, D]
    qrows = query[0].reshape(H * N, D) if head_major else q0.reshape(N * H, D)
    out = q0.new_empty(N * H + 1, D)  # + a scratch row that padding slots write to
    for g in p.groups:
        R, qm = g.rows, g.qmax
        take, put = g.fold_index(H, hkv, N, head_major)
        bias = g.mask_bias(bool(sliding_window and g.sliding is not None), fold, q0.dtype)
        # the whole group in one call: the AMX kernel where the engine has one (bf16), else SDPA;
        # the same arguments (the kernel needs its scale spelled out)
        kernel = p.kernel if p.kernel is not None and q0.dtype == torch.bfloat16 else None
        (kernel or sdpa_group)(qrows, take, out, put, k0, v0, p.store.k.get(layer), p.store.v.get(layer), g.qidx,
                               g.pidx, bias[:, 0], R, qm, g.pmax,
                               D ** -0.5 if kernel is not None and scaling is None else scaling, p.threads)
    return out[: N * H].view(N, H, D).unsqueeze(0), None


def install(model) -> None:
    """Register :func:`packed_attention` and make ``model`` use it."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(NAME, packed_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)  # never used: the engine passes its own (dummy) masks
    model.set_attn_implementation(NAME)


class running:
    """``with running(pass_):`` makes ``pass_`` the one :func:`packed_attention` reads in this thread."""

    def __init__(self, p: Pass):
        self.p = p

    def __enter__(self):
        _LOCAL.current = self.p
        return self.p

    def __exit__(self, *exc):
        _LOCAL.current = None
