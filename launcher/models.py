"""Model builders: tiny transformers from a config (random init, no download), or pretrained via ``hf:``."""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from launcher.builtin import BUILTIN_TASKS, CLS, LM
from launcher.config import ConfigError, ModelConfig
from launcher.tiny_models import MlpBatchNorm, TinyBert, TinyGPT2

# transformers is imported where an hf: model needs it: a run of a built-in model never pays its ~2 s import.

ENCODE_CHUNK_ROWS = 20_000  # rows per encoder call: a fast tokenizer spreads each call over the cores


@dataclass
class Encoded:
    """Tokenized rows as flat arrays: what a token store holds."""

    tokens: np.ndarray  # int64, every row's ids one after the other
    offsets: np.ndarray  # int64, rows + 1: row i is tokens[offsets[i]:offsets[i + 1]]
    segments: np.ndarray | None  # uint8 like tokens: 0 first text, 1 second, for pairs when the tokenizer makes them
    truncated: int  # rows cut at the length limit


def concatenated(parts: list[Encoded]) -> Encoded:
    """The chunks of one table, encoded one after the other, as one."""
    lengths = np.concatenate([np.diff(p.offsets) for p in parts]) if parts else np.zeros(0, dtype=np.int64)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    empty = np.zeros(0, dtype=np.int64)
    tokens = np.concatenate([p.tokens for p in parts]) if parts else empty
    segments = np.concatenate([p.segments for p in parts]) if parts and parts[0].segments is not None else None
    return Encoded(tokens, offsets, segments, sum(p.truncated for p in parts))


def encoded_from_rows(rows: list[list[int]], segments: list[list[int]] | None, truncated: int) -> Encoded:
    lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
    offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    tokens = np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int64, count=int(offsets[-1]))
    segs = None
    if segments is not None:
        segs = np.fromiter(itertools.chain.from_iterable(segments), dtype=np.uint8, count=int(offsets[-1]))
    return Encoded(tokens, offsets, segs, truncated)


# encode(texts, pairs or None, max_length or None for no limit) -> Encoded
Encoder = Callable[[list[str], list[str] | None, int | None], Encoded]


@dataclass(frozen=True)
class Tokenizer:
    vocab_size: int
    pad_token_id: int
    eos_token_id: int | None  # what separates packed documents (data.packing)
    # Changes whenever the tokenizer would give other ids: part of the token store's key.
    fingerprint: str
    encode: Encoder


class ByteTokenizer:
    """UTF-8 bytes as token ids, for the built-in models: no vocabulary file to download."""

    vocab_size = 258
    pad_token_id = 256
    bos_token_id = 257
    fingerprint = "byte-tokenizer-v1"  # the token store's key for it: change it when encode() changes

    def encode(self, texts: list[str], pairs: list[str] | None, max_length: int | None) -> Encoded:
        """``[bos] + a`` or, for a pair, ``[bos] + a + [bos] + b``; truncated to ``max_length`` tokens."""
        bos = self.bos_token_id
        if pairs is None:
            rows = [[bos, *a.encode("utf-8")] for a in texts]
        else:
            rows = [[bos, *a.encode("utf-8"), bos, *b.encode("utf-8")] for a, b in zip(texts, pairs, strict=True)]
        truncated = sum(len(row) > max_length for row in rows) if max_length else 0
        return encoded_from_rows([row[:max_length] for row in rows], None, truncated)

    def spec(self) -> Tokenizer:
        return Tokenizer(self.vocab_size, self.pad_token_id, self.bos_token_id, self.fingerprint, self.encode)


@dataclass(frozen=True)
class ModelSpec:
    """What a model config says before any weight is loaded: the task (None when only the data can tell) and
    the tokenizer, so that the data is checked and tokenized before the model is built."""

    cfg: ModelConfig
    task: str | None
    tokenizer: Tokenizer
    hf_config: object | None = None  # the transformers config of an hf: model
    source: str | None = None  # its folder or hub id

    @property
    def vocab_size(self) -> int:
        """Rows of the model's embedding: every token id must be below it."""
        return getattr(self.hf_config, "vocab_size", None) or self.tokenizer.vocab_size


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


def _task_of(cfg: ModelConfig, architectures: list[str] | None) -> str | None:
    """lm or cls from model.task, the built-in model or the architecture's head; None for a base model (a
    ``BertModel`` folder), whose task the data decides."""
    if cfg.task != "auto":
        return cfg.task
    if cfg.name in BUILTIN_TASKS:
        return BUILTIN_TASKS[cfg.name]
    arch = " ".join(architectures or [])
    if "ForCausalLM" in arch or "LMHeadModel" in arch:
        return LM
    if "ForSequenceClassification" in arch:
        return CLS
    return None


def _builtin(cfg: ModelConfig, tok: Tokenizer, num_labels: int, positions: int) -> nn.Module:
    if cfg.hidden_size % cfg.num_heads:
        raise ConfigError(f"model.hidden_size={cfg.hidden_size} must be divisible by model.num_heads={cfg.num_heads}")
    dropout = cfg.dropout or 0.0  # the built-in models' own dropout is 0
    if cfg.name == "tiny-gpt2":
        return TinyGPT2(tok.vocab_size, positions, cfg.hidden_size, cfg.num_layers, cfg.num_heads, dropout)
    if cfg.name == "tiny-bert":
        shape = (positions, cfg.hidden_size, cfg.num_layers, cfg.num_heads)
        return TinyBert(tok.vocab_size, tok.pad_token_id, *shape, num_labels, dropout)
    return MlpBatchNorm(tok.vocab_size, cfg.hidden_size, cfg.num_layers, num_labels, dropout)


def first_line(err: BaseException) -> str:
    """The first line of an error's message (or its type): library errors run to many lines."""
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def _unknown_architecture(name: str, model_type: str) -> ConfigError:
    import transformers

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
    from transformers import CONFIG_MAPPING

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
    """Batch encoding with the tokenizer's own special tokens and truncation (longest first, its truncation
    side). A fast tokenizer's Rust encoder runs on every core and reports truncation itself; a slow one goes
    through its Python call."""
    if not getattr(tokenizer, "is_fast", False):
        return _slow_hf_encoder(tokenizer)
    from tokenizers import Tokenizer as RustTokenizer

    backend = RustTokenizer.from_str(tokenizer.backend_tokenizer.to_str())  # a copy: its settings change below
    backend.no_padding()  # some tokenizer.json files pad every row to a fixed length

    def encode(texts: list[str], pairs: list[str] | None, max_length: int | None) -> Encoded:
        if max_length:
            backend.enable_truncation(max_length, strategy="longest_first", direction=tokenizer.truncation_side)
        else:
            backend.no_truncation()
        # encode_batch_fast skips the character offsets, which a token store does not keep: 1.6x the rows/s.
        batch = getattr(backend, "encode_batch_fast", backend.encode_batch)
        encodings = batch(texts if pairs is None else list(zip(texts, pairs, strict=True)))
        rows = [e.ids for e in encodings]
        # Only a row at the limit can have been cut: asking the others for their overflow costs a list each.
        truncated = sum(1 for e, r in zip(encodings, rows, strict=True) if len(r) == max_length and e.overflowing)
        # Segment ids matter only for a pair (one text is all zeros).
        segments = [e.type_ids for e in encodings] if pairs is not None else None
        return encoded_from_rows(rows, segments, truncated)

    return encode


def _slow_hf_encoder(tokenizer: object) -> Encoder:
    def encode(texts: list[str], pairs: list[str] | None, max_length: int | None) -> Encoded:
        out = tokenizer(texts, pairs, truncation=bool(max_length), max_length=max_length)
        full = tokenizer(texts, pairs)["input_ids"] if max_length else out["input_ids"]
        truncated = sum(len(a) > len(b) for a, b in zip(full, out["input_ids"], strict=True))
        segments = out.get("token_type_ids") if pairs is not None else None
        return encoded_from_rows(out["input_ids"], segments, truncated)

    return encode


def hf_tokenizer(name: str, tokenizer: object) -> Tokenizer:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ConfigError(f"model.name={name!r}: the tokenizer has neither a pad nor an eos token")
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    return Tokenizer(len(tokenizer), pad, eos, tokenizer_fingerprint(tokenizer), _hf_encoder(tokenizer))


def _open_pretrained(cfg: ModelConfig) -> tuple[str, object, object]:
    """(source, transformers config, tokenizer) of an hf: model, without its weights; one line per mistake."""
    from transformers import AutoConfig, AutoTokenizer

    source = cfg.name.removeprefix("hf:")
    if not source:
        raise ConfigError("model.name='hf:' needs a local folder or a hub id after 'hf:'")
    looks_local = source.startswith((".", "/", "~")) or Path(source).exists()
    if looks_local:
        source = str(Path(source).expanduser())
        _check_local_folder(cfg.name, Path(source))
    try:
        return source, AutoConfig.from_pretrained(source), AutoTokenizer.from_pretrained(source)
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


def model_spec(cfg: ModelConfig) -> ModelSpec:
    """The task and tokenizer of the model ``cfg`` names: a config file and a vocabulary at most, no weights."""
    if cfg.name in BUILTIN_TASKS:
        task = _task_of(cfg, None)
        if task != BUILTIN_TASKS[cfg.name]:
            kind = "a causal LM" if BUILTIN_TASKS[cfg.name] == LM else "a classifier"
            raise ConfigError(f"model.task={cfg.task!r} does not fit model.name={cfg.name!r} ({kind})")
        return ModelSpec(cfg, task, ByteTokenizer().spec())
    if not cfg.name.startswith("hf:"):
        raise ConfigError(
            f"model.name={cfg.name!r} is not known; choose tiny-gpt2, tiny-bert, mlp-bn or hf:<folder or hub id>"
        )
    source, config, tokenizer = _open_pretrained(cfg)
    task = _task_of(cfg, getattr(config, "architectures", None))
    return ModelSpec(cfg, task, hf_tokenizer(cfg.name, tokenizer), config, source)


def pretrained_config(name: str) -> object:
    """The transformers config of an ``hf:`` model (its config.json), without its weights."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(name.removeprefix("hf:"))


def build_model(spec: ModelSpec, task: str, num_labels: int, max_positions: int, dtype: torch.dtype) -> nn.Module:
    """The model of ``spec`` for ``task``, every dropout set to model.dropout (when set), in ``dtype``."""
    cfg = spec.cfg
    if cfg.name in BUILTIN_TASKS:
        model = _builtin(cfg, spec.tokenizer, num_labels, max_positions)
    else:
        model = _pretrained(spec, task, num_labels)
    if cfg.dropout is not None:
        _force_dropout(model, cfg.dropout)
    return model.to(dtype)


def _pretrained(spec: ModelSpec, task: str, num_labels: int) -> nn.Module:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    cfg, config = spec.cfg, spec.hf_config
    if cfg.dropout is not None:
        _set_dropout(config, cfg.dropout)
    if task == CLS and getattr(config, "num_labels", None) != num_labels:
        config.num_labels = num_labels
    auto = AutoModelForCausalLM if task == LM else AutoModelForSequenceClassification
    try:
        model = auto.from_pretrained(spec.source, config=config)
    except ValueError as err:
        raise ConfigError(f"model.name={cfg.name!r} has no {task} head: {first_line(err)}") from None
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = spec.tokenizer.pad_token_id
    return model
