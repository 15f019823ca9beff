"""Work sharing: token jobs, the prefix trie, the planner, prefix reuse in HFEngine, the score cache.

The HF tests run the real ``HFEngine`` code path on tiny randomly initialised Llama and Gemma-3
models (built here, with the packaged models' tokenizers) so they are exact and fast; the
packaged-model tests check the same on the real weights."""

from __future__ import annotations

import math
import os

import pytest
from typer.testing import CliRunner

from rayeval.data.schema import MCQItem
from rayeval.eval.config import ConfigError, EvalConfig
from rayeval.eval.engines import ScoreRequest, make_engine
from rayeval.eval.pipeline import make_shards, plan_checked
from rayeval.runtime import Execution
from rayeval.eval.plan import ByteTokenizer, plan_works
from rayeval.eval.scoring import expand, flatten
from rayeval.eval.tokens import PrefixTrie, TokenJob, continuation_job, next_token_job, trie_size, unique


# ----------------------------------------------------------------------------- pure: jobs and trie

def test_trie_size_and_structure_hand_computed():
    seqs = [(1, 2, 3, 4), (1, 2, 3, 5), (1, 2), (7, 8), (1, 2, 3, 4)]
    t = PrefixTrie(seqs)
    # nodes: [1,2] -> [3] -> {[4], [5]} and [7,8]; the duplicate shares its node
    assert t.size == 2 + 1 + 1 + 1 + 2
    assert t.end[0] == t.end[4]
    assert [t.tokens(n) for n in t.path(t.end[1])] == [(1, 2), (3,), (5,)]
    assert t.tokens(t.end[2]) == (1, 2) and t.children[t.end[2]]       # a sequence ending inside the tree
    node, off = t.locate(1, 2)
    assert t.tokens(node) == (3,) and off == 0
    levels = t.levels()
    assert sorted(len(x) for x in levels) == [1, 2, 2]
    assert all(t.depth[t.parent[n]] == d for d, lv in enumerate(levels) for n in lv)
    flat = PrefixTrie.flat(seqs)
    assert flat.size == sum(map(len, seqs)) and flat.levels() == [[1, 2, 3, 4, 5]]
    assert trie_size([]) == 0 and trie_size([(5,)]) == 1


def test_trie_split_keeps_every_sequence_end():
    seqs = [(1, 2, 3, 4, 5), (1, 2, 9), (1, 2, 3, 7), (1,)]
    t = PrefixTrie(seqs)
    for k, s in enumerate(seqs):
        assert sum((t.tokens(n) for n in t.path(t.end[k])), ()) == s
    assert t.size == 1 + 1 + 1 + 1 + 2 + 1   # [1] [2] [3] [9] [4,5] [7]


def test_token_jobs_keys_and_queries():
    a = next_token_job([5, 6, 7], [1, 2])
    assert a.queries() == [(2, 1), (2, 2)] and a.next_token
    c = continuation_job([5, 6], [7, 8])
    assert c.queries() == [(1, 7), (2, 8)] and not c.next_token
    assert c.key == continuation_job([5, 6], [7, 8]).key != continuation_job([5], [6, 7, 8]).key
    assert len({a.key, c.key, next_token_job([5, 6, 7], [2, 1]).key}) == 3
    u, where = unique([a, c, a])
    assert u == [a, c] and where == [0, 1, 0]
    with pytest.raises(ValueError, match="empty context"):
        continuation_job([], [1])


# ----------------------------------------------------------------------------- planner (pure)

def _items(n=4):
    return [MCQItem(id=f"q{i}", question=f"What is {i} plus {i}?", choices=[str(2 * i), "7", "9", "11"],
                    gold=0, subject="math") for i in range(n)]


def _cfg(settings, scorings=("symbol", "hybrid"), name="t"):
    return EvalConfig.from_dict({"name": name, "models": ["m"], "datasets": [{"name": "mmlu"}],
                                 "scorings": list(scorings), "settings": settings})


def test_planner_collapses_identical_requests_and_finds_shared_prefixes():
    items = _items(4)
    dev = [MCQItem(id=f"d{i}", question=f"Dev {i}?", choices=["a", "b", "c", "d"], gold=i % 4, subject="math")
           for i in range(3)]
    # "copy" is the baseline again under another name: every one of its jobs is a duplicate
    cfg = _cfg([{"name": "baseline"}, {"name": "copy"}, {"name": "shots", "shots": {"k": 2, "source": "dev"}}])
    works = expand(items, dev, cfg, dataset="mmlu")
    tok = ByteTokenizer()
    plan = plan_works(make_shards(works, 100), ["m"], tokenizers={"m": (tok, False, 0)}).models[0]
    # items x (4 symbol options: " A" is two bytes, so scored as continuations + 4 hybrid options)
    n_jobs_per_setting = 4 * (4 + 4)
    assert plan.jobs == 3 * n_jobs_per_setting and plan.distinct == 2 * n_jobs_per_setting
    assert plan.requests == 3 * 4 * 2
    # hand count of the prefix trie over the distinct byte sequences
    from rayeval.eval.engines import _expand, token_job

    seqs = {token_job(j).ids for w in works for j in _expand(w.requests, tok, {}, False)}
    assert plan.trie_minimum == PrefixTrie(sorted(seqs)).size
    assert plan.trie_minimum < plan.tokens_distinct < plan.tokens_requested
    assert plan.to_compute == plan.trie_minimum          # one shard: exactly the trie
    # many shards: each pays for its own copy of a shared prefix, never less than the trie
    small = plan_works(make_shards(works, 3), ["m"], tokenizers={"m": (tok, False, 0)}).models[0]
    assert small.to_compute >= small.trie_minimum == plan.trie_minimum and small.distinct == plan.distinct


def test_shards_follow_prompt_order():
    cfg = _cfg([{"name": "baseline"}, {"name": "b2"}], scorings=("symbol", "hybrid", "cloze"))
    works = expand(_items(3), [], cfg, dataset="mmlu")
    flat = [w for s in make_shards(works, 4) for w in s]
    prompts = [w.requests[0].prompt for w in flat]
    assert prompts == sorted(prompts)
    assert sorted(w.key for w in flat) == sorted(w.key for w in works)


def test_attention_groups_bound_padding_on_both_dimensions():
    """Rows of one trie level mix short and long parent paths: each attention group pads to its
    first row's query and key lengths, so every row must fill ``min_fill`` of both and the padded
    cells stay within ``1 / min_fill**2`` of the real ones."""
    import random
    from types import SimpleNamespace

    from rayeval.eval.engines import HFEngine

    rng = random.Random(0)
    q = [rng.choice([rng.randint(1, 12), rng.randint(20, 64)]) for _ in range(400)]
    p = [rng.choice([0, rng.randint(5, 40), rng.randint(200, 460)]) for _ in range(400)]
    order = sorted(range(400), key=lambda i: (-(p[i] + q[i]), -q[i]))
    eng = SimpleNamespace(min_fill=0.75, batch_size=16, max_kv_tokens=4096)
    groups = HFEngine._groups(eng, order, q, p)
    assert sorted(i for g in groups for i in g) == list(range(400))
    padded = real = 0
    for g in groups:
        qm, pm = max(q[i] for i in g), max(p[i] for i in g)
        assert (q[g[0]], p[g[0]]) == (qm, pm)  # the first row sets the group's shape
        assert len(g) <= 16 and len(g) * (pm + qm) <= 4096 or len(g) == 1
        assert all(q[i] >= 0.75 * qm and p[i] + q[i] >= 0.75 * (pm + qm) for i in g)
        padded += len(g) * qm * (pm + qm)
        real += sum(q[i] * (p[i] + q[i]) for i in g)
    assert padded <= real / 0.75 ** 2
    # grouping on the query length alone (sorted by it, as before) pads these rows far more
    qonly, cur = [], None
    for i in sorted(range(400), key=lambda i: (-q[i], -p[i])):
        if cur is None or len(cur) == 16 or q[i] < 0.75 * q[cur[0]]:
            cur = []
            qonly.append(cur)
        cur.append(i)
    old = sum(len(g) * q[g[0]] * (max(p[i] for i in g) + q[g[0]]) for g in qonly)
    assert old > 1.5 * padded, (old, padded, real)


def test_too_long_prompt_names_item_setting_and_scoring():
    cfg = _cfg([{"name": "baseline"}, {"name": "shots", "shots": {"k": 2, "source": "dev"}}])
    dev = [MCQItem(id=f"d{i}", question="long " * 40, choices=["a", "b", "c", "d"], gold=0, subject="math")
           for i in range(2)]
    works = expand(_items(2), dev, cfg, dataset="mmlu")
    plan = plan_works(make_shards(works, 8), ["m"], tokenizers={"m": (ByteTokenizer(), False, 300)})
    assert plan.models[0].too_long and all("setting shots" in t for t in plan.models[0].too_long)
    assert any("mmlu/q0 (setting shots, scoring symbol" in t for t in plan.models[0].too_long)
    ex = Execution.from_engine_dict({"kind": "fake"})
    ex.engine_kwargs["max_model_len"] = 300
    with pytest.raises(ConfigError, match=r"(?s)4 prompt\(s\) do not fit.*mmlu/q0 \(setting shots, scoring symbol"):
        plan_checked(EvalConfig.from_dict({**_cfg_dict(cfg), "models": ["m"]}), ex, make_shards(works, 8))


def _cfg_dict(cfg):
    return {"name": cfg.name, "datasets": [{"name": "mmlu"}], "scorings": [s.label for s in cfg.scorings],
            "settings": [{"name": s.name} for s in cfg.settings]}


def test_engine_options_are_checked_per_kind():
    with pytest.raises(ValueError, match=r"\['gpu_memory_utilization'\] do not apply to the hf engine"):
        Execution.from_engine_dict({"kind": "hf", "gpu_memory_utilization": 0.9})
    with pytest.raises(ValueError, match=r"\['prefix_sharing'\] are hf engine options"):
        Execution.from_engine_dict({"kind": "vllm", "prefix_sharing": True})
    with pytest.raises(ValueError, match="engine.kind"):
        Execution.from_engine_dict({"kind": "hff"})
    with pytest.raises(ValueError, match=r"engine.pools: 'per_model' is not one of model, shared"):
        Execution.from_engine_dict({"kind": "fake", "pools": "per_model"})
    assert Execution.from_engine_dict({"kind": "fake"}).pools == "model"
    # per-kind sections: only the kind that runs takes its options
    ex = Execution.from_engine_dict({"kind": "hf", "vllm": {"gpu_memory_utilization": 0.9}, "hf": {"batch_size": 8}})
    assert ex.kind == "hf" and ex.engine_kwargs == {"batch_size": 8}
    ex = Execution.from_engine_dict({"kind": "vllm", "vllm": {"enforce_eager": True}, "hf": {"batch_size": 8}})
    assert ex.engine_kwargs == {"enforce_eager": True}
    assert Execution.from_engine_dict({"kind": "auto"}).kind in ("hf", "vllm")
    assert Execution.from_engine_dict({"kind": "fake"}).cache_path() is None


# ----------------------------------------------------------------------------- real HFEngine, tiny models

def _tiny(kind: str, folder, sliding: int = 0):
    import torch
    from transformers import AutoTokenizer

    from rayeval.models import resolve_model

    torch.manual_seed(0)
    if kind == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        tok = AutoTokenizer.from_pretrained(str(resolve_model("smollm2-135m")))
        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)
        model = LlamaForCausalLM(cfg)
    else:
        from transformers import Gemma3ForCausalLM, Gemma3TextConfig

        tok = AutoTokenizer.from_pretrained(str(resolve_model("gemma3-270m")))
        cfg = Gemma3TextConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                               num_attention_heads=4, num_key_value_heads=1, head_dim=16, sliding_window=sliding,
                               layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                               max_position_embeddings=2048)
        model = Gemma3ForCausalLM(cfg)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    base = tmp_path_factory.mktemp("tiny")
    return {"llama": _tiny("llama", base / "llama"), "gemma": _tiny("gemma", base / "gemma", sliding=24)}


def _grid_requests(n=6, shots=2):
    items = _items(n)
    dev = [MCQItem(id=f"d{i}", question=f"Which letter comes {i} after A?", choices=["B", "C", "D", "E"],
                   gold=i % 4, subject="math") for i in range(3)]
    cfg = _cfg([{"name": "baseline"}, {"name": "shots", "shots": {"k": shots, "source": "dev"}},
                {"name": "rare", "perturbations": [{"name": "symbols", "set": "rare"}]}],
               scorings=("symbol", "hybrid", "cloze"))
    return flatten(expand(items, dev, cfg, dataset="mmlu"))


def _numbers(results):
    return [x for r in results for x in (r.symbol_logprobs or r.continuation_logprobs)]


@pytest.mark.model
@pytest.mark.parametrize("arch", ["llama", "gemma"])
def test_prefix_sharing_equals_separate_passes(tiny_models, arch, monkeypatch):
    from rayeval.eval.packed import KVStore

    # slots of the KV store never written must never be read, not even as masked padding
    monkeypatch.setattr(KVStore, "unwritten", float("nan"))
    reqs = _grid_requests()
    shared = make_engine("hf", tiny_models[arch], {"dtype": "float32", "num_threads": 1})
    # the reference: no sharing, rows of any length in one pass, the head after every pass
    alone = make_engine("hf", tiny_models[arch], {"dtype": "float32", "num_threads": 1, "prefix_sharing": False,
                                                  "min_fill": 0.0, "head_rows": 0})
    chunked = make_engine("hf", tiny_models[arch], {"dtype": "float32", "num_threads": 1, "head_rows": 3})
    # passes run across trie levels: a node shares a pass with its parent (tree attention in one
    # pass, the parent's keys written to the store before any row attends), fewer passes than levels
    trie = shared._trie(unique(shared.token_jobs(reqs)[1])[0])
    passes = [[n for g in groups for row in g for n in row] for groups in shared._passes(trie)]
    assert len(passes) < len(trie.levels()) <= len(list(shared._passes(trie, per_level=True)))
    assert any(trie.parent[n] in set(ns) for ns in passes for n in ns)
    a, b, c = shared.score(reqs), alone.score(reqs), chunked.score(reqs)
    assert max(abs(x - y) for x, y in zip(_numbers(a), _numbers(b))) < 1e-4
    assert max(abs(x - y) for x, y in zip(_numbers(c), _numbers(b))) < 1e-4
    assert all(math.isfinite(x) for x in _numbers(a))
    assert [r.continuation_tokens for r in a] == [r.continuation_tokens for r in b]
    assert shared.stats["tokens_computed"] < alone.stats["tokens_computed"] / 2
    assert alone.stats["tokens_computed"] == alone.stats["tokens_distinct"]
    # and one request at a time gives the same numbers (batching and packing change nothing)
    one = [shared.score([r])[0] for r in reqs[:8]]
    assert max(abs(x - y) for x, y in zip(_numbers(one), _numbers(a[:8]))) < 1e-4


@pytest.mark.model
@pytest.mark.parametrize("arch", ["llama", "gemma"])
def test_padding_never_reads_a_kv_slot_written_later(tiny_models, arch, monkeypatch):
    """Token sequences whose trie numbers a deep inner node first (the KV store gives it slot 0)
    and pads a shallower level's attention group (parent paths of 2 and 4 tokens): the padding must
    point at slots already written.  Unwritten slots hold NaN here; the numbers must equal every
    sequence computed alone."""
    from rayeval.eval.packed import KVStore
    from rayeval.eval.tokens import PrefixTrie

    monkeypatch.setattr(KVStore, "unwritten", float("nan"))
    seqs = [(101, 102, 103, 104, 105, 106, 107), (101, 102, 103, 104, 105, 106, 108), (101, 102, 103, 104, 109),
            (101, 102, 120), (130, 131, 132, 133, 134, 136, 137), (130, 131, 132, 133, 135, 138, 139)]
    trie = PrefixTrie(seqs)
    inner = [n for n in range(1, len(trie.parent)) if trie.children[n]]
    assert trie.depth[inner[0]] == 3  # slot 0 belongs to a node of the third level
    jobs = [TokenJob(s, 1) for s in seqs]
    fp = {"dtype": "float32", "num_threads": 1, "min_fill": 0.0}
    shared = make_engine("hf", tiny_models[arch], fp)
    levels = [shared._rows(level, trie) for level in trie.levels()]
    second = shared._pass_groups(levels[1], *shared._lengths(levels[1], trie))
    assert len({trie.lo[row[0]] for g in second for row in g}) == 2  # one group, parents of 2 and 4 tokens
    got = shared._compute(jobs)
    alone = make_engine("hf", tiny_models[arch], {**fp, "prefix_sharing": False})._compute(jobs)
    assert all(math.isfinite(x) for v in got for x in v[:1])
    assert max(abs(a[0] - b[0]) for a, b in zip(got, alone)) < 1e-4


@pytest.mark.model
@pytest.mark.parametrize("arch", ["llama", "gemma"])
def test_fused_kernels_compute_what_the_eager_modules_do(tiny_models, arch):
    # fp32, so the comparison is exact to float rounding: the compiled RMSNorm / act*up / rotary
    # kernels (the bf16 CPU default) must be the same functions as the modules they replace
    reqs = _grid_requests(n=2)
    fp = {"dtype": "float32", "num_threads": 1}
    eager = make_engine("hf", tiny_models[arch], {**fp, "fuse": False})
    want = eager.score(reqs)
    fused = make_engine("hf", tiny_models[arch], {**fp, "fuse": True})
    got = fused.score(reqs)
    assert eager.fused == []
    assert any(n.endswith("RMSNorm") for n in fused.fused) and any(n.endswith("MLP") for n in fused.fused)
    assert "apply_rotary_pos_emb" in fused.fused
    assert {"llama": "LlamaDecoderLayer", "gemma": "Gemma3DecoderLayer"}[arch] in fused.fused  # residual adds
    assert max(abs(x - y) for x, y in zip(_numbers(got), _numbers(want))) < 1e-4
    # other kernels, another key space of the score cache
    from rayeval.eval.fused import KERNELS

    assert fused.identity["kernels"] == KERNELS and "kernels" not in eager.identity
    # every kernel compiled at install, its token count symbolic: new lengths compile nothing
    from torch._dynamo.utils import counters

    compiled = counters["stats"]["unique_graphs"]
    fused.score(_grid_requests(n=3)[5:])
    assert counters["stats"]["unique_graphs"] == compiled


@pytest.mark.model
def test_an_engine_that_fused_nothing_says_so_in_its_identity(tiny_models, monkeypatch):
    from rayeval.eval import fused

    monkeypatch.setattr(fused, "fuse_elementwise", lambda model: [])   # every install check failed
    eng = make_engine("hf", tiny_models["llama"], {"dtype": "float32", "fuse": True, "num_threads": 1})
    assert eng.fused == [] and "kernels" not in eng.identity and not eng.vocab_chunk and eng.head_rows == 256


@pytest.mark.model
@pytest.mark.parametrize("arch", ["llama", "gemma"])
def test_vocabulary_head_in_chunks_equals_the_whole_head(tiny_models, arch):
    import torch

    eng = make_engine("hf", tiny_models[arch], {"dtype": "float32", "fuse": True, "num_threads": 1})
    assert eng.vocab_chunk and eng.head_rows == 4096      # what fused engines run with
    n = eng.model.lm_head.weight.shape[0]
    g = torch.Generator().manual_seed(0)
    h = torch.randn(9, eng.model.config.hidden_size, generator=g)
    inv = torch.randint(0, 9, (40,), generator=g)
    ti = torch.cat([torch.randint(0, n, (37,), generator=g), torch.tensor([0, n - 1, 6])])  # both ends, a chunk edge
    for chunk in (7, 64, n + 5):            # a vocabulary not a multiple of the chunk; one chunk
        for softcap in (None, 3.0):
            eng.softcap = softcap
            eng.vocab_chunk = chunk
            got = eng._head_logprobs(h, inv, ti)
            eng.vocab_chunk = 0
            want = eng._head_logprobs(h, inv, ti)
            assert got.shape == want.shape and torch.allclose(got, want, rtol=0, atol=1e-5), (chunk, softcap)


@pytest.mark.model
@pytest.mark.parametrize("model,layer", [("smollm2-135m", "LlamaDecoderLayer"), ("gemma3-270m", "Gemma3DecoderLayer")])
def test_fused_kernels_install_on_the_packaged_models_in_bf16(model, layer):
    # the install checks hold at the dtype the kernels run in (bf16 rounding, the real head counts):
    # a check too strict for bf16 would silently leave a model on the slower kernels
    eng = make_engine("hf", model, {"dtype": "bfloat16", "fuse": True, "num_threads": 1})
    assert {"apply_rotary_pos_emb", layer} <= set(eng.fused)
    assert any(n.endswith("RMSNorm") for n in eng.fused) and any(n.endswith("MLP") for n in eng.fused)
    # the MLP's activation product runs in C where the host can build it, and the identity says so
    from rayeval.eval import fused

    mlp = next(m for m in eng.model.modules() if type(m).__name__.endswith("MLP"))
    act_mul = dict(zip(mlp.forward.__code__.co_freevars, mlp.forward.__closure__))["act_mul"].cell_contents
    c = fused.c_kernels() is not None
    assert getattr(act_mul, "_rayeval_c", False) == c
    assert eng.identity["kernels"] == (fused.KERNELS_C if c else fused.KERNELS)


@pytest.mark.model
@pytest.mark.parametrize("arch", ["llama", "gemma"])
def test_fused_rotary_checks_batches_on_their_first_call(tiny_models, arch):
    # a packed engine installs the one-sequence rotary kernel only; padded batches compile theirs on
    # their first call, checked there against transformers' function, sizes symbolic from then on
    import importlib

    import torch
    from torch._dynamo.utils import counters

    eng = make_engine("hf", tiny_models[arch], {"dtype": "float32", "num_threads": 1, "fuse": True})
    rot = importlib.import_module(type(eng.model).__module__).apply_rotary_pos_emb
    plain = rot._rayeval_plain
    cfg = eng.model.config
    h, hkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    torch.manual_seed(0)

    def call(b, t):
        q, k = torch.randn(b, h, t, d), torch.randn(b, hkv, t, d)
        cos, sin = torch.randn(b, t, d), torch.randn(b, t, d)
        for x, y in zip(rot(q, k, cos, sin), plain(q, k, cos, sin)):
            assert x.shape == y.shape and torch.allclose(x, y, atol=1e-5)

    call(2, 6)
    call(3, 9)
    assert len(rot._rayeval_batched) == 1 and rot._rayeval_batched[0] is not plain  # the compiled kernel, kept
    compiled = counters["stats"]["unique_graphs"]
    call(5, 4)
    assert counters["stats"]["unique_graphs"] == compiled


@pytest.mark.slow
def test_inductor_isa_probe_runs_once_per_host(tmp_path):
    # the first process probes (inductor's subprocesses) and records; the next trusts the CPU's
    # flags because they give the recorded answer; a record that the flags do not reproduce is
    # probed again and rewritten, never trusted
    import json
    import subprocess
    import sys

    code = ("import json, torch; from rayeval.eval.fused import probe_isas_once; "
            "from torch._inductor import config, cpu_vec_isa as v; got = probe_isas_once(); "
            "print(json.dumps([got, config.cpp.vec_isa_ok, str(v.pick_vec_isa())]))")
    env = {**os.environ, "RAYEVAL_CACHE": str(tmp_path)}
    env.pop("TORCHINDUCTOR_VEC_ISA_OK", None)

    def run():
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])

    probed, ok, picked = run()
    if probed is None:
        pytest.skip("not x86-64 Linux: inductor's probe is left as it is")
    assert ok is None and probed and picked == probed[0]
    (rec,) = (tmp_path / "inductor").glob("isa-*.json")
    assert json.loads(rec.read_text())["isas"] == probed
    assert run() == [probed, True, picked]  # trusted: the same instruction sets, no probe
    rec.write_text(json.dumps({"isas": probed[1:]}))  # a record the flags do not give
    assert run() == [probed, None, picked]
    assert json.loads(rec.read_text())["isas"] == probed


def test_fused_kernels_reject_an_unknown_rotary():
    from rayeval.eval.fused import fuse_elementwise

    with pytest.raises(ValueError, match="rotary: 'x' is not one of halves, module"):
        fuse_elementwise(object(), rotary="x")


@pytest.mark.model
@pytest.mark.parametrize("arch", ["llama", "gemma"])
def test_packed_passes_equal_padded_passes(tiny_models, arch):
    # packed: a pass is one unpadded sequence for the linear layers, attention per row group;
    # padded: rows right-padded to the longest in the model's own SDPA.  Same numbers, all scorings.
    reqs = _grid_requests()
    fp = {"dtype": "float32", "num_threads": 1}
    packed = make_engine("hf", tiny_models[arch], {**fp, "max_tokens_per_batch": 200})
    padded = make_engine("hf", tiny_models[arch], {**fp, "packed": False})
    assert packed.packed and not padded.packed
    a, b = packed.score(reqs), padded.score(reqs)
    assert max(abs(x - y) for x, y in zip(_numbers(a), _numbers(b))) < 1e-4
    assert [r.continuation_tokens for r in a] == [r.continuation_tokens for r in b]
    # another attention implementation (or logit soft-capping) cannot be packed: asked for, a clear error
    with pytest.raises(ValueError, match="packed passes need SDPA"):
        make_engine("hf", tiny_models[arch], {**fp, "packed": True, "attn_implementation": "eager"})


@pytest.mark.model
@pytest.mark.parametrize("arch", ["llama", "gemma"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_last_layer_goes_on_with_the_read_rows_only(tiny_models, arch, dtype):
    # past the last layer's attention a packed pass keeps the rows the head reads: that layer's
    # feed-forward sees those alone (the first layer's sees every token computed), same numbers
    reqs = _grid_requests(n=3)
    eng = make_engine("hf", tiny_models[arch], {"dtype": dtype, "num_threads": 1, "max_tokens_per_batch": 200})
    assert eng.cut and (bool(eng.fused) == (dtype == "bfloat16"))
    rows = {"first": 0, "last": 0}

    def count(name):
        return lambda m, args, out: rows.__setitem__(name, rows[name] + args[0].reshape(-1, args[0].shape[-1]).shape[0])
    hooks = [eng.base.layers[0].mlp.register_forward_hook(count("first")),
             eng.base.layers[-1].mlp.register_forward_hook(count("last"))]
    try:
        cut = eng.score(reqs)
    finally:
        for h in hooks:
            h.remove()
    jobs = unique(eng.token_jobs(reqs)[1])[0]
    reads = {(tuple(j.ids[:pos + 1])) for j in jobs for pos, _ in j.queries()}  # distinct positions read
    assert rows["first"] == eng.stats["tokens_computed"]
    assert rows["last"] == len(reads) < rows["first"] / 2
    eng.cut = False
    whole = eng.score(reqs)
    diff = max(abs(x - y) for x, y in zip(_numbers(cut), _numbers(whole)))
    assert diff < (1e-5 if dtype == "float32" else 0.05), diff
    assert [r.continuation_tokens for r in cut] == [r.continuation_tokens for r in whole]


@pytest.mark.model
@pytest.mark.parametrize("arch", ["llama", "gemma"])
def test_shared_prefixes_compute_what_a_plain_forward_pass_does(tiny_models, arch):
    # Gemma's prompts are far longer than the tiny model's 24-token window: the shared-prefix,
    # packed path must apply the window exactly as a plain forward pass over the whole sequence does
    import torch

    eng = make_engine("hf", tiny_models[arch], {"dtype": "float32", "num_threads": 1})
    reqs = _grid_requests(n=3, shots=2)[:6]
    got = eng.score(reqs)
    for r, res in zip(reqs, got):
        ids = eng.tokenizer.encode(r.prompt, add_special_tokens=False)
        ids = [eng.tokenizer.bos_token_id] + ids if eng.add_bos else ids
        if r.symbols is None:
            continue
        with torch.no_grad():
            logits = eng.model(input_ids=torch.tensor([ids])).logits[0, -1].float()
        lp = torch.log_softmax(logits, -1)
        tids = [eng.tokenizer.encode(" " + s, add_special_tokens=False)[0] for s in r.symbols]
        assert len(ids) > 24
        assert max(abs(float(lp[t]) - x) for t, x in zip(tids, res.symbol_logprobs)) < 1e-4


# ----------------------------------------------------------------------------- score cache

@pytest.mark.model
def test_score_cache_hits_misses_and_invalidation(tiny_models, tmp_path):
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    reqs = _grid_requests(n=4)
    cache = str(tmp_path / "scores")
    first = make_engine("hf", tiny_models["llama"], {"dtype": "float32", "num_threads": 1, "score_cache": cache})
    a = first.score(reqs)
    assert first.stats["cache_hits"] == 0 and first.stats["tokens_computed"] > 0
    # a second identical run (new engine, same cache) computes nothing and returns the same numbers
    second = make_engine("hf", tiny_models["llama"], {"dtype": "float32", "num_threads": 1, "score_cache": cache})
    b = second.score(reqs)
    assert second.stats["tokens_computed"] == 0 and second.stats["cache_hits"] == second.stats["distinct_jobs"]
    assert _numbers(a) == _numbers(b)
    # an added setting computes only its own requests
    extra = [ScoreRequest(prompt=r.prompt + "\nAnswer again:", symbols=r.symbols) for r in reqs if r.symbols][:3]
    third = make_engine("hf", tiny_models["llama"], {"dtype": "float32", "num_threads": 1, "score_cache": cache})
    third.score(reqs + extra)
    assert third.stats["distinct_jobs"] - third.stats["cache_hits"] == 3
    # changed weights: a new fingerprint, nothing is reused
    moved = tmp_path / "changed"
    shutil.copytree(tiny_models["llama"], moved)
    w = load_file(str(moved / "model.safetensors"))
    name = next(k for k in w if k.endswith("q_proj.weight"))
    w[name] = w[name] + 0.5
    save_file(w, str(moved / "model.safetensors"), metadata={"format": "pt"})
    fourth = make_engine("hf", str(moved), {"dtype": "float32", "num_threads": 1, "score_cache": cache})
    c = fourth.score(reqs)
    assert fourth.stats["cache_hits"] == 0 and fourth.identity["weights"] != first.identity["weights"]
    assert _numbers(c) != _numbers(a)
    # the dtype is part of the identity too
    bf = make_engine("hf", tiny_models["llama"], {"dtype": "bfloat16", "num_threads": 1, "score_cache": cache})
    bf.score(reqs[:2])
    assert bf.stats["cache_hits"] == 0
    del torch


# ----------------------------------------------------------------------------- packaged models

@pytest.mark.model
@pytest.mark.parametrize("model", ["smollm2-135m", "gemma3-270m"])
def test_packaged_models_prefix_sharing_numerics(model):
    reqs = _grid_requests(n=3, shots=2)
    fp = {"dtype": "float32", "num_threads": 2}
    a = make_engine("hf", model, fp).score(reqs)
    b = make_engine("hf", model, {**fp, "prefix_sharing": False}).score(reqs)
    assert max(abs(x - y) for x, y in zip(_numbers(a), _numbers(b))) < 1e-3


@pytest.mark.model
def test_plan_cli_on_a_packaged_config():
    from rayeval.cli import app

    res = CliRunner().invoke(app, ["plan", "eval_pipeline", "--no-cache", "--json"])
    assert res.exit_code == 0, res.output
    import json

    p = json.loads(res.output)
    assert p["config"] == "eval_pipeline" and p["shards"] > 1
    names = {m["model"] for m in p["models"]}
    assert names == {"smollm2-135m", "gemma3-270m"}
    for m in p["models"]:
        assert m["trie_minimum"] <= m["to_compute"] < m["tokens_requested"]
        assert m["distinct"] <= m["jobs"] and m["cache_hits"] == 0 and not m["too_long"]
        assert m["to_compute"] <= 1.25 * m["trie_minimum"]
    text = CliRunner().invoke(app, ["plan", "eval_pipeline", "--no-cache"]).output
    assert "trie minimum" in text and "smollm2-135m" in text


def test_shift_jobs_moves_request_indices_by_the_requests_before():
    from rayeval.eval.engines import shift_jobs

    a = [("sym", 0, [1, 2], [7, 8]), ("cont", 1, 0, [1], [3]), ("cont", 1, 1, [1], [4])]
    b = [("sym", 0, [5], [7, 8])]
    assert shift_jobs([a, b, a], [2, 1, 2]) == a + [("sym", 2, [5], [7, 8])] + [
        ("sym", 3, [1, 2], [7, 8]), ("cont", 4, 0, [1], [3]), ("cont", 4, 1, [1], [4])]
    assert shift_jobs([], []) == []


def test_the_plan_keeps_token_jobs_only_for_models_with_their_own_tokenizer():
    works = expand(_items(3), [], _cfg([{"name": "baseline"}], scorings=("symbol", "cloze")), dataset="mmlu")
    shards = make_shards(works, 2)
    out: dict = {}
    plan_works(shards, ["m"], jobs_out=out)   # "m" is on no disk: the plan counts bytes, ships nothing
    assert out == {}


@pytest.mark.model
def test_shards_carry_the_plans_token_jobs_and_the_engine_scores_them_as_they_are():
    """The driver's plan tokenizes every request; each shard ships those token jobs, so the actor's
    engine never loads its tokenizer's vocabulary, and its rows equal those of an engine that
    tokenized the same works itself."""
    from dataclasses import asdict

    from rayeval.eval.pipeline import ScoreActor, ShardPayload

    model = "smollm2-135m"
    dev = [MCQItem(id=f"d{i}", question=f"Dev {i}?", choices=["a", "b", "c", "d"], gold=i % 4, subject="math")
           for i in range(2)]
    cfg = EvalConfig.from_dict({"name": "t", "models": [model], "datasets": [{"name": "mmlu"}],
                                "scorings": ["symbol", "hybrid", "cloze"],
                                "settings": [{"name": "baseline"}, {"name": "shots", "shots": {"k": 2, "source": "dev"}},
                                             {"name": "rare", "perturbations": [{"name": "symbols", "set": "rare"}]}]})
    works = expand(_items(3), dev, cfg, dataset="mmlu")
    shards = make_shards(works, 16)
    ex = Execution.from_engine_dict({"kind": "hf", "cache": False})
    planned: dict = {}
    plan_checked(cfg, ex, shards, jobs_out=planned)
    assert list(planned) == [model] and len(planned[model]) == len(shards)
    assert [len(p) for p in planned[model]] == [len(s) for s in shards]
    actor = ScoreActor([model], asdict(ex))
    tok = actor.engines[model].tokenizer
    assert tok._backend is None   # the engine started without the vocabulary
    shipped = [row for i, s in enumerate(shards) for row in actor.process(i, ShardPayload(s, {model: planned[model][i]}))]
    assert tok._backend is None and actor.engines[model].stats["requests"] == sum(len(w.requests) for w in works)
    own = ScoreActor([model], asdict(ex))
    tokenized = [row for i, s in enumerate(shards) for row in own.process(i, ShardPayload(s))]
    assert own.engines[model].tokenizer._backend is not None
    drop = lambda rows: [{k: v for k, v in r.items() if k != "_stats"} for r in rows]  # noqa: E731
    assert drop(shipped) == drop(tokenized) and len(shipped) == len(works)
