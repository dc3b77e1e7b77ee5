"""DLRM's dot interaction kernel (fastrec._C.dot_interaction) against numpy, on every ISA."""

from __future__ import annotations

import numpy as np
import pytest

from fastrec import _C


def reference(bottom, emb, T):
    B, D = bottom.shape
    z = np.concatenate([bottom[:, None, :], emb.reshape(B, T, D)], axis=1).astype(np.float64)
    dots = z @ z.transpose(0, 2, 1)
    i, j = np.tril_indices(T + 1, -1)
    return np.concatenate([bottom.astype(np.float64), dots[:, i, j]], axis=1)


@pytest.mark.parametrize("B,T,D", [(0, 3, 16), (1, 1, 1), (5, 26, 64), (37, 4, 17), (300, 8, 128), (3, 0, 8), (7, 5, 32), (9, 3, 16)])
def test_matches_numpy(rng, isa, B, T, D):
    bottom = rng.standard_normal((B, D)).astype(np.float32)
    emb = rng.standard_normal((B, T * D)).astype(np.float32)
    out = _C.dot_interaction(bottom, emb, T)
    assert out.shape == (B, D + (T + 1) * T // 2) and out.dtype == np.float32
    np.testing.assert_allclose(out, reference(bottom, emb, T), rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(out[:, :D], bottom)


def test_errors(rng):
    bottom = np.ones((4, 8), np.float32)
    with pytest.raises(ValueError):
        _C.dot_interaction(bottom, np.ones((4, 15), np.float32), 2)
    with pytest.raises(ValueError):
        _C.dot_interaction(bottom, np.ones((3, 16), np.float32), 2)
    with pytest.raises(TypeError):
        _C.dot_interaction(bottom.astype(np.float64), np.ones((4, 16), np.float32), 2)
