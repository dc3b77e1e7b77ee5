import numpy as np
import pytest

import fastrec
from fastrec import _C

ALL_ISAS = ["scalar", "avx2", "avx512"]


@pytest.fixture(params=ALL_ISAS)
def isa(request):
    """Runs the test once per CPU ISA level (skipped where the CPU lacks it)."""
    name = request.param
    if name not in _C.available_isas():
        pytest.skip(f"CPU lacks {name}")
    before = _C.current_isa()
    _C.set_isa(name)
    try:
        yield name
    finally:
        _C.set_isa(before)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def random_csr(rng, B, num_rows, max_len=9, *, empty_every=5, dtype=np.int64):
    """Random bags with awkward lengths (some empty)."""
    lengths = rng.integers(0, max_len + 1, size=B)
    if B and empty_every:
        lengths[::empty_every] = 0
    offsets = np.zeros(B + 1, dtype=dtype)
    offsets[1:] = np.cumsum(lengths)
    indices = rng.integers(0, num_rows, size=int(offsets[-1])).astype(dtype)
    return indices, offsets


try:
    import torch  # noqa: F401

    HAS_TORCH = True
except Exception:  # pragma: no cover
    HAS_TORCH = False

needs_torch = pytest.mark.skipif(not HAS_TORCH, reason="torch not installed")
