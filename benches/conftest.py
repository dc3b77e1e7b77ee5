"""Shared fixtures and helpers for the fastrec benchmarks (pytest-benchmark).

The benches live outside the default test run (``testpaths = ["tests"]``); run them explicitly,
e.g. ``pytest benches/ --benchmark-only -p no:cacheprovider``. This conftest is only loaded when
pytest collects ``benches/``.

Every bench puts fastrec and its peers on identical inputs (same numpy memory, same ids and
offsets) and the same thread count (``FASTREC_BENCH_THREADS``, default 2), and checks fastrec's
output against the peer's before it times anything.
"""

from __future__ import annotations

import pytest

import fastrec

try:
    import torch
except ImportError:  # the benches need torch as the peer
    torch = None

from benchutils import *  # noqa: F401,F403  (helpers: Zipf sampler, checks, timing)
from benchutils import THREADS

fastrec.set_num_threads(THREADS)
if torch is not None:
    torch.set_num_threads(THREADS)


def pytest_collect_file(file_path, parent):
    """Collect ``bench_*.py`` when pytest walks ``benches/`` (files named on the command line are
    collected by pytest itself)."""
    if (file_path.suffix == ".py" and file_path.name.startswith("bench_")
            and not parent.session.isinitpath(file_path)):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def pytest_report_header(config):
    lines = [f"fastrec bench threads: {THREADS} (fastrec.set_num_threads / torch.set_num_threads)"]
    if torch is not None:
        lines.append(f"torch {torch.__version__}, intra-op threads {torch.get_num_threads()}")
    try:
        import onnxruntime
    except ImportError:
        pass
    else:
        lines.append(f"onnxruntime {onnxruntime.__version__} (bench_linear.py: intra-op threads {THREADS})")
    return lines


@pytest.fixture(autouse=True)
def _quiet_start():
    """Let every library's idle threads settle before a bench starts timing.

    torch's OpenMP workers spin for a while after each parallel call; a bench that starts
    right after a torch bench would otherwise share the CPUs with them for its first rounds.
    The same pause precedes every bench, torch's included.
    """
    import time

    time.sleep(0.3)
    yield
