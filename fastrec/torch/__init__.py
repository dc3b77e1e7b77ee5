"""PyTorch side of fastrec: reference models, training, distillation and export.

    pip install "fastrec-engine[torch]"

    from fastrec.torch import DLRM, TwoTower, train, distill, export

    teacher = DLRM(13, [("t0", 1000, 16), ("t1", 500, 16)], {"C0": "t0", "C1": "t1"},
                   bottom_mlp=[64, 16], top_mlp=[128, 64, 1])
    train(teacher, batches, epochs=3, lr=1e-3)
    student = DLRM(13, [("t0", 1000, 16), ("t1", 500, 16)], {"C0": "t0", "C1": "t1"},
                   bottom_mlp=[16], top_mlp=[32, 1])
    distill(teacher, student, batches, epochs=3, temperature=2.0, alpha=0.5)
    export(student, "ctr_model", precision="int8", embedding_bits=8)   # then fastrec.load(...)

``import fastrec`` never imports torch; ``import fastrec.torch`` does (and says how to install
it when it is missing). See :mod:`fastrec.torch.models` (input layout, TorchRec parameter names),
:mod:`fastrec.torch.distill` (batch structure) and :mod:`fastrec.torch.export` (what is written),
and docs/FORMAT.md.
"""

from __future__ import annotations

try:
    import torch as _torch  # noqa: F401
except ImportError as exc:
    raise ImportError("fastrec.torch needs PyTorch, which is not installed: "
                      "pip install 'fastrec-engine[torch]'") from exc

from .models import DLRM, TwoTower
from .distill import distill, train
from .export import export

__all__ = ["DLRM", "TwoTower", "distill", "export", "train"]
