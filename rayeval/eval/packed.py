"""Packed forward passes for the HF engine: many rows in one sequence, no padding.

A forward pass of :class:`~rayeval.eval.engines.HFEngine` holds rows of trie nodes (a row: one
parent path, then sibling nodes that share it).  The linear layers (most of a pass's arithmetic)
see the pass as one sequence of real tokens, ``[1, N, hidden]``: no padding, and ``N`` up to
``max_tokens_per_batch``, where a CPU's bf16 matmuls run fastest.  Only attention sees rows:
:func:`packed_attention` (registered with transformers' ``AttentionInterface``) gathers each
group of rows of similar length into a padded ``[rows, heads, length, dim]`` batch on top of the
rows' parent caches, runs SDPA with the row mask (a token sees its parent path and the earlier
tokens of its own node; siblings never see each other; the sliding window where a layer has
one), and scatters the result back.  The key/value states of nodes with children are kept for the
next level of the trie.

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
    pidx: Any | None   # [R * pmax] positions in the pass's parent store (pads: 0); None without parents
    rows: int
    qmax: int
    pmax: int
    full: Any          # [R, 1, qmax, pmax + qmax] bool
    sliding: Any | None
    src: Any           # real (non-pad) slots of the flattened [R * qmax] output
    dst: Any           # their packed positions


@dataclass
class Pass:
    groups: list[Group]
    parents: list[int]                      # trie nodes whose caches form the parent store, in order
    kv: dict                                # node -> per layer (keys [P, Hkv, D], values): its whole path
    keep: bool                              # some node of the pass has children: keep its keys/values
    new: dict = field(default_factory=dict)  # layer -> (keys [N, Hkv, D], values) of the pass
    store: dict = field(default_factory=dict)

    def parent_store(self, layer: int):
        if layer not in self.store:
            import torch

            ks = [self.kv[n][layer][0] for n in self.parents]
            vs = [self.kv[n][layer][1] for n in self.parents]
            self.store[layer] = (torch.cat(ks), torch.cat(vs)) if len(ks) > 1 else (ks[0], vs[0])
        return self.store[layer]


def packed_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                     sliding_window=None, **_):
    """transformers' attention-function contract: ``query [1, H, N, D]``, ``key``/``value``
    ``[1, Hkv, N, D]`` (rotary applied), returns ``([1, N, H, D], None)``."""
    import torch
    import torch.nn.functional as F

    p: Pass | None = getattr(_LOCAL, "current", None)
    if p is None:  # the model called directly, outside an engine pass: transformers' own SDPA
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      sliding_window=sliding_window, **_)
    layer = module.layer_idx
    # token-major views ([N, heads, D], contiguous as the projections wrote them): gathering rows
    # of tokens from them copies only the rows, never the whole pass
    q0, k0, v0 = query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1)
    if p.keep:
        p.new[layer] = (k0, v0)
    N, H, D = q0.shape
    hkv = k0.shape[1]
    out = q0.new_empty(N, H, D)
    for g in p.groups:
        R, qm = g.rows, g.qmax
        q = q0.index_select(0, g.qidx).view(R, qm, H, D)
        k = k0.index_select(0, g.qidx).view(R, qm, hkv, D)
        v = v0.index_select(0, g.qidx).view(R, qm, hkv, D)
        if g.pmax:
            sk, sv = p.parent_store(layer)
            k = torch.cat([sk.index_select(0, g.pidx).view(R, g.pmax, hkv, D), k], 1)
            v = torch.cat([sv.index_select(0, g.pidx).view(R, g.pmax, hkv, D), v], 1)
        mask = g.sliding if (sliding_window and g.sliding is not None) else g.full
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                           scale=scaling, enable_gqa=hkv != H)
        out.index_copy_(0, g.dst, o.transpose(1, 2).reshape(R * qm, H, D).index_select(0, g.src))
    return out.unsqueeze(0), None


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
