"""One schedule function for everything that changes with the step: LR, weight decay, EMA momentum, DINO
teacher temperature. Checkpoints store the step, never the values, so a resumed run recomputes them.

timm's schedulers are LR-only objects that mutate the optimizer; a pure function of the step serves all
four uses and is trivially testable (the style of DINO's `cosine_scheduler`, without materialising arrays).
"""

from __future__ import annotations

import math


def warmup_cosine(step: int, total_steps: int, base: float, final: float, warmup_steps: int = 0,
                  warmup_start: float = 0.0) -> float:
    """Linear warmup from `warmup_start` to `base` over `warmup_steps`, then cosine from `base` to `final`."""
    if step < warmup_steps:
        return warmup_start + (base - warmup_start) * step / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return final + 0.5 * (base - final) * (1 + math.cos(math.pi * progress))


def warmup_constant(step: int, base: float, warmup_steps: int = 0, warmup_start: float = 0.0) -> float:
    """Linear warmup from `warmup_start` to `base`, then `base` (DINO's teacher temperature)."""
    if step < warmup_steps:
        return warmup_start + (base - warmup_start) * step / warmup_steps
    return base


def warmup_poly(step: int, total_steps: int, base: float, power: float = 1.0, final: float = 0.0,
                warmup_steps: int = 0, warmup_ratio: float = 1e-6) -> float:
    """mmcv's `poly` policy with `linear` warmup (mmseg's decode-head schedules): (base - final) x
    (1 - step/total)^power + final, and over the warmup that value x (1 - (1 - step/warmup) (1 - ratio))."""
    lr = (base - final) * (1 - step / total_steps) ** power + final
    if step < warmup_steps:
        lr *= 1 - (1 - step / warmup_steps) * (1 - warmup_ratio)
    return lr
