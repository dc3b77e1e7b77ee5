"""A short end-to-end example used by ``fastrec example`` (the README's first command)."""

from __future__ import annotations

import time

import numpy as np


def embedding_bag_example(seed: int = 0) -> None:
    import fastrec
    from fastrec import ops, testing

    rng = np.random.default_rng(seed)
    tables = [rng.standard_normal((100_000, 64), dtype=np.float32) for _ in range(4)]
    q8 = [fastrec.QuantizedTable.from_float(t, bits=8) for t in tables]
    B, L = 512, 20
    T = len(tables)
    lengths = rng.integers(0, 2 * L, size=T * B)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    indices = rng.integers(0, 100_000, size=int(offsets[-1]), dtype=np.int64)

    out = ops.embedding_bags(tables, indices, offsets)
    out8 = ops.embedding_bags(q8, indices, offsets)
    ref = testing.embedding_bags_ref(tables, indices, offsets)
    print(f"embedding_bags: {T} tables x {B} bags -> {out.shape}, "
          f"max |fp32 - float64 ref| = {testing.max_abs_error(out, ref):.2e}, "
          f"max |int8 - fp32| = {testing.max_abs_error(out8, out):.3f} "
          f"(8-bit tables: {sum(t.nbytes for t in q8) / sum(t.nbytes for t in tables):.2f}x the bytes)")

    def best(fn, reps=20):
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return min(ts)

    def numpy_pool():
        cols = []
        for t in range(T):
            off = offsets[t * B:(t + 1) * B + 1]
            seg = np.add.reduceat(tables[t][indices[off[0]:off[-1]]], off[:-1] - off[0], axis=0)
            seg[off[1:] == off[:-1]] = 0.0  # reduceat leaves a stray row for empty bags
            cols.append(seg)
        return np.concatenate(cols, axis=1)

    if not np.allclose(numpy_pool(), out, rtol=1e-4, atol=1e-4):
        raise AssertionError("numpy and fastrec disagree")
    t_np, t_fp32, t_q8 = best(numpy_pool), best(lambda: ops.embedding_bags(tables, indices, offsets)), \
        best(lambda: ops.embedding_bags(q8, indices, offsets))
    print(f"time per call (best of 20, {fastrec.get_num_threads()} threads): numpy {t_np * 1e3:.2f} ms, "
          f"fastrec fp32 {t_fp32 * 1e3:.2f} ms ({t_np / t_fp32:.1f}x), fastrec 8-bit {t_q8 * 1e3:.2f} ms "
          f"({t_np / t_q8:.1f}x)")
