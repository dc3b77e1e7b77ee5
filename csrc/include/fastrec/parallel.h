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
// The calling thread takes part; a worker joins if it arrives before the caller has run out
// of chunks to take (the call never waits for a worker that is still waking up). Calls from
// several threads at once are safe: when the pool is busy with another call, or when this
// call comes from inside a pool task, the work runs on the calling thread alone, so there is
// never nested or oversubscribed parallelism.
// fn should not throw (kernels record errors and the caller raises after the pass); if it does
// (an allocation), the first exception is rethrown on the calling thread once every thread is
// done with fn.
void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn);

// Runs fn(t, n) once for each t = 0 .. n-1 of the pool's n threads: t = 0 on the caller, t on
// worker t, so per-thread data (a slice of the weights) stays in that core's cache from call
// to call. A worker that has not claimed its t by the time the caller is done with its own
// (still waking up) has it run by the caller instead, after t = 0: fn(t, n) must not wait for
// another t. When the pool is busy or the call is nested, runs fn(0, 1) alone on the calling
// thread.
void parallel_for_each_thread(const std::function<void(int64_t, int64_t)>& fn);

// Tests only: every pool worker sleeps this long before it tries to join a call (0: none).
void set_pool_join_delay_for_tests(int64_t us);

}  // namespace fastrec
