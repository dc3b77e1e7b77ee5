"""The host emulation of the CUDA kernels (fastrec._C_cuda_emu, csrc/cuda/emu/) catches the
mistakes it claims to: kernels with a missing barrier, a missing cp.async wait (or a read of a
group wait_group left in flight), a write-after-read race between warps, a deadlock and a
collective over exited lanes (csrc/cuda/emu/selftest_emu.cpp) give wrong results or errors, and
their correct forms the right ones, in index order (FASTREC_EMU_SEED unset) and under seeded
schedules; and a device-to-host copy into pinned memory is seen only after a wait. The emulated
GPU tests rely on this."""

import pytest

from conftest import _C_cuda_emu, _EMU_ERROR, emulation_unavailable


@pytest.fixture(autouse=True)
def _module():
    if _C_cuda_emu is None:
        emulation_unavailable(f"fastrec._C_cuda_emu does not import ({_EMU_ERROR}; built with FASTREC_CUDA_EMU=ON)")


SEEDS = [None, 1, 2, 7, 12345]
THREADS = 64  # two warps


@pytest.fixture(params=SEEDS, ids=lambda s: f"emulated-seed{s}")
def seed(request, monkeypatch):
    if request.param is None:
        monkeypatch.delenv("FASTREC_EMU_SEED", raising=False)
    else:
        monkeypatch.setenv("FASTREC_EMU_SEED", str(request.param))
    return request.param


def neighbour_expected(blocks, n):
    return [1000 * b + (t + 1) % n for b in range(blocks) for t in range(n)]


def test_missing_barrier(seed):
    assert _C_cuda_emu._selftest("neighbour", 3, THREADS) == neighbour_expected(3, THREADS)
    assert _C_cuda_emu._selftest("neighbour_no_barrier", 3, THREADS) != neighbour_expected(3, THREADS)


def test_missing_cp_async_wait(seed):
    n = THREADS
    expected = [4 * ((t + 1) % n) + j for t in range(n) for j in range(4)]
    assert _C_cuda_emu._selftest("async_copy", 1, n) == expected
    assert _C_cuda_emu._selftest("async_copy_no_wait", 1, n) != expected


def test_cp_async_wait_group_leaves_the_newest_groups(seed):
    n = THREADS
    expected = [8 * ((t + 1) % n) + j for t in range(n) for j in range(8)]
    assert _C_cuda_emu._selftest("two_groups", 1, n) == expected
    early = _C_cuda_emu._selftest("two_groups_early_read", 1, n)
    first = [v for i, v in enumerate(early) if i % 8 < 4]
    assert first == [v for i, v in enumerate(expected) if i % 8 < 4]  # wait_group 1 landed group 0
    assert early != expected  # ... and not (all of) group 1


def test_host_reads_device_copies_only_after_a_wait(seed):
    n = 40
    values = [7 * i + 1 for i in range(n)]
    got = _C_cuda_emu._selftest("copy_to_pinned", 1, n)
    assert got[:n] == [-0x5A5A5A5B] * n  # 0xA5 bytes until the synchronize
    assert got[n:] == values
    assert _C_cuda_emu._selftest("copy_to_pageable", 1, n) == values + values  # pageable: done on return


def rounds_expected(n):
    other = [(t + 32) % n for t in range(n)]
    return [sum(100 * r + other[t] for r in range(4)) + sum(100 * r + other[t ^ 1] for r in range(4)) for t in range(n)]


def test_write_after_read_between_warps(seed):
    assert _C_cuda_emu._selftest("rounds", 1, THREADS) == rounds_expected(THREADS)
    racy = _C_cuda_emu._selftest("rounds_no_end_barrier", 1, THREADS)
    if seed is None:
        # Index order keeps the warps in step: the race does not show (host_emulation.h says so);
        # the seeded schedules, which let a warp run ahead to its next barrier, are what catch it.
        assert racy == rounds_expected(THREADS)
    else:
        assert racy != rounds_expected(THREADS)


def test_deadlock_is_an_error(seed):
    with pytest.raises(RuntimeError, match="deadlock"):
        _C_cuda_emu._selftest("split_barriers", 1, THREADS)
    # and the emulator is usable afterwards
    assert _C_cuda_emu._selftest("neighbour", 1, THREADS) == neighbour_expected(1, THREADS)


def test_collective_over_exited_lanes_is_an_error(seed):
    with pytest.raises(RuntimeError, match="exited"):
        _C_cuda_emu._selftest("exited_lanes", 1, 32)


def test_bad_selftest_arguments_emulated():
    with pytest.raises(ValueError):
        _C_cuda_emu._selftest("no such kernel", 1, 32)
    with pytest.raises(ValueError):
        _C_cuda_emu._selftest("neighbour", 1, 0)


def test_bad_seed_emulated(monkeypatch):
    monkeypatch.setenv("FASTREC_EMU_SEED", "seven")
    with pytest.raises(ValueError, match="FASTREC_EMU_SEED"):
        _C_cuda_emu._selftest("neighbour", 1, 32)
