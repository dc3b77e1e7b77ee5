"""fastrec: low-latency inference for recommendation models.

Public names only; see ``fastrec.ops`` for the functional API and ``python -m fastrec.info`` for
what this build and this machine support.
"""

from __future__ import annotations

try:
    from . import _C  # noqa: F401
except ImportError as exc:  # pragma: no cover - only when the build is broken (or see below)
    import os as _os

    _isa = _os.environ.get("FASTREC_CPU_ISA")
    if _isa and "ISA" in str(exc):  # the module refuses an ISA level it cannot run, and the import fails with it
        raise ImportError(f"fastrec could not start with FASTREC_CPU_ISA={_isa!r}: {exc}. Unset it, or "
                          "set scalar, avx2 or avx512 as this CPU allows (`python -m fastrec.info` "
                          "lists them).") from exc
    raise ImportError(
        "fastrec's compiled CPU module (fastrec._C) could not be imported: "
        f"{exc}. Reinstall with `pip install .` and check `python -m fastrec.info`."
    ) from exc

from ._arrays import aligned_copy, aligned_empty
from ._config import get_num_threads, set_num_threads
from .tables import QuantizedTable
from .linear import Int8Linear, Int8MLP
from .index import ItemIndex
from .io import ModelFormatError, ModelNotFoundError
from .model import Model, load
from .featurizer import Featurizer, FeaturizerSpecError
from . import datasets, ops, testing

__version__ = "0.1.0"

__all__ = [
    "Featurizer",
    "FeaturizerSpecError",
    "Int8Linear",
    "Int8MLP",
    "ItemIndex",
    "Model",
    "datasets",
    "ModelFormatError",
    "ModelNotFoundError",
    "QuantizedTable",
    "aligned_copy",
    "aligned_empty",
    "get_num_threads",
    "load",
    "ops",
    "set_num_threads",
    "testing",
    "__version__",
]
