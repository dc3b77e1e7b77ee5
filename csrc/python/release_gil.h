#pragma once
// The GIL released for a kernel call, as py::gil_scoped_release, made safe for interpreter exit.
//
// A daemon thread that asks for the GIL back while the interpreter is finalizing is ended by
// Python (3.11-3.13) with pthread_exit, whose forced unwind cannot pass the noexcept destructor
// of py::gil_scoped_release: std::terminate, and the process aborted (SIGABRT, exit code 134)
// whenever it exited with daemon threads inside fastrec calls (torch's bindings do the same).
// So fastrec registers quiesce_for_exit() with atexit, which runs before finalization starts:
// from then on a thread leaving a kernel parks (sleeps until the process is gone; it holds no
// lock of fastrec's by then) instead of taking the GIL back, and the hook waits, with the GIL
// released, until every thread that was inside a kernel has either parked or taken the GIL
// back (at most 2 s).
#include <Python.h>

#include <atomic>
#include <chrono>
#include <thread>

namespace fastrec {

inline std::atomic<bool> g_exiting{false};
inline std::atomic<int> g_gil_released{0};  // threads between releasing the GIL and having it back
inline std::thread::id g_exit_thread;       // the thread that ran the hook (never parked)

class ReleaseGil {
 public:
  ReleaseGil() : state_(PyEval_SaveThread()) { g_gil_released.fetch_add(1, std::memory_order_acq_rel); }
  ReleaseGil(const ReleaseGil&) = delete;
  ReleaseGil& operator=(const ReleaseGil&) = delete;
  ~ReleaseGil() {
    if (g_exiting.load(std::memory_order_acquire) && std::this_thread::get_id() != g_exit_thread) {
      g_gil_released.fetch_sub(1, std::memory_order_acq_rel);
      for (;;) std::this_thread::sleep_for(std::chrono::hours(1));
    }
    PyEval_RestoreThread(state_);
    g_gil_released.fetch_sub(1, std::memory_order_acq_rel);
  }

 private:
  PyThreadState* state_;
};

// The atexit hook (the GIL held on entry and on return).
inline void quiesce_for_exit() {
  g_exit_thread = std::this_thread::get_id();
  g_exiting.store(true, std::memory_order_release);
  PyThreadState* st = PyEval_SaveThread();
  const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(2);
  while (g_gil_released.load(std::memory_order_acquire) > 0 && std::chrono::steady_clock::now() < give_up) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  PyEval_RestoreThread(st);
}

}  // namespace fastrec
