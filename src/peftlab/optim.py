"""The optimizer and learning-rate schedule both engines use: AdamW with parameter groups
(no decay on biases and norms; the head and LoRA+'s B matrices at their own rates) and a
linear warmup then linear decay."""

from __future__ import annotations

import torch

from peftlab.config import RunConfig


def param_groups(
    model, lr: float, weight_decay: float, b_lr_ratio: float | None = None, head_lr: float | None = None
) -> list[dict]:
    """AdamW parameter groups of the trainable parameters, by rate and decay."""
    from peftlab.models import HEAD_NAMES

    # No weight decay on biases and norms: decaying them only hurts (standard BERT recipe).
    groups: dict[tuple[float, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        rate = lr
        if b_lr_ratio and "lora_B" in name:
            rate = lr * b_lr_ratio  # LoRA+: B matrices learn faster than A (and the rest)
        elif head_lr is not None and any(part in HEAD_NAMES for part in name.split(".")):
            rate = head_lr  # the freshly initialised head (bitfit: far above the biases' rate)
        decay = p.ndim >= 2 and "norm" not in name.lower()
        groups.setdefault((rate, decay), []).append(p)
    return [
        {"params": params, "lr": rate, "weight_decay": weight_decay if decay else 0.0}
        for (rate, decay), params in groups.items()
    ]


def needs_own_groups(cfg: RunConfig) -> bool:
    """Whether the run needs groups at several rates (the Trainer's default AdamW has one)."""
    return bool(cfg.b_lr_ratio) or cfg.head_lr != cfg.lr


def build_optimizer(model, cfg: RunConfig) -> torch.optim.Optimizer:
    """AdamW over `model`'s trainable parameters at the run's rates (fused where it runs)."""
    groups = param_groups(model, cfg.lr, cfg.train.weight_decay, cfg.b_lr_ratio, cfg.head_lr)
    try:
        return torch.optim.AdamW(groups, lr=cfg.lr, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, lr=cfg.lr)


def linear_schedule(optimizer, warmup: int, total: int):
    """Linear warmup to the peak LR, then linear decay to zero (as the Trainer's default)."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
