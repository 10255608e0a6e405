"""Model builders: tiny transformers from a config (random init, no download), or pretrained via ``hf:``."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from torch import nn
from transformers import (
    CONFIG_MAPPING,
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
)

from launcher.builtin import BUILTIN_TASKS, CLS, LM
from launcher.config import ConfigError, ModelConfig

ENCODE_BATCH_ROWS = 1000  # rows per tokenizer call: fast tokenizers work on a batch in parallel

# What an encoder returns: "input_ids" per row, and "token_type_ids" (0 = first text, 1 = second) for pairs when
# the tokenizer makes them (BERT-style models were pretrained with these segment ids).
Encoded = dict[str, list[list[int]]]
# encode(texts, pairs or None, max_length) -> Encoded
Encoder = Callable[[list[str], list[str] | None, int], Encoded]


class ByteTokenizer:
    """UTF-8 bytes as token ids, for the built-in models: no vocabulary file to download."""

    vocab_size = 258
    pad_token_id = 256
    bos_token_id = 257
    fingerprint = "byte-tokenizer-v1"  # the tokenization cache's key for it: change it when encode() changes

    def encode(self, texts: list[str], pairs: list[str] | None, max_length: int) -> Encoded:
        """``[bos] + a`` or, for a pair, ``[bos] + a + [bos] + b``; truncated to ``max_length`` tokens."""
        bos = self.bos_token_id
        if pairs is None:
            rows = [[bos, *a.encode("utf-8")] for a in texts]
        else:
            rows = [[bos, *a.encode("utf-8"), bos, *b.encode("utf-8")] for a, b in zip(texts, pairs, strict=True)]
        return {"input_ids": [row[:max_length] for row in rows]}


@dataclass
class ModelBundle:
    model: nn.Module
    task: str  # LM or CLS
    vocab_size: int
    pad_token_id: int
    encode: Encoder
    # Changes whenever the tokenizer would give other ids: part of the tokenization cache's key.
    tokenizer_fingerprint: str = ByteTokenizer.fingerprint


def _set_dropout(config: object, p: float) -> None:
    """Set every float dropout probability of a transformers config (attention, hidden, embedding...)."""
    for key, value in list(vars(config).items()):
        if isinstance(value, float) and ("dropout" in key or "pdrop" in key):
            setattr(config, key, p)


def _force_dropout(model: nn.Module, p: float) -> None:
    # Some architectures hard-code a dropout module outside the config keys.
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = p


def _task_of(cfg: ModelConfig, architectures: list[str] | None) -> str:
    if cfg.task != "auto":
        return cfg.task
    if cfg.name in BUILTIN_TASKS:
        return BUILTIN_TASKS[cfg.name]
    arch = " ".join(architectures or [])
    if "ForCausalLM" in arch or "LMHeadModel" in arch:
        return LM
    if "ForSequenceClassification" in arch:
        return CLS
    raise ConfigError(
        f"model.task=auto cannot tell the task of model.name={cfg.name!r} (architectures: {arch or 'none'}); "
        "set model.task=lm or model.task=cls"
    )


# The built-in transformers: (task, config class, model class, the config's names for positions, width,
# depth and heads). The same tiny shape in each architecture's own words.
TINY = {
    "tiny-gpt2": (LM, GPT2Config, GPT2LMHeadModel, ("n_positions", "n_embd", "n_layer", "n_head")),
    "tiny-bert": (
        CLS,
        BertConfig,
        BertForSequenceClassification,
        ("max_position_embeddings", "hidden_size", "num_hidden_layers", "num_attention_heads"),
    ),
}


def _tiny(cfg: ModelConfig, max_positions: int) -> ModelBundle:
    tok = ByteTokenizer()
    task = _task_of(cfg, None)
    expected, config_class, build, names = TINY[cfg.name]
    if task != expected:
        kind = "a causal LM" if expected == LM else "a classifier"
        raise ConfigError(f"model.task={cfg.task!r} does not fit model.name={cfg.name!r} ({kind})")
    shape = dict(zip(names, (max_positions, cfg.hidden_size, cfg.num_layers, cfg.num_heads), strict=True))
    if task == LM:
        extra = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.bos_token_id}
    else:
        extra = {"intermediate_size": 4 * cfg.hidden_size, "num_labels": cfg.num_labels}
    config = config_class(vocab_size=tok.vocab_size, pad_token_id=tok.pad_token_id, **shape, **extra)
    if cfg.hidden_size % cfg.num_heads:
        raise ConfigError(f"model.hidden_size={cfg.hidden_size} must be divisible by model.num_heads={cfg.num_heads}")
    _set_dropout(config, cfg.dropout)
    # Eager attention: the same kernels for every batch shape, so splits compare exactly.
    config._attn_implementation = "eager"
    model = build(config)
    return ModelBundle(model, task, tok.vocab_size, tok.pad_token_id, tok.encode, tok.fingerprint)


def first_line(err: BaseException) -> str:
    """The first line of an error's message (or its type): library errors run to many lines."""
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def _unknown_architecture(name: str, model_type: str) -> ConfigError:
    return ConfigError(
        f"model.name={name!r} is a {model_type!r} model (config.json model_type), an architecture transformers "
        f"{transformers.__version__} does not know; use a model of a known type or a transformers that has it"
    )


def _check_local_folder(name: str, folder: Path) -> None:
    """A missing folder, a folder without config.json and an unknown architecture, each in its own words
    (transformers would report all three as a long, generic message)."""
    if not folder.is_dir():
        raise ConfigError(f"model.name={name!r}: no such folder")
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ConfigError(f"model.name={name!r}: the folder has no config.json (save the model with save_pretrained)")
    try:
        model_type = json.loads(config_file.read_text()).get("model_type")
    except (ValueError, AttributeError):
        raise ConfigError(f"model.name={name!r}: {config_file.name} is not a JSON object") from None
    if model_type is not None and model_type not in CONFIG_MAPPING:
        raise _unknown_architecture(name, model_type)


def tokenizer_fingerprint(tokenizer: object) -> str:
    """A hash of everything that decides a transformers tokenizer's ids: for a fast tokenizer its whole
    serialized pipeline (vocabulary, normalizer, pre-tokenizer, post-processor), else its vocabulary and
    special tokens; plus the class and the truncation side."""
    digest = hashlib.sha256(type(tokenizer).__name__.encode())
    if getattr(tokenizer, "is_fast", False):
        digest.update(tokenizer.backend_tokenizer.to_str().encode())
    else:
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
        digest.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str).encode())
    digest.update(str(getattr(tokenizer, "truncation_side", "right")).encode())
    return digest.hexdigest()


def _hf_encoder(tokenizer: object) -> Encoder:
    def encode(texts: list[str], pairs: list[str] | None, max_length: int) -> Encoded:
        out: Encoded = {"input_ids": []}
        for start in range(0, len(texts), ENCODE_BATCH_ROWS):
            chunk = slice(start, start + ENCODE_BATCH_ROWS)
            encoded = tokenizer(
                texts[chunk], pairs[chunk] if pairs is not None else None, truncation=True, max_length=max_length
            )
            out["input_ids"] += encoded["input_ids"]
            # Segment ids matter only for a pair (one text is all zeros, the models' default).
            if pairs is not None and "token_type_ids" in encoded:
                out.setdefault("token_type_ids", []).extend(encoded["token_type_ids"])
        return out

    return encode


@dataclass
class ClassifierOutput:
    logits: torch.Tensor


class MlpBatchNorm(nn.Module):
    """Bag-of-bytes classifier with BatchNorm: embedding, masked mean over the tokens, then ``num_layers``
    blocks of Linear -> BatchNorm1d -> ReLU, dropout, and a Linear to the classes.

    Small and free of attention on purpose: what it shows is BatchNorm's dependence on the micro-batch.
    The masked mean makes a sample's features independent of the padding its micro-batch needs.
    """

    def __init__(self, vocab_size: int, hidden_size: int, num_layers: int, num_labels: int, dropout: float) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, hidden_size)
        blocks = []
        for _ in range(num_layers):
            blocks += [nn.Linear(hidden_size, hidden_size), nn.BatchNorm1d(hidden_size), nn.ReLU()]
        self.body = nn.Sequential(*blocks, nn.Dropout(dropout))
        self.head = nn.Linear(hidden_size, num_labels)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> ClassifierOutput:
        mask = attention_mask.unsqueeze(-1).to(self.embed.weight.dtype)
        pooled = (self.embed(input_ids) * mask).sum(1) / mask.sum(1).clamp(min=1)
        return ClassifierOutput(self.head(self.body(pooled)))


def _mlp_bn(cfg: ModelConfig) -> ModelBundle:
    if _task_of(cfg, None) != CLS:
        raise ConfigError(f"model.task={cfg.task!r} does not fit model.name='mlp-bn' (a classifier)")
    tok = ByteTokenizer()
    model = MlpBatchNorm(tok.vocab_size, cfg.hidden_size, cfg.num_layers, cfg.num_labels, cfg.dropout)
    return ModelBundle(model, CLS, tok.vocab_size, tok.pad_token_id, tok.encode, tok.fingerprint)


def _pretrained(cfg: ModelConfig) -> ModelBundle:
    source = cfg.name.removeprefix("hf:")
    if not source:
        raise ConfigError("model.name='hf:' needs a local folder or a hub id after 'hf:'")
    looks_local = source.startswith((".", "/", "~")) or Path(source).exists()
    if looks_local:
        _check_local_folder(cfg.name, Path(source).expanduser())
    try:
        config = AutoConfig.from_pretrained(source)
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as err:
        unknown = re.search(r"model type `([^`]+)` but Transformers does not recognize", str(err))
        if unknown:
            raise _unknown_architecture(cfg.name, unknown.group(1)) from None
        if looks_local:
            raise ConfigError(
                f"model.name={cfg.name!r} could not be loaded from its folder: {first_line(err)}"
            ) from None
        raise ConfigError(
            f"model.name={cfg.name!r} is not a local folder and could not be loaded from the hub "
            f"(no network, or no such model?): {first_line(err)}"
        ) from None
    task = _task_of(cfg, getattr(config, "architectures", None))
    _set_dropout(config, cfg.dropout)
    if task == CLS and getattr(config, "num_labels", None) != cfg.num_labels:
        config.num_labels = cfg.num_labels
    auto = AutoModelForCausalLM if task == LM else AutoModelForSequenceClassification
    try:
        model = auto.from_pretrained(source, config=config)
    except ValueError as err:
        raise ConfigError(f"model.name={cfg.name!r} has no {task} head: {first_line(err)}") from None
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ConfigError(f"model.name={cfg.name!r}: the tokenizer has neither a pad nor an eos token")
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = pad

    return ModelBundle(
        model, task, model.config.vocab_size, pad, _hf_encoder(tokenizer), tokenizer_fingerprint(tokenizer)
    )


def pretrained_config(name: str) -> object:
    """The transformers config of an ``hf:`` model (its config.json), without its weights."""
    return AutoConfig.from_pretrained(name.removeprefix("hf:"))


def build_model(cfg: ModelConfig, max_positions: int, dtype: torch.dtype) -> ModelBundle:
    """Build the model named by ``cfg`` with every dropout set to ``cfg.dropout``, in ``dtype``."""
    if cfg.name == "mlp-bn":
        bundle = _mlp_bn(cfg)
    elif cfg.name in BUILTIN_TASKS:
        bundle = _tiny(cfg, max_positions)
    elif cfg.name.startswith("hf:"):
        bundle = _pretrained(cfg)
    else:
        raise ConfigError(
            f"model.name={cfg.name!r} is not known; choose tiny-gpt2, tiny-bert, mlp-bn or hf:<folder or hub id>"
        )
    _force_dropout(bundle.model, cfg.dropout)
    bundle.model.to(dtype)
    return bundle
