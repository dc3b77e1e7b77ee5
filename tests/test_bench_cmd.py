"""`fastrec bench` runs its cases (checked against the peers before timing) and prints ratios."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import pytest


def test_bench_command_runs():
    env = dict(os.environ, FASTREC_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", "import sys; from fastrec.cli import main; sys.exit(main(['bench', '--seconds', '0.02']))"],
                       cwd=tempfile.gettempdir(), env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    for line in ("embedding_bags", "int8 linear", "top-100", "time / fastrec", "fastrec int8+rerank"):
        assert line in r.stdout, r.stdout


@pytest.mark.parametrize("argv", [["bench", "--seconds", "0"], ["bench", "--seconds", "inf"], ["bench", "--seconds", "x"],
                                  ["demo", "--users", "-1"], ["demo", "--candidates", "0"], ["demo", "--repeat", "-5"]])
def test_bad_counts_are_usage_errors(argv, capsys):
    # argparse's error and exit status 2, not a traceback from deep inside (or a run that never ends).
    from fastrec.cli import main

    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert "must be a finite number > 0" in capsys.readouterr().err or argv[-1] == "x"


def test_interleaved_timing_rotates_and_pauses(monkeypatch):
    """Each round runs one block per library, in an order that rotates from round to round, with
    a pause before every block (the previous library's spinning threads go idle)."""
    from fastrec import bench

    events = []
    monkeypatch.setattr(bench.time, "sleep", lambda s: events.append(("pause", s)))
    impls = {n: (lambda n=n: events.append(("call", n))) for n in ("a", "b", "c")}
    medians = bench._interleaved_medians(impls, seconds=0.01, rounds=3, min_calls=2)
    assert set(medians) == {"a", "b", "c"} and all(m >= 0 for m in medians.values())
    blocks = []  # (library, calls) per block, after the warm-up calls
    for kind, what in events[6:]:  # (two warm-up calls each)
        if kind == "pause":
            assert what == 0.01
            blocks.append([None, 0])
        else:
            assert blocks and blocks[-1][0] in (None, what)
            blocks[-1][0] = what
            blocks[-1][1] += 1
    assert [b[0] for b in blocks] == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert all(calls >= 2 for _, calls in blocks)
