"""``fastrec bench``: a quick same-run comparison of fastrec's ops against the peers installed here.

Each case builds one set of inputs, checks that fastrec and every peer agree on them, then times
them in rounds of one block of calls each (median of each library's calls, after a warm-up;
a pause before each block lets the previous library's threads go idle) at the same thread
count: fastrec's and torch's threads are set; numpy's BLAS keeps its own count unless
threadpoolctl is installed. Peers are used only when importable: numpy always, torch
(eager fp32 and dynamic int8 with per-channel weights), faiss. The numbers are a quick look at this
machine, not the benchmark suite: for that, see ``benches/`` and BENCHMARKS.md.
"""

from __future__ import annotations

import time
import warnings

import numpy as np

from . import ItemIndex, Int8Linear, ops
from ._config import get_num_threads


def _interleaved_medians(impls: dict, *, seconds: float, rounds: int = 4, min_calls: int = 3,
                         pause: float | None = None) -> dict:
    """Median seconds per call of each implementation, timed in ``rounds`` rounds of one block
    each (so a change in the machine's load reaches every library alike; the order rotates from
    round to round), about ``seconds`` per implementation in all, after one warm-up call each.

    A pause before each block (``min(seconds, 0.3)`` s unless given) lets the previous library's
    threads go idle: numpy's BLAS and torch's OpenMP workers spin for a while after a call, and
    on a small machine they took CPU from whatever ran next (inflating the next library's time
    by up to 2x)."""
    pause = min(seconds, 0.3) if pause is None else pause
    per_call = {}
    for name, fn in impls.items():
        fn()  # (a first call can be much slower: caches, thread pools, lazy set-up)
        t0 = time.perf_counter()
        fn()
        per_call[name] = time.perf_counter() - t0
    calls = {name: max(min_calls, int(seconds / rounds / max(t, 1e-7))) for name, t in per_call.items()}
    times = {name: [] for name in impls}
    names = list(impls)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            time.sleep(pause)
            fn = impls[name]
            for _ in range(calls[name]):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    return {name: float(np.median(t)) for name, t in times.items()}


def _try_import(name):
    try:
        return __import__(name)
    except Exception:
        return None


def _embedding_case(rng, torch, seconds):
    T, R, D, B, L = 8, 100_000, 64, 512, 20
    tables = [rng.standard_normal((R, D), dtype=np.float32) for _ in range(T)]
    idx = rng.integers(0, R, size=T * B * L).astype(np.int64)
    off = np.arange(0, T * B * L + 1, L, dtype=np.int64)
    want = ops.embedding_bags(tables, idx, off)
    impls = {"fastrec": lambda: ops.embedding_bags(tables, idx, off)}
    if torch is not None:
        bags = [torch.nn.EmbeddingBag.from_pretrained(torch.from_numpy(t), mode="sum") for t in tables]
        parts = [(torch.from_numpy(idx[t * B * L:(t + 1) * B * L]), torch.arange(0, B * L, L)) for t in range(T)]

        def torch_fp32():
            with torch.inference_mode():
                return torch.cat([bag(i, o) for bag, (i, o) in zip(bags, parts)], dim=1).numpy()

        np.testing.assert_allclose(torch_fp32(), want, rtol=1e-4, atol=1e-4)
        impls["torch fp32"] = torch_fp32
    return f"embedding_bags: {T} tables x {R} x {D} fp32, B={B}, {L} ids a bag", impls, seconds


def _linear_case(rng, torch, seconds):
    K, N, B = 1024, 1024, 256
    W = rng.standard_normal((N, K), dtype=np.float32) / np.sqrt(K)
    x = rng.standard_normal((B, K), dtype=np.float32)
    lin = Int8Linear.from_float(W)
    ref = x.astype(np.float64) @ W.T.astype(np.float64)

    def check(name, got, tol):
        err = np.abs(np.asarray(got, dtype=np.float64) - ref).max() / np.abs(ref).max()
        assert err <= tol, f"{name}: max error {err:.3g} of max |reference| (tolerance {tol})"

    check("fastrec int8", lin(x), 0.02)
    impls = {"fastrec int8": lambda: lin(x), "numpy fp32": lambda: x @ W.T}
    check("numpy fp32", x @ W.T, 1e-5)
    if torch is not None:
        layer = torch.nn.Linear(K, N, bias=False)
        with torch.no_grad():
            layer.weight.copy_(torch.from_numpy(W))
        xt = torch.from_numpy(x)

        def run(mod):
            def f():
                with torch.inference_mode():
                    return mod(xt).numpy()
            return f

        impls["torch fp32"] = run(layer)
        check("torch fp32", impls["torch fp32"](), 1e-5)
        try:
            engines = torch.backends.quantized.supported_engines
            torch.backends.quantized.engine = "fbgemm" if "fbgemm" in engines else "x86"
            qconfig = torch.ao.quantization.per_channel_dynamic_qconfig  # (as fastrec: per channel)
            with warnings.catch_warnings():  # torch 2.13 deprecates the quantized tensor types
                warnings.simplefilter("ignore")
                dq = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(layer), {torch.nn.Linear: qconfig},
                                                            dtype=torch.qint8)
            impls["torch dynamic int8"] = run(dq)
        except Exception:  # pragma: no cover - quantized engines missing in some builds
            pass
        else:
            check("torch dynamic int8", impls["torch dynamic int8"](), 0.05)
    return f"int8 linear {K}x{N}, B={B}", impls, seconds


def _topk_case(rng, torch, faiss, seconds):
    N, D, Q, k = 200_000, 64, 16, 100
    X = rng.standard_normal((N, D), dtype=np.float32)
    q = rng.standard_normal((Q, D), dtype=np.float32)
    index = ItemIndex(X, precision="int8")
    impls = {"fastrec int8+rerank": lambda: index.search(q, k)}
    if faiss is not None:
        faiss.omp_set_num_threads(get_num_threads())
        flat = faiss.IndexFlatIP(D)
        flat.add(X)
        impls["faiss IndexFlatIP"] = lambda: flat.search(q, k)
    if torch is not None:
        xt = torch.from_numpy(X)

        def torch_topk():
            with torch.inference_mode():
                return torch.topk(torch.from_numpy(q) @ xt.T, k, dim=1)
        impls["torch topk(q @ X.T)"] = torch_topk
    else:
        impls["numpy argpartition"] = lambda: np.argpartition(-(q @ X.T), k, axis=1)[:, :k]
    # agreement: every implementation's ids against the exact float64 answer
    exact = np.argsort(-(q.astype(np.float64) @ X.T.astype(np.float64)), axis=1)[:, :k]
    ids_of = {"fastrec int8+rerank": lambda r: r[1], "faiss IndexFlatIP": lambda r: r[1],
              "torch topk(q @ X.T)": lambda r: r[1].numpy(), "numpy argpartition": lambda r: r}
    recall = {}
    for name, fn in impls.items():
        got = np.asarray(ids_of[name](fn()))
        recall[name] = np.mean([len(set(got[r].tolist()) & set(exact[r].tolist())) / k for r in range(Q)])
        assert recall[name] >= 0.99, f"{name}: recall@{k} {recall[name]}"
    return (f"top-{k} of {N} items (D={D}), {Q} queries; fastrec recall@{k} {recall['fastrec int8+rerank']:.3f}",
            impls, seconds)


def run(seconds: float = 0.5, out=print) -> int:
    """Runs the cases, prints one table per case; returns 0."""
    torch = _try_import("torch")
    faiss = _try_import("faiss")
    threads = get_num_threads()
    if torch is not None:
        torch.set_num_threads(threads)
    rng = np.random.default_rng(0)
    blas = _try_import("threadpoolctl")
    limits = blas.threadpool_limits(limits=threads) if blas is not None else None
    out(f"fastrec bench: {threads} threads for fastrec{', torch' if torch else ''}{', faiss' if faiss else ''}"
        f"{' and numpy BLAS' if limits is not None else ' (numpy BLAS: its own thread count)'}; peers "
        f"found: numpy{', torch ' + torch.__version__ if torch else ''}{', faiss' if faiss else ''}")
    cases = [_embedding_case(rng, torch, seconds), _linear_case(rng, torch, seconds),
             _topk_case(rng, torch, faiss, seconds)]
    for title, impls, secs in cases:
        times = _interleaved_medians(impls, seconds=secs)
        base = next(iter(times.values()))
        out(f"\n{title}")
        out(f"  {'implementation':<24}{'median':>12}{'time / fastrec':>16}")
        for name, t in times.items():
            out(f"  {name:<24}{t * 1e3:>10.3f}ms{t / base:>15.2f}x")
    out("\n(time / fastrec > 1: fastrec is faster. Full benchmarks: benches/ and BENCHMARKS.md.)")
    if limits is not None:
        limits.restore_original_limits()
    return 0
