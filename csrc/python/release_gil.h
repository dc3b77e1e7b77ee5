#pragma once
// The GIL released for a kernel call, as py::gil_scoped_release, but safe at interpreter exit.
//
// A daemon thread that asks for the GIL back while the interpreter is finalizing is ended by
// Python (3.11-3.13) with pthread_exit. Its forced unwind could not pass the noexcept
// destructor of py::gil_scoped_release: std::terminate, and the process aborted (SIGABRT, exit
// code 134) whenever it exited with daemon threads inside fastrec calls (torch's bindings do
// the same). This destructor lets that unwind through (pybind11's dispatcher rethrows it, and
// the thread ends as Python intends), and a thread that finds finalization already under way
// parks instead (sleeps until the process is gone, as Python 3.14 does with such threads).
// Nothing changes before finalization: atexit handlers may still join threads that call
// fastrec.
#include <Python.h>

#include <chrono>
#include <thread>

namespace fastrec {

inline bool python_is_finalizing() {
#if PY_VERSION_HEX >= 0x030D0000
  return Py_IsFinalizing() != 0;
#else
  return _Py_IsFinalizing() != 0;
#endif
}

class ReleaseGil {
 public:
  ReleaseGil() : state_(PyEval_SaveThread()) {}
  ReleaseGil(const ReleaseGil&) = delete;
  ReleaseGil& operator=(const ReleaseGil&) = delete;
  ~ReleaseGil() noexcept(false) {  // (pthread_exit's forced unwind may start in PyEval_RestoreThread)
    if (python_is_finalizing()) {
      for (;;) std::this_thread::sleep_for(std::chrono::hours(1));
    }
    PyEval_RestoreThread(state_);
  }

 private:
  PyThreadState* state_;
};

}  // namespace fastrec
