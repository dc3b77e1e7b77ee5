"""Threads: many Python threads at once, the GIL released, thread-count settings, fork."""

import os
import subprocess
import tempfile
import sys
import threading
import time

import numpy as np
import pytest

import fastrec
from fastrec import QuantizedTable, ops


def test_many_threads_at_once(rng):
    W = rng.standard_normal((5000, 64)).astype(np.float32)
    qt = QuantizedTable.from_float(W, bits=8)
    cases = []
    for i in range(16):
        B = [1, 7, 300, 2000][i % 4]
        offsets = np.arange(B + 1, dtype=np.int64) * 8
        indices = rng.integers(0, 5000, size=B * 8)
        table = qt if i % 2 else W
        cases.append((table, indices, offsets, ops.embedding_bag(table, indices, offsets)))
    errors = []

    def worker(k):
        try:
            for rep in range(20):
                table, indices, offsets, expected = cases[(k + rep) % len(cases)]
                out = ops.embedding_bag(table, indices, offsets)
                if not np.array_equal(out, expected):
                    errors.append(f"thread {k} rep {rep}: result differs")
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(repr(exc))

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    assert not errors, errors[:3]


def test_errors_from_many_threads(rng):
    W = rng.standard_normal((10, 4)).astype(np.float32)
    caught = []

    def worker():
        for _ in range(50):
            try:
                ops.embedding_bag(W, np.array([1, 10]), np.array([0, 2]))
            except IndexError:
                caught.append(1)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(caught) == 200


def test_gil_released(rng):
    """While one thread runs a long kernel, another thread keeps running Python code."""
    W = rng.standard_normal((200_000, 128)).astype(np.float32)
    B = 20_000
    offsets = np.arange(B + 1, dtype=np.int64) * 64
    indices = rng.integers(0, 200_000, size=B * 64)
    fastrec.set_num_threads(1)
    try:
        t0 = time.perf_counter()
        ops.embedding_bag(W, indices, offsets)
        single = time.perf_counter() - t0
        ticks = []
        done = threading.Event()

        def ticker():
            while not done.is_set():
                ticks.append(time.perf_counter())
                time.sleep(0.001)

        th = threading.Thread(target=ticker)
        th.start()
        time.sleep(0.01)
        start = time.perf_counter()
        for _ in range(3):
            ops.embedding_bag(W, indices, offsets)
        end = time.perf_counter()
        done.set()
        th.join()
    finally:
        fastrec.set_num_threads(fastrec._config.default_num_threads())
    during = [t for t in ticks if start <= t <= end]
    # With the GIL held, the ticker could not run at all during the three calls.
    assert (end - start) > 2 * single * 0.5
    assert len(during) >= max(3, int((end - start) / 0.001 * 0.2)), (len(during), end - start)


def test_set_get_num_threads():
    before = fastrec.get_num_threads()
    try:
        fastrec.set_num_threads(1)
        assert fastrec.get_num_threads() == 1
        cpus = fastrec._config.available_cpus()
        with pytest.warns(RuntimeWarning, match="CPUs are available"):
            fastrec.set_num_threads(cpus + 7)
        assert fastrec.get_num_threads() == cpus
        with pytest.raises(ValueError):
            fastrec.set_num_threads(0)
        with pytest.raises(TypeError):
            fastrec.set_num_threads(2.0)
        with pytest.raises(TypeError):
            fastrec.set_num_threads(True)
        fastrec.set_num_threads(np.int64(1))  # numpy ints, e.g. from a config array
        assert fastrec.get_num_threads() == 1 and type(fastrec.get_num_threads()) is int
    finally:
        fastrec.set_num_threads(before)


def test_results_independent_of_thread_count(rng):
    W = rng.standard_normal((3000, 64)).astype(np.float32)
    B = 4000
    offsets = np.arange(B + 1, dtype=np.int64) * 10
    indices = rng.integers(0, 3000, size=B * 10)
    before = fastrec.get_num_threads()
    try:
        fastrec.set_num_threads(1)
        one = ops.embedding_bag(W, indices, offsets)
        fastrec.set_num_threads(fastrec._config.available_cpus())
        many = ops.embedding_bag(W, indices, offsets)
    finally:
        fastrec.set_num_threads(before)
    assert np.array_equal(one, many)


def _run(code, **env):
    full_env = dict(os.environ)
    for k in ("FASTREC_NUM_THREADS", "OMP_NUM_THREADS", "FASTREC_CPU_ISA"):
        full_env.pop(k, None)
    full_env.update(env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env, cwd=tempfile.gettempdir(), timeout=120)


def _run_ok(code, **env) -> str:
    """_run, which must exit 0; its stripped stdout."""
    r = _run(code, **env)
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
    return r.stdout.strip()


def test_thread_count_from_environment():
    code = "import fastrec; print(fastrec.get_num_threads())"
    cpus = fastrec._config.available_cpus()
    assert _run(code, FASTREC_NUM_THREADS="1").stdout.strip() == "1"
    assert _run(code, OMP_NUM_THREADS="1").stdout.strip() == "1"
    assert _run(code, FASTREC_NUM_THREADS="1", OMP_NUM_THREADS="2").stdout.strip() == "1"
    assert _run(code, FASTREC_NUM_THREADS="999").stdout.strip() == str(cpus)  # clamped
    assert _run(code).stdout.strip() == str(cpus)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_usable_after_fork(rng):
    """The pool is rebuilt in a forked child (its threads do not survive fork)."""
    code = (
        "import os, numpy as np, fastrec\n"
        "from fastrec import ops\n"
        "W = np.random.default_rng(0).standard_normal((50000, 64)).astype(np.float32)\n"
        "off = np.arange(2001, dtype=np.int64) * 50\n"
        "idx = np.random.default_rng(1).integers(0, 50000, size=100000)\n"
        "a = ops.embedding_bag(W, idx, off)\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    b = ops.embedding_bag(W, idx, off)\n"
        "    os._exit(0 if np.array_equal(a, b) else 3)\n"
        "_, status = os.waitpid(pid, 0)\n"
        "print(os.waitstatus_to_exitcode(status))\n"
    )
    assert _run_ok(code) == "0"


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_fork_while_other_threads_run_kernels():
    """A child forked while another thread held the pool's state mutex inherited it locked and
    hung in its first kernel call (2 runs in 3 within 300 forks); it now gets a fresh mutex."""
    code = (
        "import os, threading, time, numpy as np, fastrec\n"
        "from fastrec import ops\n"
        "rng = np.random.default_rng(0)\n"
        "W = rng.standard_normal((20000, 64), dtype=np.float32)\n"
        "off = np.arange(1025, dtype=np.int64) * 20\n"
        "idx = rng.integers(0, 20000, 1024 * 20)\n"
        "want = ops.embedding_bag(W, idx, off)\n"
        "stop = threading.Event()\n"
        "def busy():\n"
        "    while not stop.is_set():\n"
        "        ops.embedding_bag(W, idx, off)\n"
        "ts = [threading.Thread(target=busy, daemon=True) for _ in range(3)]\n"
        "[t.start() for t in ts]\n"
        "bad = 0\n"
        "for i in range(300):\n"
        "    pid = os.fork()\n"
        "    if pid == 0:\n"
        "        os._exit(0 if np.array_equal(ops.embedding_bag(W, idx, off), want) else 3)\n"
        "    for _ in range(400):\n"
        "        done, status = os.waitpid(pid, os.WNOHANG)\n"
        "        if done:\n"
        "            bad += os.waitstatus_to_exitcode(status) != 0\n"
        "            break\n"
        "        time.sleep(0.005)\n"
        "    else:\n"
        "        os.kill(pid, 9)\n"
        "        print('hung at fork', i)\n"
        "        break\n"
        "stop.set()\n"
        "[t.join() for t in ts]\n"
        "print('bad', bad)\n"
    )
    assert _run_ok(code) == "bad 0"


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_locks_held_at_a_fork_are_fresh_in_the_child():
    """A child forked while another thread held an ItemIndex's writer lock (an add or remove in
    progress) or a kernel-loading lock inherited it held: its first add / remove hung forever."""
    code = (
        "import os, signal, numpy as np, fastrec\n"
        "from fastrec.kernels import featurize, hashing\n"
        "ix = fastrec.ItemIndex(np.eye(4, dtype=np.float32))\n"
        "held = [ix._lock, featurize._lock, hashing._numba_lock]\n"
        "[lock.acquire() for lock in held]\n"  # as another thread would hold them at the fork
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    signal.alarm(20)\n"  # (a hang ends the child with SIGALRM)
        "    ix.add(np.ones((1, 4), np.float32), [7])\n"
        "    ix.remove([0])\n"
        "    ok = featurize._lock.acquire(timeout=5) and hashing._numba_lock.acquire(timeout=5)\n"
        "    os._exit(0 if ok and sorted(ix.ids.tolist()) == [1, 2, 3, 7] else 3)\n"
        "[lock.release() for lock in held]\n"
        "_, status = os.waitpid(pid, 0)\n"
        "print(os.waitstatus_to_exitcode(status))\n"
    )
    assert _run_ok(code) == "0"


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs CPU affinity and 2 CPUs")
def test_thread_count_follows_an_affinity_set_after_import():
    """A pre-fork server's worker pinned to one CPU after fastrec was imported (in the parent)
    kept running the parent's thread count; the count now follows the affinity mask (re-read
    at most every 50 ms, and afresh in a forked child)."""
    code = (
        "import os, time, numpy as np, fastrec\n"
        "cpus = sorted(os.sched_getaffinity(0))\n"
        "before = fastrec.get_num_threads()\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    os.sched_setaffinity(0, {cpus[0]})\n"
        "    n = fastrec.get_num_threads()\n"
        "    os.sched_setaffinity(0, set(cpus))\n"
        "    time.sleep(0.06)\n"
        "    os._exit(10 * n + fastrec.get_num_threads())\n"
        "_, status = os.waitpid(pid, 0)\n"
        "print(before, os.waitstatus_to_exitcode(status))\n"
    )
    n = fastrec._config.available_cpus()
    assert _run_ok(code).split() == [str(n), str(10 + n)]


def test_exit_with_daemon_threads_inside_kernels():
    """Interpreter exit while daemon threads were inside kernels aborted the process (SIGABRT,
    exit code 134: Python ends such a thread with pthread_exit when it asks for the GIL back, and
    the unwind met a noexcept destructor). Before finalization nothing changes: an atexit
    handler can still run fastrec in a thread it joins."""
    code = (
        "import atexit, sys, threading, time, numpy as np\n"
        "def late():\n"
        "    out = []\n"
        "    t = threading.Thread(target=lambda: out.append(float(fastrec.ops.embedding_bag(W, idx, off).sum())))\n"
        "    t.start(); t.join(20)\n"
        "    print('late handler', out == [want])\n"
        "atexit.register(late)\n"
        "import fastrec\n"
        "from fastrec import ops\n"
        "rng = np.random.default_rng(0)\n"
        "W = rng.standard_normal((50000, 64), dtype=np.float32)\n"
        "idx = rng.integers(0, 50000, 256 * 32); off = np.arange(0, 256 * 32 + 1, 32)\n"
        "want = float(ops.embedding_bag(W, idx, off).sum())\n"
        "mlp = fastrec.Int8MLP.from_float([(rng.standard_normal((256, 256), dtype=np.float32), None)] * 2, ['relu'] * 2)\n"
        "x = rng.standard_normal((256, 256), dtype=np.float32)\n"
        "def loop(i):\n"
        "    while True:\n"
        "        ops.embedding_bag(W, idx, off) if i % 2 else mlp(x)\n"
        "for i in range(6):\n"
        "    threading.Thread(target=loop, args=(i,), daemon=True).start()\n"
        "time.sleep(0.2)\n"
    )
    for _ in range(3):
        assert _run_ok(code) == "late handler True"


def test_exception_inside_a_pool_task_is_raised_cleanly():
    """An allocation failing inside a pool task (the MLP's per-thread scratch) left run() while
    the other thread still ran the task: a MemoryError, then a segfault. Now every thread finishes
    first, the caller raises, and the pool keeps working."""
    code = (
        "import resource, numpy as np, fastrec\n"
        "from fastrec import Int8Linear, Int8MLP\n"
        "H = 130_000; r = np.random.default_rng(0)\n"
        "mlp = Int8MLP([Int8Linear.from_float(r.standard_normal((H, 1)).astype(np.float32)),\n"
        "               Int8Linear.from_float(r.standard_normal((1, H)).astype(np.float32))], ['relu', None])\n"
        "x = r.standard_normal((720, 1)).astype(np.float32)\n"
        "want = mlp(x[:2])\n"
        "vm = [int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmSize')][0]\n"
        "resource.setrlimit(resource.RLIMIT_AS, (vm + (60 << 20), resource.RLIM_INFINITY))\n"
        "for _ in range(3):\n"
        "    try:\n"
        "        mlp(x)\n"
        "        print('ran')\n"
        "    except MemoryError:\n"
        "        print('MemoryError')\n"
        "resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))\n"
        "print(np.array_equal(mlp(x[:2]), want))\n"
    )
    r = _run(code, FASTREC_NUM_THREADS="2")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.split()
    assert lines[-1] == "True" and "MemoryError" in lines, r.stdout


def test_a_call_does_not_wait_for_a_late_worker(rng):
    """A worker still waking up (here made to sleep 300 ms before it joins a call) must not hold
    up a call the caller can finish alone: the caller takes every chunk of a dynamic split, and
    the share of a static split that no worker has claimed, and returns. Before, every call
    waited for every worker to show up (on a VM a sleeping vCPU can take tens of microseconds)."""
    if fastrec._config.available_cpus() < 2:
        pytest.skip("needs at least 2 usable CPUs")
    lin = fastrec.Int8Linear.from_float(rng.standard_normal((1024, 1024), dtype=np.float32))
    mlp = fastrec.Int8MLP.from_float([(rng.standard_normal((512, 1024), dtype=np.float32), None),
                                      (rng.standard_normal((64, 512), dtype=np.float32), None)], ["relu", None])
    cases = {  # each wakes the pool on 2 threads
        "static channel split (1 row)": lambda x: lin(x[:1]),
        "channel tasks (6 rows)": lambda x: lin(x[:6]),
        "row tasks (64 rows)": lambda x: mlp(x),
    }
    x = rng.standard_normal((64, 1024), dtype=np.float32)
    old = fastrec.get_num_threads()
    try:
        fastrec.set_num_threads(1)
        want = {name: f(x) for name, f in cases.items()}
        fastrec.set_num_threads(2)
        fastrec._C._set_pool_join_delay_us(300_000)
        for _ in range(3):
            for name, f in cases.items():
                t0 = time.perf_counter()
                got = f(x)
                took = time.perf_counter() - t0
                assert np.array_equal(got, want[name]), name
                assert took < 0.15, f"{name}: {took * 1e3:.0f} ms, as if it waited for the late worker"
    finally:
        fastrec._C._set_pool_join_delay_us(0)
        fastrec.set_num_threads(old)


def _thread_cpu(tid: int) -> int:
    with open(f"/proc/self/task/{tid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[36])  # field 39: the CPU it last ran on


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity") or not os.path.exists("/proc/self/task"),
                    reason="Linux only")
def test_pool_workers_avoid_the_callers_cpu(rng):
    """Workers may run on every CPU the caller may use except the one the caller is on (so a
    woken worker is not placed on the caller's CPU to share it for the whole call)."""
    allowed = os.sched_getaffinity(0)
    if len(allowed) < 2:
        pytest.skip("needs at least 2 usable CPUs")
    old = fastrec.get_num_threads()
    fastrec.set_num_threads(2)
    try:
        lin = fastrec.Int8Linear.from_float(rng.standard_normal((1024, 1024), dtype=np.float32))
        x = rng.standard_normal((256, 1024), dtype=np.float32)
        main = threading.get_native_id()
        for _ in range(20):  # the caller may migrate between the call and the check: retry
            lin(x)
            cpu = _thread_cpu(main)
            others = [int(t) for t in os.listdir("/proc/self/task") if int(t) != main]
            if any(os.sched_getaffinity(t) == allowed - {cpu} for t in others):
                break
            time.sleep(0.01)
        else:
            pytest.fail(f"no thread has the caller's CPU set {sorted(allowed)} minus its CPU {cpu}")
    finally:
        fastrec.set_num_threads(old)


def _race(call, flip, seconds: float = 1.0) -> tuple[int, int]:
    """Runs call() in a loop for `seconds` while another thread runs flip() in a loop; returns
    (calls that returned, calls that raised IndexError / ValueError). A crash kills the test."""
    stop = threading.Event()

    def flipper():
        while not stop.is_set():
            flip()

    t = threading.Thread(target=flipper, daemon=True)
    t.start()
    ok = refused = 0
    end = time.time() + seconds
    try:
        while time.time() < end:
            try:
                call()
                ok += 1
            except (IndexError, ValueError):
                refused += 1
    finally:
        stop.set()
        t.join()
    return ok, refused


def test_inputs_written_by_another_thread_during_a_call_never_crash():
    """The GIL is released while the kernels run, so another Python thread can write an input
    array during a call: garbage in, garbage out (or an error), but never a read outside the
    table or the indices. The ids were checked and then read again (an id flipped to 10**13 in
    between read far outside the table: SIGSEGV), and the offsets / exclude offsets were checked
    in place and read again (sending the kernels past the indices). Now the offsets are copied
    before they are checked and the fast path clamps each id it reads."""
    table = np.random.default_rng(0).random((1000, 16), dtype=np.float32)
    n = 400_000
    idx = np.zeros(n, np.int64)
    off = np.array([0, n // 2, n], np.int64)

    def flip_ids():
        idx[n // 2:n // 2 + 64] = 10**13
        idx[n // 2:n // 2 + 64] = 0

    def flip_offsets():
        off[1] = 10**12
        off[1] = n // 2

    want = ops.embedding_bags([table], idx, off)
    for flip in (flip_ids, flip_offsets):
        ok, refused = _race(lambda: ops.embedding_bags([table], idx, off), flip, 0.7)
        assert ok + refused > 0
        # the arrays as they were: the same answer as before the race
        np.testing.assert_array_equal(ops.embedding_bags([table], idx, off), want)
    items = np.random.default_rng(1).standard_normal((2000, 8)).astype(np.float32)
    index = fastrec.ItemIndex(items, precision="fp32")
    Q = 512
    q = np.random.default_rng(2).standard_normal((Q, 8)).astype(np.float32)
    ex_ids = np.arange(Q, dtype=np.int64)
    ex_off = np.arange(Q + 1, dtype=np.int64)

    def flip_exclude():
        ex_off[Q - 1] = 10**7
        ex_off[Q - 1] = Q - 1

    want = index.search(q, 50, exclude=(ex_ids, ex_off))
    ok, refused = _race(lambda: index.search(q, 50, exclude=(ex_ids, ex_off)), flip_exclude, 0.7)
    assert ok + refused > 0
    got = index.search(q, 50, exclude=(ex_ids, ex_off))
    np.testing.assert_array_equal(got[1], want[1])


def test_quantized_table_rows_cannot_be_freed_under_it():
    """The table keeps a pointer into its packed array, whose only other owner could resize it
    in place (numpy allows that), freeing the rows: .data is now a view, which cannot."""
    qt = QuantizedTable.from_float(np.ones((4, 8), np.float32))
    want = ops.embedding_bag(qt, np.array([0, 3]), np.array([0, 2]))
    with pytest.raises(ValueError, match="does not own its data"):
        qt.data.resize((1, qt.data.shape[1]))
    np.testing.assert_array_equal(ops.embedding_bag(qt, np.array([0, 3]), np.array([0, 2])), want)


def test_internal_sequences_of_fresh_objects_are_held():
    """A sequence that builds a new object for each item: the binding held borrowed handles, so
    each object was freed before it was read ("not initialised", or a crash under a debug
    allocator)."""
    from fastrec import _C

    W = np.ones((4, 8), np.float32)

    class Fresh:
        def __len__(self):
            return 2

        def __getitem__(self, i):
            if i >= 2:
                raise IndexError(i)
            return _C.ItemBlock(W, 2, True)

    q = np.ones((1, 8), np.float32)
    s, i = _C.topk_search(Fresh(), [np.arange(4, dtype=np.int64), np.arange(4, 8, dtype=np.int64)],
                          [None, None], q, 2, 2, False, None, None)
    assert i.tolist() == [[0, 1]]  # (every score ties: the smaller ids)
