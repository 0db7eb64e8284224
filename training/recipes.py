"""fast.ai recipes in plain PyTorch: one-cycle, discriminative LRs, weight EMA, LR finder, plots.

Small functions over a network, an optimizer and a ``batches`` callable; the loop that
uses them is ``training.train``.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

Batch = tuple[torch.Tensor, torch.Tensor]


def one_cycle(optimizer: torch.optim.Optimizer, max_lrs: Sequence[float], total_steps: int, pct_start: float,
              div: float = 25.0, final_div: float = 1e4) -> torch.optim.lr_scheduler.OneCycleLR:
    """fastai's one-cycle: cosine warm-up from ``max_lr / div`` to ``max_lrs`` over ``pct_start``, cosine down to
    ``max_lr / final_div``; momentum (AdamW beta1) 0.95 -> 0.85 -> 0.95.

    Fewer than 4 steps are scheduled as 4 (torch's OneCycleLR needs >= 1 step per phase).
    """
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=list(max_lrs), total_steps=max(total_steps, 4), pct_start=pct_start, div_factor=div,
        final_div_factor=final_div / div, base_momentum=0.85, max_momentum=0.95, cycle_momentum=True)


def discriminative_lrs(lr_low: float, lr_high: float, n_groups: int) -> list[float]:
    """fastai's ``slice(lr_low, lr_high)``: learning rates spaced geometrically, early groups lowest."""
    return [float(v) for v in np.geomspace(lr_low, lr_high, n_groups)] if n_groups > 1 else [lr_high]


def adamw(groups: Sequence[Sequence[nn.Parameter]], lrs: Sequence[float], weight_decay: float) -> torch.optim.AdamW:
    """AdamW with one parameter group per layer group; parameters that need no gradient are left out."""
    param_groups = [{"params": [p for p in group if p.requires_grad], "lr": lr} for group, lr in zip(groups, lrs)]
    return torch.optim.AdamW([g for g in param_groups if g["params"]], weight_decay=weight_decay)


class ModelEma:
    """Exponential moving average of a network's weights and buffers (BatchNorm statistics included).

    ``decay`` is warmed up as ``min(decay, (1 + t) / (10 + t))`` so early averages are
    not dominated by the initial weights. ``module`` is the averaged copy (eval it, save it).
    """

    def __init__(self, net: nn.Module, decay: float = 0.99) -> None:
        self.module = copy.deepcopy(net).eval()
        self.module.requires_grad_(False)
        self.decay, self.updates = decay, 0

    @torch.no_grad()
    def update(self, net: nn.Module) -> None:
        """Fold the current weights of ``net`` into the average."""
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        current = net.state_dict()
        for key, value in self.module.state_dict().items():
            if value.dtype.is_floating_point:
                value.mul_(d).add_(current[key].detach(), alpha=1 - d)
            else:
                value.copy_(current[key])


def smooth(values: Sequence[float], beta: float = 0.98) -> list[float]:
    """fastai's debiased exponential smoothing of a loss curve."""
    out, avg = [], 0.0
    for i, value in enumerate(values, 1):
        avg = beta * avg + (1 - beta) * value
        out.append(avg / (1 - beta**i))
    return out


def suggest_lr(lrs: Sequence[float], losses: Sequence[float]) -> dict[str, float]:
    """Suggestions from an LR-finder curve: steepest descent (of the smoothed loss in log-LR) and minimum / 10."""
    lrs_a, loss_a = np.asarray(lrs, float), np.asarray(losses, float)
    end = max(int(np.argmin(loss_a)) + 1, 2)
    slope = np.gradient(loss_a[:end], np.log(lrs_a[:end])) if end > 2 else np.array([0.0, 0.0])
    return {"steep": float(lrs_a[int(np.argmin(slope))]), "min_div_10": float(lrs_a[int(np.argmin(loss_a))] / 10),
            "suggested": float(lrs_a[int(np.argmin(slope))])}


def lr_find(net: nn.Module, batches: Iterator[Batch], loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
            groups: Sequence[Sequence[nn.Parameter]], ratios: Sequence[float], start_lr: float = 1e-7,
            end_lr: float = 1.0, steps: int = 100, weight_decay: float = 0.01,
            prepare: Callable[[nn.Module], None] | None = None) -> dict[str, Any]:
    """fastai's LR range test on a copy of ``net``: the LR grows exponentially from ``start_lr`` to ``end_lr``
    over ``steps`` batches (group ``i`` gets ``lr * ratios[i]``); stops early when the smoothed loss passes
    4x its minimum. ``net`` itself is not changed. Returns lrs, raw and smoothed losses and suggestions."""
    probe = copy.deepcopy(net)
    probe_groups = match_groups(net, probe, groups)
    optimizer = adamw(probe_groups, [start_lr * r for r in ratios], weight_decay)
    factor = (end_lr / start_lr) ** (1 / max(steps - 1, 1))
    lrs, raw = [], []
    best = math.inf
    for step, (xb, yb) in zip(range(steps), batches):
        lr = start_lr * factor**step
        for group, ratio in zip(optimizer.param_groups, ratios):
            group["lr"] = lr * ratio
        probe.train()
        if prepare is not None:
            prepare(probe)
        loss = loss_fn(probe(xb), yb)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        lrs.append(lr)
        raw.append(float(loss.item()))
        smoothed = smooth(raw)[-1]
        if not math.isfinite(smoothed) or smoothed > 4 * best:
            break
        best = min(best, smoothed)
    smoothed_all = smooth(raw)
    return {"lrs": lrs, "losses": raw, "smoothed": smoothed_all, **suggest_lr(lrs, smoothed_all)}


def match_groups(net: nn.Module, copy_net: nn.Module, groups: Sequence[Sequence[nn.Parameter]]) -> list[list[nn.Parameter]]:
    """The parameters of ``copy_net`` (a deepcopy of ``net``) in the same layer groups."""
    index = {id(p): name for name, p in net.named_parameters()}
    params = dict(copy_net.named_parameters())
    return [[params[index[id(p)]] for p in group] for group in groups]


def plot_lr_find(result: dict[str, Any], path: str | Path) -> Path:
    """Loss vs learning rate (log x), the suggestion marked; PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.plot(result["lrs"], result["losses"], alpha=0.3, label="loss")
    ax.plot(result["lrs"], result["smoothed"], label="smoothed")
    ax.axvline(result["suggested"], color="red", linestyle="--", label=f"suggested {result['suggested']:.1e}")
    ax.set(xscale="log", xlabel="learning rate (head group)", ylabel="training loss", title="LR finder")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def plot_history(history: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Training/validation loss and validation AUROC per epoch; PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = np.arange(1, len(history) + 1)
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5), dpi=100)
    left.plot(x, [h["train_loss"] for h in history], marker="o", label="train")
    left.plot(x, [h["val_loss"] for h in history], marker="o", label="validation")
    left.set(xlabel="epoch", ylabel="loss", title="loss")
    left.legend()
    right.plot(x, [h["val_auroc"] for h in history], marker="o", color="green")
    right.set(xlabel="epoch", ylabel="AUROC", title="validation AUROC")
    for ax in (left, right):
        ax.set_xticks(x, [f"{h['phase'][0]}{h['size']}" for h in history], fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def write_json(path: str | Path, value: Any) -> None:
    """Indented JSON with a trailing newline."""
    Path(path).write_text(json.dumps(value, indent=2) + "\n")
