"""Training and knowledge distillation for the reference modules.

``batches`` is any iterable of batches that can be iterated again for every epoch (a list, a
``torch.utils.data.DataLoader``; not a one-shot generator when ``epochs > 1``). A batch is:

* ranking models (:class:`~fastrec.torch.DLRM`, or any module called as
  ``model(dense, indices, offsets) -> logits (B,)``): a dict
  ``{"dense": (B, num_dense) float, "indices": ..., "offsets": ..., "labels": (B,) in [0, 1]}``
  or a tuple ``(dense, indices, offsets, labels)``; ``indices``/``offsets`` are the table-major
  CSR pair of :mod:`fastrec.torch.models` (``indices`` may be a ``{feature: (indices, offsets)}``
  dict, ``offsets`` then None). ``labels`` may be left out only when ``alpha == 1``.
* two-tower models (:class:`~fastrec.torch.TwoTower`, or any module with a class attribute
  ``kind = "two_tower"`` called as
  ``model(user_indices, user_offsets, item_indices, item_offsets) -> scores (B, B)``): a dict
  ``{"user_indices", "user_offsets", "item_indices", "item_offsets"}`` or a tuple in that order;
  sample b's user interacted with sample b's item (the positives lie on the diagonal, every other
  item of the batch is a negative).
"""

from __future__ import annotations

import math
import numbers
import sys
from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .models import TwoTower

__all__ = ["distill", "train"]

_RANKING_KEYS = ("dense", "indices", "offsets", "labels")
_TOWER_KEYS = ("user_indices", "user_offsets", "item_indices", "item_offsets")


# --------------------------------------------------------------------------- batches

def _unpack(batch, keys, n_required: int, position: int):
    if isinstance(batch, Mapping):
        # a {feature: (indices, offsets)} dict of indices carries its own offsets
        missing = [k for k in keys[:n_required] if k not in batch and not (
            k.endswith("offsets") and isinstance(batch.get(k.replace("offsets", "indices")), Mapping))]
        if missing:
            raise ValueError(f"batch {position} lacks the keys {missing}; expected {list(keys)}")
        return [batch.get(k) for k in keys]
    if isinstance(batch, Sequence) and not isinstance(batch, (str, bytes)):
        if not n_required <= len(batch) <= len(keys):
            raise ValueError(f"batch {position} has {len(batch)} items; expected "
                             f"({', '.join(keys)})")
        return list(batch) + [None] * (len(keys) - len(batch))
    raise TypeError(f"batch {position} must be a dict or a tuple, got {type(batch).__name__}")


def _nonempty(out: torch.Tensor, position: int) -> torch.Tensor:
    """The model's output for a batch, refusing an empty one (its mean loss is NaN)."""
    if out.numel() == 0:
        raise ValueError(f"batch {position} holds no samples")
    return out


def _labels(labels, like: torch.Tensor, position: int) -> torch.Tensor:
    if labels is None:
        raise ValueError(f"batch {position}: labels are missing (None); they may be left out only "
                         "when distilling with alpha == 1")
    if not isinstance(labels, torch.Tensor):
        a = np.asarray(labels)
        if a.dtype.kind not in "biuf":
            raise TypeError(f"batch {position}: labels must be numbers in [0, 1], got dtype {a.dtype}")
        labels = torch.as_tensor(a)
    if labels.is_complex():
        raise TypeError(f"batch {position}: labels must be numbers in [0, 1], got dtype {labels.dtype}")
    labels = labels.reshape(-1) if labels.dim() == 2 and labels.shape[1] == 1 else labels
    if tuple(labels.shape) != tuple(like.shape):
        raise ValueError(f"batch {position}: labels must have shape {tuple(like.shape)}, got "
                         f"{tuple(labels.shape)}")
    labels = labels.to(device=like.device, dtype=like.dtype)
    if labels.numel() and not bool(((labels >= 0) & (labels <= 1)).all()):  # (False for NaN too)
        raise ValueError(f"batch {position}: labels must be in [0, 1] (click / no click, or a "
                         "probability)")
    return labels


def _is_two_tower(model) -> bool:
    """TwoTower, or any module that says ``kind = "two_tower"`` (e.g. a wrapper around one)."""
    return isinstance(model, TwoTower) or getattr(model, "kind", None) == "two_tower"


# --------------------------------------------------------------------------- the loop

def _check_number(value, name: str, kind, what: str) -> None:
    """TypeError unless ``value`` is a number of ``kind`` (bools refused); the caller checks its range."""
    if isinstance(value, bool) or not isinstance(value, kind):
        raise TypeError(f"{name} must be {what}, got {type(value).__name__}")


def _check_common(model, epochs, lr, optimizer, batches):
    if not isinstance(model, nn.Module):
        raise TypeError(f"the model must be a torch.nn.Module, got {type(model).__name__}")
    _check_number(epochs, "epochs", numbers.Integral, "an int >= 1")
    if epochs < 1:
        raise ValueError(f"epochs must be an int >= 1, got {epochs!r}")
    if optimizer is None:
        _check_number(lr, "lr", numbers.Real, "a positive number")
        if not lr > 0 or not math.isfinite(lr):
            raise ValueError(f"lr must be a positive number, got {lr!r}")
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the model has no trainable parameters")
        optimizer = torch.optim.Adam(params, lr=float(lr))
    elif not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    try:
        it = iter(batches)
    except TypeError:
        raise TypeError(f"batches must be an iterable of batches, got {type(batches).__name__}") from None
    if epochs > 1 and it is batches:
        raise TypeError("batches is a one-shot iterator but epochs > 1: pass something that can "
                        "be iterated once per epoch (a list, a DataLoader)")
    return optimizer


def _progress_bar(batches, epoch: int, epochs: int, progress: bool):
    if not progress:
        return batches, None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return batches, None
    bar = tqdm(batches, desc=f"epoch {epoch}/{epochs}", leave=True)
    return bar, bar


def _loop(model, batches, step, *, epochs, optimizer, progress, names):
    """Runs ``step(batch, position) -> {name: scalar tensor}`` (the first name is minimised)
    over every batch of every epoch; returns one dict of batch-averaged values per epoch."""
    history = []
    for epoch in range(1, epochs + 1):
        sums = dict.fromkeys(names, 0.0)
        n = 0
        it, bar = _progress_bar(batches, epoch, epochs, progress)
        for batch in it:
            losses = step(batch, n)
            optimizer.zero_grad(set_to_none=True)
            loss = losses[names[0]]
            if not torch.isfinite(loss):
                raise FloatingPointError(f"epoch {epoch}, batch {n}: the loss is {float(loss)}")
            loss.backward()
            optimizer.step()
            for k in names:
                sums[k] += float(losses[k].detach())
            n += 1
            if bar is not None:
                bar.set_postfix(loss=f"{sums[names[0]] / n:.4f}")
        if bar is not None:
            bar.close()
        if n == 0:
            if epoch == 1:
                raise ValueError("batches yielded no batch")
            raise ValueError(f"batches yielded no batch in epoch {epoch}: pass something that "
                             "can be iterated once per epoch (a list, a DataLoader), not a "
                             "one-shot generator")
        row = {"epoch": epoch, **{k: sums[k] / n for k in names}}
        history.append(row)
        if progress and bar is None:
            rest = ", ".join(f"{k} {row[k]:.4f}" for k in names[1:])
            print(f"epoch {epoch}/{epochs}: {names[0]} {row[names[0]]:.4f}"
                  + (f" ({rest})" if rest else "") + f", {n} batches", file=sys.stderr, flush=True)
    return history


class _modes:
    """Puts modules in train/eval mode for the duration and restores what they were."""

    def __init__(self, train=(), eval=()):
        self.train, self.eval = train, eval

    def __enter__(self):
        self.before = [(m, m.training) for m in (*self.train, *self.eval)]
        for m in self.train:
            m.train()
        for m in self.eval:
            m.eval()

    def __exit__(self, *exc):
        for m, was in self.before:
            m.train(was)


# --------------------------------------------------------------------------- train

def train(model, batches, *, epochs=1, lr=1e-3, optimizer=None, progress=True):
    """Trains ``model`` in place (e.g. a teacher): BCE-with-logits on the labels for ranking
    models, in-batch softmax cross-entropy (positives on the diagonal) for two-tower models.

    ``batches``: see :mod:`fastrec.torch.distill`. ``optimizer`` defaults to Adam(lr).
    Returns the history: ``[{"epoch": 1, "loss": ...}, ...]`` (losses averaged over batches).
    """
    optimizer = _check_common(model, epochs, lr, optimizer, batches)
    if _is_two_tower(model):
        def step(batch, pos):
            ui, uo, ii, io = _unpack(batch, _TOWER_KEYS, 4, pos)
            scores = _nonempty(model(ui, uo, ii, io), pos)
            return {"loss": _in_batch_ce(scores, pos)}
    else:
        def step(batch, pos):
            dense, idx, off, labels = _unpack(batch, _RANKING_KEYS, 4, pos)
            logits = _nonempty(model(dense, idx, off), pos)
            return {"loss": F.binary_cross_entropy_with_logits(logits, _labels(labels, logits, pos))}
    with _modes(train=[model]):
        return _loop(model, batches, step, epochs=epochs, optimizer=optimizer,
                     progress=progress, names=["loss"])


def _in_batch_ce(scores: torch.Tensor, pos: int) -> torch.Tensor:
    if scores.dim() != 2 or scores.shape[0] != scores.shape[1]:
        raise ValueError(f"batch {pos}: in-batch training needs as many users as items, got "
                         f"scores of shape {tuple(scores.shape)}")
    return F.cross_entropy(scores, torch.arange(scores.shape[0], device=scores.device))


# --------------------------------------------------------------------------- distill

def distill(teacher, student, batches, *, epochs=1, temperature=2.0, alpha=0.5, lr=1e-3,
            optimizer=None, progress=True):
    """Trains ``student`` in place to mimic ``teacher`` (left untouched, in eval mode).

    Ranking models: ``soft_loss = T^2 * BCEWithLogits(student_logits / T,
    sigmoid(teacher_logits / T))``, ``hard_loss = BCEWithLogits(student_logits, labels)``.
    Two-tower models: ``soft_loss = T^2 * KL(softmax(teacher_scores / T) ||
    softmax(student_scores / T))`` row-wise over the in-batch scores, ``hard_loss`` = in-batch
    softmax cross-entropy with the positives on the diagonal. In both,
    ``loss = alpha * soft_loss + (1 - alpha) * hard_loss``. (With L2-normalised towers the
    scores are cosines in [-1, 1]: a temperature well below 1, e.g. 0.05, sharpens them.)

    ``batches``: see :mod:`fastrec.torch.distill`. ``optimizer`` defaults to Adam(lr) over the
    student's parameters. Progress: a tqdm bar when tqdm is installed, else one line per epoch
    on stderr; ``progress=False`` is silent.

    Returns the history ``[{"epoch", "loss", "soft_loss", "hard_loss"}, ...]`` (averaged over
    the epoch's batches; ``hard_loss`` is NaN when ``alpha == 1`` and labels are absent).
    """
    if not isinstance(teacher, nn.Module):
        raise TypeError(f"teacher must be a torch.nn.Module, got {type(teacher).__name__}")
    if teacher is student:
        raise ValueError("teacher and student must be different modules")
    optimizer = _check_common(student, epochs, lr, optimizer, batches)
    if _is_two_tower(teacher) != _is_two_tower(student):
        raise TypeError("teacher and student must be of the same kind (both two-tower models, "
                        f"or both ranking models); got {type(teacher).__name__} and "
                        f"{type(student).__name__}")
    _check_number(temperature, "temperature", numbers.Real, "a positive number")
    if not 0 < temperature < 1.8e19:  # T^2 scales the loss, in float32 (max ~3.4e38)
        raise ValueError(f"temperature must be a positive number whose square fits float32, got {temperature!r}")
    _check_number(alpha, "alpha", numbers.Real, "a number in [0, 1]")
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be a number in [0, 1], got {alpha!r}")
    teacher_params = {id(p) for p in teacher.parameters()}
    if any(id(p) in teacher_params for p in student.parameters()):
        raise ValueError("the student shares parameters with the teacher; distil into a separate "
                         "module (e.g. a freshly built one)")
    if any(id(p) in teacher_params for g in optimizer.param_groups for p in g["params"]):
        raise ValueError("the optimizer updates teacher parameters; give it the student's only")
    T, a = float(temperature), float(alpha)
    nan = torch.tensor(float("nan"))

    if _is_two_tower(student):
        def step(batch, pos):
            ui, uo, ii, io = _unpack(batch, _TOWER_KEYS, 4, pos)
            s = _nonempty(student(ui, uo, ii, io), pos)
            with torch.no_grad():
                t = teacher(ui, uo, ii, io).to(device=s.device, dtype=s.dtype)
            if t.shape != s.shape:
                raise ValueError(f"batch {pos}: teacher scores {tuple(t.shape)} and student "
                                 f"scores {tuple(s.shape)} differ in shape")
            hard = _in_batch_ce(s, pos)
            soft = F.kl_div(F.log_softmax(s / T, dim=1), F.log_softmax(t / T, dim=1),
                            reduction="batchmean", log_target=True) * (T * T)
            return {"loss": a * soft + (1 - a) * hard, "soft_loss": soft, "hard_loss": hard}
    else:
        def step(batch, pos):
            dense, idx, off, labels = _unpack(batch, _RANKING_KEYS, 3 if a == 1 else 4, pos)
            s = _nonempty(student(dense, idx, off), pos)
            with torch.no_grad():
                t = teacher(dense, idx, off).to(device=s.device, dtype=s.dtype)
            if t.shape != s.shape:
                raise ValueError(f"batch {pos}: teacher logits {tuple(t.shape)} and student "
                                 f"logits {tuple(s.shape)} differ in shape")
            soft = F.binary_cross_entropy_with_logits(s / T, torch.sigmoid(t / T)) * (T * T)
            if labels is None:
                return {"loss": soft, "soft_loss": soft, "hard_loss": nan}
            hard = F.binary_cross_entropy_with_logits(s, _labels(labels, s, pos))
            return {"loss": a * soft + (1 - a) * hard, "soft_loss": soft, "hard_loss": hard}

    with _modes(train=[student], eval=[teacher]):
        return _loop(student, batches, step, epochs=epochs, optimizer=optimizer,
                     progress=progress, names=["loss", "soft_loss", "hard_loss"])
