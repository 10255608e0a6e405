"""Predicting every split, ranking those that fit, and the recommendation with its reasons. Pure Python."""

from __future__ import annotations

from launcher.config import ConfigError
from launcher.plan.model import Link, Profile, Split, predict, size_text
from launcher.plan.results import Candidate, candidate


def predict_all(
    splits: list[Split], profile: Profile, link: Link, memory_bytes: int, reserved_bytes: int, memory_text: str
) -> list[Candidate]:
    """Every split predicted and ranked: the fitting ones fastest first (fewer devices, then larger micro
    batches, on a tie), then the rest by memory. Raises ConfigError, naming the smallest need, when none fits."""
    found = [candidate(s, predict(s, profile, link, reserved_bytes), link, memory_bytes) for s in splits]
    fitting = sorted(
        (c for c in found if c.fits), key=lambda c: (c.predicted_step_time_s, c.world_size, -c.micro_batch_size)
    )
    rest = sorted((c for c in found if not c.fits), key=lambda c: c.predicted_memory_bytes)
    memory_key = "device_memory"
    if not fitting:
        least = rest[0]
        raise ConfigError(
            f"{memory_key}={memory_text!r} is not valid: no split fits in {size_text(memory_bytes)}; the smallest, "
            f"{least.label()}, needs {size_text(least.predicted_memory_bytes)} per device "
            f"({size_text(least.predicted_model_state_bytes)} model state, "
            f"{size_text(least.predicted_activation_bytes)} activations, {size_text(reserved_bytes)} reserved): "
            "give more memory, more devices (fsdp shards the state), or a smaller micro batch"
        )
    for i, c in enumerate(fitting, 1):
        c.rank = i
    return fitting + rest


def _same_but(c: Candidate, pool: list[Candidate], **changes: object) -> Candidate | None:
    want = {**{k: getattr(c, k) for k in ("world_size", "micro_batch_size", "strategy", "sync")}, **changes}
    return next((o for o in pool if all(getattr(o, k) == v for k, v in want.items())), None)


def reasons(best: Candidate, candidates: list[Candidate]) -> list[str]:
    """Why ``best`` is recommended, each reason a comparison with the alternative it beats."""
    fitting = [c for c in candidates if c.fits]
    why = [
        f"fastest predicted step of the {len(fitting)} splits that fit: {best.predicted_step_time_s * 1e3:.1f} ms, "
        f"{best.predicted_samples_per_s:,.0f} samples/s ({best.predicted_tokens_per_s:,.0f} tokens/s), "
        f"{size_text(best.predicted_memory_bytes)} per device"
    ]
    if best.accum_steps > 1:
        other = _same_but(best, fitting, sync="every_step" if best.sync == "no_sync" else "no_sync")
        if other:
            why.append(
                f"{best.sync} over {other.sync}: {other.predicted_step_time_s / best.predicted_step_time_s:.2f}x "
                f"the step time, {sum(other.bytes_per_step.values()):,.0f} vs {sum(best.bytes_per_step.values()):,.0f} "
                "bytes per step"
            )
    other_strategy = next((c for c in fitting if c.strategy != best.strategy), None)
    if other_strategy:
        why.append(
            f"the best {other_strategy.strategy} split, {other_strategy.label()}, is "
            f"{other_strategy.predicted_step_time_s / best.predicted_step_time_s:.2f}x slower"
        )
    fewer = [c for c in fitting if c.world_size < best.world_size]
    if fewer:
        alt = fewer[0]
        speedup = alt.predicted_step_time_s / best.predicted_step_time_s
        why.append(
            f"{best.world_size} devices are {speedup:.2f}x faster than the best on {alt.world_size} ({alt.label()}): "
            f"{speedup * alt.world_size / best.world_size:.0%} scaling efficiency"
        )
    more = [c for c in fitting if c.world_size > best.world_size]
    if more:
        why.append(
            f"more devices do not pay: the best on {more[0].world_size}, {more[0].label()}, is "
            f"{more[0].predicted_step_time_s / best.predicted_step_time_s:.2f}x the step time (communication)"
        )
    return why
