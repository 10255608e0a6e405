"""Names of the tasks and of the built-in models and datasets: what torch-free modules need to know of them."""

from __future__ import annotations

LM, CLS = "lm", "cls"
BUILTIN_TASKS = {"tiny-gpt2": LM, "tiny-bert": CLS, "mlp-bn": CLS}
# Built-in models that normalize with BatchNorm: a micro-batch of one sample cannot train them.
BATCH_NORM_MODELS = frozenset({"mlp-bn"})
SYNTHETIC_TASKS = {"synthetic-lm": LM, "synthetic-cls": CLS}
