"""The bench tools: the paired-ratio report of benches/paired.py computes what it says (no timing
here); benches/cuda_host_overhead.py runs."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


def _paired():
    path = os.path.join(HERE, "..", "benches", "paired.py")
    spec = importlib.util.spec_from_file_location("fastrec_bench_paired", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_report_ratios_are_within_rounds():
    paired = _paired()
    rng = np.random.default_rng(0)
    # Round r runs at speed 1 + r (a drifting machine); the peer is always 3x fastrec in-round.
    base = [list((1 + r) * (1e-3 + 1e-5 * rng.random(5))) for r in range(8)]
    peer = [[3 * t for t in block] for block in base]
    text = paired.report(2048, {"fastrec": base, "peer": peer})
    rows = {line.split("|")[2].strip(): line for line in text.splitlines()[2:]}
    assert "| 3.00x (3.00-3.00x) |" in rows["peer"]
    assert "| 1.00x (1.00-1.00x) |" in rows["fastrec"]
    # p99 over all calls: 3x as well, since every peer call is 3x a fastrec call
    assert rows["peer"].rstrip().endswith("| 3.00x |")


def test_report_p50_is_over_all_calls():
    paired = _paired()
    base = [[1e-3, 1e-3, 1e-3], [2e-3, 2e-3, 2e-3], [2e-3, 2e-3, 2e-3]]
    peer = [[2e-3, 2e-3, 2e-3], [4e-3, 4e-3, 4e-3], [4e-3, 4e-3, 4e-3]]
    text = paired.report(270, {"fastrec": base, "peer": peer})
    assert "| fastrec | 2.000 ms |" in text
    assert "| peer | 4.000 ms |" in text


def test_warm_up_calls_are_untimed_and_come_before_each_block(monkeypatch):
    paired = _paired()
    log = []
    real_warm_up = paired._warm_up

    def warm_up(fn, seconds):
        log.append("W")
        return real_warm_up(fn, seconds)

    monkeypatch.setattr(paired, "_warm_up", warm_up)
    fns = {"fastrec": lambda: log.append("a"), "peer": lambda: log.append("b")}
    times = paired.paired(fns, rounds=3, calls=4, pause=0.0, warmup=0.002)
    assert [len(b) for b in times["fastrec"]] == [4, 4, 4]
    assert [len(b) for b in times["peer"]] == [4, 4, 4]
    # two untimed first calls each, then every block: its warm-up marker, at least one warm-up
    # call and the 4 timed calls, all of the block's own implementation, before the next marker
    assert log[:4] == ["a", "a", "b", "b"]
    assert log[4] == "W"
    blocks = "".join(log[5:]).split("W")
    assert len(blocks) == 3 * 2
    for k, block in enumerate(blocks):
        impl = "ab"[(k % 2 + k // 2) % 2]  # the order rotates from round to round
        assert set(block) == {impl} and len(block) >= 1 + 4, (k, block)
    assert real_warm_up(lambda: log.append("c"), 0.0) == 0 and "c" not in log


def test_cuda_host_overhead_runs_and_prints_every_case():
    # (a subprocess: the script makes CPU tensors pass for CUDA ones for the rest of its process)
    pytest.importorskip("torch")
    script = Path(__file__).resolve().parents[1] / "benches" / "cuda_host_overhead.py"
    res = subprocess.run([sys.executable, str(script), "--calls", "20", "--tables", "3", "--ops"], capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in res.stdout.splitlines()
            if line.startswith("| ") and line[2:3] != "c"]
    assert len(rows) == 6 and all(float(r[1]) > 0 for r in rows), res.stdout
    # the model calls' op counts: a float DLRM queues its torch kernels and reads one flag back
    # (the embedding check is the launcher's); the int8 one reads nothing itself
    counts = [(int(r[2]), int(r[3])) for r in rows if "score" in r[0]]
    assert len(counts) == 3 and counts[0][0] > 5 and counts[0][1] == counts[1][1] == 1 and counts[2][1] == 0, counts
