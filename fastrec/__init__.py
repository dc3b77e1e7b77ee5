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
                          "set scalar, avx2 or avx512 as this CPU allows (with it unset, `fastrec info` "
                          "lists them).") from None  # (the message says it all: no second traceback)
    _here = _os.path.dirname(_os.path.abspath(__file__))
    if _os.path.exists(_os.path.join(_here, "..", "csrc")) and not any(
            n.startswith("_C.") for n in _os.listdir(_here)):
        # run from the source folder: `import fastrec` found the sources, not the installed package
        raise ImportError(
            f"`import fastrec` found the source folder {_here}, which has no compiled module, instead "
            "of the installed package: run Python from another folder (after `pip install .`)."
        ) from None
    raise ImportError(
        "fastrec's compiled CPU module (fastrec._C) could not be imported: "
        f"{exc}. Reinstall with `pip install .` and check `fastrec info`."
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
