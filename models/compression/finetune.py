"""Fine-tuning after compression: learning-rate rewinding and iterative prune-retrain schedules.

LR rewinding (Renda et al., 2020, as used in the PFP/ALDS retraining): after pruning a network that was
trained for E steps, retrain it for r steps with the ORIGINAL schedule's learning rates of steps
[E - r, E], i.e. the schedule is rewound by r steps and replayed to its end (weights are not rewound).
SiPP masks are re-applied after every optimiser step so pruned weights stay zero.

Knowledge distillation (Hinton et al., 2015) is optional: with a ``teacher`` (the dense network), the loss
is (1 - a) * task loss + a * T^2 * KL(teacher || student) of the per-pixel class distributions softened
by temperature T, so the pruned network learns the dense one's soft boundaries, not only the labels.
With ``distill_inputs`` the distillation term is computed on other views of the batch than the task term
("function matching", Beyer et al., 2022: student and teacher see the same view, and mixing images
(``mixup_views``) asks the student to copy the teacher on inputs away from the training images too).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from models.compression.unstructured import apply_masks


def rewound_schedule(
    lr_factor: Callable[[int], float], total_steps: int, rewind_steps: int
) -> Callable[[int], float]:
    """LR factor of fine-tune step i = the original factor at step (total - rewind + i)."""
    start = max(0, total_steps - rewind_steps)
    return lambda i: lr_factor(min(total_steps - 1, start + i))


def finetune(
    net: nn.Module,
    batch_at: Callable[[int], tuple[torch.Tensor, torch.Tensor]],
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    steps: int,
    lr: float,
    lr_factor: Callable[[int], float],
    weight_decay: float = 1e-4,
    masks: dict[str, torch.Tensor] | None = None,
    time_limit_s: float | None = None,
    log: Callable[[str], None] | None = None,
    teacher: nn.Module | None = None,
    distill_weight: float = 0.5,
    temperature: float = 2.0,
    distill_inputs: Callable[[torch.Tensor, int], torch.Tensor] | None = None,
) -> dict:
    """Train ``net`` in place for ``steps`` AdamW steps with LR ``lr * lr_factor(i)``.

    ``batch_at(i)`` returns (inputs, targets) for step i; stops early at ``time_limit_s``. With a
    ``teacher``, the loss mixes in distillation (module docstring). Returns a record {"steps", "seconds",
    "loss_first", "loss_last"} (plus "distillation" with a teacher). ``distill_inputs(x, i)`` gives the
    view of batch i the distillation term sees (default: ``x`` itself); with ``distill_weight`` 1 the task
    term and its forward pass are skipped.
    """
    if teacher is not None:
        teacher.eval()
    opt = torch.optim.AdamW(
        [p for p in net.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    net.train()
    t0 = time.time()
    losses: list[float] = []
    done = 0
    for i in range(steps):
        x, y = batch_at(i)
        if teacher is None:
            loss = loss_fn(net(x), y)
        else:
            xd = x if distill_inputs is None else distill_inputs(x, i)
            if distill_weight >= 1.0:
                loss = distillation_loss(net(xd), teacher, xd, temperature)
            else:
                out = net(x)
                out_d = out if xd is x else net(xd)
                loss = (1.0 - distill_weight) * loss_fn(out, y) + distill_weight * distillation_loss(
                    out_d, teacher, xd, temperature
                )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if masks:
            apply_masks(net, masks)
        losses.append(float(loss.detach()))
        done = i + 1
        if log and (done % 10 == 0 or done == steps):
            log(f"finetune step {done}/{steps} loss {sum(losses[-10:]) / len(losses[-10:]):.4f}")
        if time_limit_s is not None and time.time() - t0 > time_limit_s:
            break
    net.eval()
    tail = losses[-10:] or [float("nan")]
    rec = {
        "steps": done,
        "seconds": round(time.time() - t0, 1),
        "loss_first": losses[0] if losses else None,
        "loss_last": sum(tail) / len(tail),
    }
    if teacher is not None:
        rec["distillation"] = {"weight": distill_weight, "temperature": temperature}
        if distill_inputs is not None:
            rec["distillation"]["inputs"] = getattr(distill_inputs, "describe", "custom views")
    return rec


class MixupViews:
    """Mixup views of a batch for function matching: sample b becomes lam_b * x_b + (1 - lam_b) * x_p(b),
    with lam_b ~ Beta(alpha, alpha) and p a random permutation, both drawn from ``seed`` + the step (so a
    step's views are reproducible). Inputs keep their units (normalised pixels)."""

    def __init__(self, alpha: float = 1.0, seed: int = 0):
        if alpha <= 0:
            raise ValueError(f"mixup alpha must be > 0, got {alpha}")
        self.alpha, self.seed = alpha, seed
        self.describe = f"mixup views, lam ~ Beta({alpha:g}, {alpha:g})"

    def lambdas_and_partners(self, n: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, step])
        lam = rng.beta(self.alpha, self.alpha, size=n)
        return torch.from_numpy(lam), torch.from_numpy(rng.permutation(n))

    def __call__(self, x: torch.Tensor, step: int) -> torch.Tensor:
        lam, perm = self.lambdas_and_partners(len(x), step)
        lam = lam.to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))
        return lam * x + (1.0 - lam) * x[perm]


def distillation_loss(student_logits: torch.Tensor, teacher: nn.Module, x: torch.Tensor,
                      temperature: float) -> torch.Tensor:
    """T^2 * KL(teacher || student) of the class distributions (dim 1) softened by T, mean over pixels."""
    with torch.no_grad():
        soft_teacher = torch.log_softmax(teacher(x) / temperature, dim=1)
    soft_student = torch.log_softmax(student_logits / temperature, dim=1)
    kl = (soft_teacher.exp() * (soft_teacher - soft_student)).sum(dim=1)
    return kl.mean() * temperature**2


def iterative_ratios(final_ratio: float, n_steps: int) -> list[float]:
    """Per-step ratios (each relative to the network entering that step) reaching ``final_ratio``.

    Geometric: every step removes the same fraction q of what is left, 1 - (1 - q)^n = final_ratio.
    """
    q = 1.0 - (1.0 - final_ratio) ** (1.0 / n_steps)
    return [q] * n_steps


def iterative_prune(
    net: nn.Module,
    compress_step: Callable[[nn.Module, float], nn.Module],
    retrain: Callable[[nn.Module], dict],
    final_ratio: float,
    n_steps: int = 3,
) -> tuple[nn.Module, list[dict]]:
    """Prune-retrain cascade: ``n_steps`` times compress by the geometric step ratio, then retrain.

    ``compress_step(net, ratio)`` returns the compressed network (sensitivities are recomputed on the
    current network at every step, as in the PFP schedule); ``retrain(net)`` fine-tunes it in place.
    """
    history = []
    current = copy.deepcopy(net)
    for i, q in enumerate(iterative_ratios(final_ratio, n_steps)):
        current = compress_step(current, q)
        history.append({"step": i, "ratio": q, "retrain": retrain(current)})
    return current, history
