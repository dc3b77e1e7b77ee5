// The one thread pool. Kernels call parallel_for; nothing else in fastrec starts threads.
#pragma once
#include <cstdint>
#include <functional>

namespace fastrec {

// Threads fastrec uses for one call, the caller included (>= 1).
int get_num_threads();
// Sets the thread count (>= 1). The caller (Python) clamps it to the CPUs the process may use.
void set_num_threads(int n);

// Runs fn(begin, end) over [0, n) split into chunks of about `grain` items, on the pool.
// The calling thread takes part. Calls from several threads at once are safe: when the pool
// is busy with another call, or when this call comes from inside a pool task, the work runs
// on the calling thread alone, so there is never nested or oversubscribed parallelism.
// fn should not throw (kernels record errors and the caller raises after the pass); if it does
// (an allocation), the first exception is rethrown on the calling thread once every thread is
// done with fn.
void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn);

// Runs fn(t, n) once on each of the pool's n threads, t = 0 (the caller) .. n-1; when the
// pool is busy or the call is nested, runs fn(0, 1) alone on the calling thread. The same
// thread gets the same t on every call, so per-thread data (a slice of the weights) stays in
// that core's cache from call to call.
void parallel_for_each_thread(const std::function<void(int64_t, int64_t)>& fn);

}  // namespace fastrec
