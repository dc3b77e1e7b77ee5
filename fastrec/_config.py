"""Thread-count defaults: fastrec.set_num_threads, FASTREC_NUM_THREADS, OMP_NUM_THREADS, or the
CPUs this process may use (affinity mask and cgroup CPU quota), never more than the latter."""

from __future__ import annotations

import math
import numbers
import os
import warnings

from . import _C


def _cgroup_cpu_limit() -> int | None:
    """CPUs allowed by a cgroup quota (v2 ``cpu.max`` or v1 ``cfs_quota_us``), if any."""
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()[:2]
        if quota != "max":
            return max(1, math.ceil(int(quota) / int(period)))
        return None
    except (OSError, ValueError):
        pass
    try:
        with open("/sys/fs/cgroup/cpu/cpu.cfs_quota_us") as f:
            quota = int(f.read())
        with open("/sys/fs/cgroup/cpu/cpu.cfs_period_us") as f:
            period = int(f.read())
        if quota > 0 and period > 0:
            return max(1, math.ceil(quota / period))
    except (OSError, ValueError):
        pass
    return None


def available_cpus() -> int:
    """The number of CPUs this process may run on."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    limit = _cgroup_cpu_limit()
    if limit is not None:
        n = min(n, limit)
    return max(1, n)


def _env_threads(name: str) -> int | None:
    value = os.environ.get(name, "").strip()
    if not value:
        return None
    try:
        n = int(value.split(",")[0])  # OMP_NUM_THREADS may be a nested list "4,2"
    except ValueError:
        warnings.warn(f"ignoring {name}={value!r}: not an integer", RuntimeWarning, stacklevel=3)
        return None
    if n < 1:
        warnings.warn(f"ignoring {name}={value!r}: must be >= 1", RuntimeWarning, stacklevel=3)
        return None
    return n


def default_num_threads() -> int:
    cpus = available_cpus()
    for name in ("FASTREC_NUM_THREADS", "OMP_NUM_THREADS"):
        n = _env_threads(name)
        if n is not None:
            return min(n, cpus)
    return cpus


def set_num_threads(n: int) -> None:
    """Set how many threads fastrec's kernels use (the calling thread included).

    Values above the CPUs this process may use are clamped to that number, with a warning:
    more threads than CPUs only adds contention.
    """
    if isinstance(n, bool) or not isinstance(n, numbers.Integral):  # (numpy ints are fine)
        raise TypeError(f"number of threads must be an int, got {type(n).__name__}")
    n = int(n)
    if n < 1:
        raise ValueError(f"number of threads must be >= 1, got {n}")
    cpus = available_cpus()
    if n > cpus:
        warnings.warn(f"set_num_threads({n}): only {cpus} CPUs are available; using {cpus}",
                      RuntimeWarning, stacklevel=2)
        n = cpus
    _C.set_num_threads(n)


def get_num_threads() -> int:
    """The number of threads fastrec's kernels use."""
    return _C.get_num_threads()


_C.set_num_threads(default_num_threads())
