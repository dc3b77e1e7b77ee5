// A small persistent thread pool. Workers sleep on a condition variable between calls; the
// calling thread always takes part, and a worker only if it joins before the caller has run
// out of work to take, so a call never waits for a worker that is still waking up. One call
// runs on the pool at a time; a concurrent call (another Python thread) or a nested one runs
// inline on its own thread instead.
#include "fastrec/parallel.h"

#include <pthread.h>
#include <unistd.h>
#if defined(__GLIBCXX__)
#include <cxxabi.h>  // abi::__forced_unwind
#endif
#ifdef __linux__
#include <sched.h>
#include <sys/syscall.h>
#endif

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <exception>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <thread>
#include <vector>

namespace fastrec {
namespace {

thread_local bool t_in_pool_task = false;

// Tests only: a delay every worker sleeps before it tries to join a call (a worker slow to wake).
std::atomic<int64_t> g_join_delay_us{0};

// How long an idle worker spins before it sleeps on the condition variable.
constexpr int kSpinMicros = 50;

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#else
  std::this_thread::yield();
#endif
}

// Who takes part in a call: the caller always; a worker only if it joins while the call is
// open. gate = (generation << 32) | kClosed | number of workers that joined. The caller closes
// the gate when its own part ends (it found no chunk left, or it has run every share no worker
// had claimed) and then waits for the workers that joined, and for those only (one that joins
// just before the close finds nothing left and counts out at once): a worker that was asleep
// (waking a vCPU on a VM can take tens of microseconds) and comes late finds the gate closed
// and goes back to waiting, instead of holding up a call the caller has already finished.
constexpr uint64_t kClosed = uint64_t{1} << 31;
constexpr uint64_t kJoinedMask = kClosed - 1;

struct Job {
  const std::function<void(int64_t, int64_t)>* fn = nullptr;
  // parallel_for_each_thread: share t of n runs once, on worker t when it joins in time; the
  // caller runs share 0 and then any share whose worker has not claimed it yet.
  bool fixed = false;
  int64_t n = 0;
  int64_t chunk = 1;
  std::atomic<int64_t> next{0};
  std::unique_ptr<std::atomic<bool>[]> claimed;  // fixed jobs: share t taken (one per thread)
  std::atomic<uint64_t> gate{0};
  std::atomic<uint64_t> finished{0};  // workers that joined and are done
  // The first exception a participant threw (fn should not throw, but an allocation can):
  // the caller rethrows it once every participant is done with fn.
  std::mutex error_mu;
  std::exception_ptr error;
};

// Marks the current thread as inside a pool task for its lifetime (exceptions included).
struct InPoolTask {
  InPoolTask() { t_in_pool_task = true; }
  ~InPoolTask() { t_in_pool_task = false; }
};

class Pool {
 public:
  explicit Pool(int nthreads) : nthreads_(std::max(1, nthreads)), tids_(static_cast<size_t>(nthreads_)) {
    job_.claimed.reset(new std::atomic<bool>[static_cast<size_t>(nthreads_)]);
    try {
      for (int i = 1; i < nthreads_; ++i) workers_.emplace_back([this, i] { worker_loop(i); });
    } catch (...) {  // (a thread that could not start: stop and join the others, then report it)
      stop_workers();
      throw;
    }
  }
  ~Pool() { stop_workers(); }
  int size() const { return nthreads_; }
  std::mutex& call_mutex() { return call_mu_; }

  // Caller holds call_mutex().
  void run(int64_t n, int64_t chunk, const std::function<void(int64_t, int64_t)>& fn, bool fixed = false) {
    job_.fn = &fn;
    job_.fixed = fixed;
    job_.n = n;
    job_.chunk = chunk;
    job_.next.store(0, std::memory_order_relaxed);
    for (int i = 0; i < nthreads_; ++i) job_.claimed[static_cast<size_t>(i)].store(false, std::memory_order_relaxed);
    job_.finished.store(0, std::memory_order_relaxed);
    job_.error = nullptr;
    const uint64_t gen = generation_.load(std::memory_order_relaxed) + 1;
    // (release: a worker that matched this gate without having seen this generation_, possible
    // only after 2^32 calls, still sees the job's fields)
    job_.gate.store((gen & 0xffffffffu) << 32, std::memory_order_release);
    keep_workers_off_caller_cpu();
    {
      std::lock_guard<std::mutex> lk(mu_);
      generation_.store(gen, std::memory_order_release);  // publishes the job's fields
    }
    cv_.notify_all();
    {
      // Closes the gate and waits for the workers that joined also if work(0) unwinds (only a
      // forced unwind can): fn's captures live on this stack.
      const CloseAndWait close{this};
      work(0);
    }
    if (job_.error) std::rethrow_exception(job_.error);
  }

 private:
  void stop_workers() {
    {
      std::lock_guard<std::mutex> lk(mu_);
      stop_ = true;
      generation_.fetch_add(1, std::memory_order_release);
    }
    cv_.notify_all();
    for (auto& t : workers_) t.join();
  }

  struct CloseAndWait {
    Pool* pool;
    ~CloseAndWait() { pool->close_and_wait(); }
  };
  // Counts a worker that joined out when its work() ends, normally or by unwinding.
  struct CountOut {
    Pool* pool;
    ~CountOut() {
      pool->job_.finished.fetch_add(1, std::memory_order_acq_rel);
      { std::lock_guard<std::mutex> lk(pool->mu_); }  // (the caller may be between its check and its wait)
      pool->done_cv_.notify_all();
    }
  };

  // A worker joins call `gen` if that call is still open. Nothing else of the job is read
  // before this succeeds: the job may already belong to a later call.
  bool join(uint64_t gen) {
    uint64_t w = job_.gate.load(std::memory_order_acquire);
    for (;;) {
      if ((w >> 32) != (gen & 0xffffffffu) || (w & kClosed) != 0) return false;
      if (job_.gate.compare_exchange_weak(w, w + 1, std::memory_order_acq_rel, std::memory_order_acquire)) return true;
    }
  }

  // The caller, once no work is left to hand out: no worker may join from here on; wait for
  // those that did. Spin a little (calls are short), then sleep.
  void close_and_wait() {
    const uint64_t joined = job_.gate.fetch_or(kClosed, std::memory_order_acq_rel) & kJoinedMask;
    for (int spin = 0; job_.finished.load(std::memory_order_acquire) != joined; ++spin) {
      if (spin < 2000) {
        std::this_thread::yield();
      } else {
        std::unique_lock<std::mutex> lk(mu_);
        done_cv_.wait(lk, [&] { return job_.finished.load(std::memory_order_acquire) == joined; });
      }
    }
  }

  void work(int index) {
    try {
      const InPoolTask in_task;
      if (job_.fixed) {
        // Its own share first; the caller then takes any share no worker has claimed yet.
        for (int64_t t = index; t < job_.n; t = index == 0 ? t + 1 : job_.n) {
          if (!job_.claimed[static_cast<size_t>(t)].exchange(true, std::memory_order_acq_rel)) (*job_.fn)(t, job_.n);
        }
      } else {
        for (;;) {
          const int64_t b = job_.next.fetch_add(job_.chunk, std::memory_order_relaxed);
          if (b >= job_.n) break;
          (*job_.fn)(b, std::min(job_.n, b + job_.chunk));
        }
      }
    }
#if defined(__GLIBCXX__)
    catch (abi::__forced_unwind&) {  // thread cancellation must run on, not be swallowed
      job_.next.store(job_.n, std::memory_order_relaxed);
      {
        // The call is incomplete (this thread's chunk stopped half way): the caller raises
        // rather than return a partial result.
        std::lock_guard<std::mutex> lk(job_.error_mu);
        if (!job_.error) {
          job_.error = std::make_exception_ptr(
              std::runtime_error("a thread exited inside a fastrec kernel; the call did not finish"));
        }
      }
      throw;
    }
#endif
    catch (...) {
      // Never let it leave a worker (std::terminate) or the caller's share (the workers would
      // still be running fn, whose captures live on the caller's stack): keep it, stop handing
      // out chunks, and let run() rethrow it after the wait.
      job_.next.store(job_.n, std::memory_order_relaxed);
      std::lock_guard<std::mutex> lk(job_.error_mu);
      if (!job_.error) job_.error = std::current_exception();
    }
  }

  // Workers asleep between calls are woken by the caller, and Linux tends to wake them on the
  // caller's CPU (wake-affine placement). The caller then shares that CPU with a worker for
  // the whole call while another CPU idles: measured on a 2-CPU VM after 0.3 s pauses, a
  // 90 us int8 GEMM took 170-250 us in the blocks where that happened. So the workers' CPU
  // set is the caller's minus the CPU it runs on, updated when the caller's CPU changes (a
  // vDSO call per pool call; a syscall per worker only on a change). Nothing changes when the
  // caller may only use one CPU (or that set cannot be read).
  void keep_workers_off_caller_cpu() {
#ifdef __linux__
    if (nthreads_ < 2) return;
    const int cpu = sched_getcpu();
    if (cpu < 0 || cpu == last_caller_cpu_) return;
    cpu_set_t allowed;
    CPU_ZERO(&allowed);
    if (sched_getaffinity(0, sizeof allowed, &allowed) != 0 || !CPU_ISSET(cpu, &allowed) || CPU_COUNT(&allowed) < 2) {
      return;
    }
    CPU_CLR(cpu, &allowed);
    bool all = true;
    for (int i = 1; i < nthreads_; ++i) {
      const pid_t tid = tids_[static_cast<size_t>(i)].load(std::memory_order_acquire);
      if (tid > 0) {
        sched_setaffinity(tid, sizeof allowed, &allowed);  // advice: errors are ignored
      } else {
        all = false;  // not started yet: try again on the next call
      }
    }
    if (all) last_caller_cpu_ = cpu;
#endif
  }

  void worker_loop(int index) {
#ifdef __linux__
    tids_[static_cast<size_t>(index)].store(static_cast<pid_t>(syscall(SYS_gettid)), std::memory_order_release);
#endif
    uint64_t seen = 0;
    for (;;) {
      // Spin briefly before sleeping: back-to-back calls (the layers of an MLP, a stream of
      // requests) then find the worker awake instead of paying a futex wake-up each time.
      const auto spin_until = std::chrono::steady_clock::now() + std::chrono::microseconds(kSpinMicros);
      bool woke = false;
      for (int i = 0; !woke; ++i) {
        if (generation_.load(std::memory_order_acquire) != seen) {
          woke = true;
        } else if ((i & 63) == 63 && std::chrono::steady_clock::now() > spin_until) {
          break;
        } else {
          cpu_relax();
        }
      }
      {
        std::unique_lock<std::mutex> lk(mu_);
        cv_.wait(lk, [&] { return generation_.load(std::memory_order_acquire) != seen; });
        seen = generation_.load(std::memory_order_acquire);
        if (stop_) return;
      }
      if (const int64_t d = g_join_delay_us.load(std::memory_order_relaxed)) {
        std::this_thread::sleep_for(std::chrono::microseconds(d));
      }
      if (join(seen)) {
        const CountOut count_out{this};
        work(index);
      }
    }
  }

  const int nthreads_;
  std::vector<std::atomic<pid_t>> tids_;  // worker i's thread id (0 until it has started)
  int last_caller_cpu_ = -1;              // under call_mu_
  std::vector<std::thread> workers_;
  std::mutex call_mu_;  // one pool call at a time
  std::mutex mu_;
  std::condition_variable cv_, done_cv_;
  std::atomic<uint64_t> generation_{0};
  bool stop_ = false;
  Job job_;
};

// Pool state, created on first use (no static initialisers). After fork() the child sees the
// parent's pointer but none of its threads: the pid check makes the child build its own pool
// (the parent's object is deliberately leaked in the child). The state mutex itself may have
// been held by another parent thread at the fork, and no thread in the child would ever
// release it: a fork handler gives the child a fresh one (the old one is leaked too).
std::mutex* g_state_mu = nullptr;
Pool* g_pool = nullptr;
pid_t g_pool_pid = 0;

std::atomic<int> g_allowed_cpus{0};  // 0: read it on the next call (also in a forked child)
std::atomic<int64_t> g_allowed_next_check{0};

void reset_state_in_child() {
  g_state_mu = new std::mutex();
  g_pool = nullptr;
}

std::mutex& state_mutex() {
  static const bool registered = [] {
    g_state_mu = new std::mutex();
    pthread_atfork(nullptr, nullptr, reset_state_in_child);
    return true;
  }();
  (void)registered;
  return *g_state_mu;
}
std::atomic<int> g_num_threads{0};

int default_threads() {
  const unsigned hc = std::thread::hardware_concurrency();
  return hc == 0 ? 1 : static_cast<int>(hc);
}

// Returns the pool with its call mutex locked in `call`, or nullptr when the pool is busy.
// Every lock of a pool's call mutex happens under state_mutex(), so a pool being replaced
// cannot be picked up by a late caller.
Pool* lock_pool(int want, std::unique_lock<std::mutex>* call) {
  std::lock_guard<std::mutex> lk(state_mutex());
  const pid_t pid = getpid();
  if (g_pool != nullptr && g_pool_pid != pid) g_pool = nullptr;  // forked child: leak it
  if (g_pool == nullptr || g_pool->size() != want) {
    if (g_pool != nullptr) {
      { std::lock_guard<std::mutex> wait_idle(g_pool->call_mutex()); }
      delete g_pool;
      g_pool = nullptr;  // (not left dangling if the new pool cannot start its threads)
    }
    g_pool = new Pool(want);
    g_pool_pid = pid;
  }
  *call = std::unique_lock<std::mutex>(g_pool->call_mutex(), std::try_to_lock);
  return call->owns_lock() ? g_pool : nullptr;
}

// The CPUs the process may run on, re-read at most every 50 ms: a process pinned to fewer CPUs
// after fastrec was imported (a pre-fork server's worker, `taskset -p`) must not go on running
// more threads than that. A clock read per call, a syscall per 50 ms. The main thread's mask
// (thread id = pid) stands for the process's, whichever thread asks: what `taskset -p PID`
// and os.sched_setaffinity(0, ...) in the main thread set. (Each caller's own mask made one
// count for every thread out of whichever thread read it last; the pool workers' masks leave
// out the caller's CPU.)
int allowed_cpus() {
#ifdef __linux__
  static const bool registered = [] {  // a forked child reads it afresh: a pre-fork server pins its workers
    pthread_atfork(nullptr, nullptr, [] { g_allowed_cpus.store(0, std::memory_order_relaxed); });
    return true;
  }();
  (void)registered;
  int n = g_allowed_cpus.load(std::memory_order_relaxed);
  const int64_t now = std::chrono::duration_cast<std::chrono::nanoseconds>(
                          std::chrono::steady_clock::now().time_since_epoch()).count();
  if (n == 0 || now >= g_allowed_next_check.load(std::memory_order_relaxed)) {
    cpu_set_t set;
    CPU_ZERO(&set);
    n = sched_getaffinity(getpid(), sizeof set, &set) == 0 ? CPU_COUNT(&set) : 0;
    if (n <= 0) n = default_threads();  // (no mask to read: more than CPU_SETSIZE CPUs)
    g_allowed_cpus.store(n, std::memory_order_relaxed);
    g_allowed_next_check.store(now + 50'000'000, std::memory_order_relaxed);
  }
  return n;
#else
  return default_threads();
#endif
}

}  // namespace

int get_num_threads() {
  const int n = g_num_threads.load(std::memory_order_relaxed);
  return std::min(n > 0 ? n : default_threads(), allowed_cpus());
}

void set_num_threads(int n) {
  if (n < 1) throw std::invalid_argument("number of threads must be >= 1");
  g_num_threads.store(n, std::memory_order_relaxed);
}

void set_pool_join_delay_for_tests(int64_t us) { g_join_delay_us.store(std::max<int64_t>(0, us)); }

void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn) {
  if (n <= 0) return;
  grain = std::max<int64_t>(1, grain);
  const int nt = get_num_threads();
  if (nt <= 1 || n <= grain || t_in_pool_task) {
    fn(0, n);
    return;
  }
  std::unique_lock<std::mutex> call;
  Pool* pool = lock_pool(nt, &call);
  if (pool == nullptr) {  // another thread's call is on the pool: run here, alone
    fn(0, n);
    return;
  }
  pool->run(n, grain, fn);
}

void parallel_for_each_thread(const std::function<void(int64_t, int64_t)>& fn) {
  const int nt = get_num_threads();
  if (nt <= 1 || t_in_pool_task) {
    fn(0, 1);
    return;
  }
  std::unique_lock<std::mutex> call;
  Pool* pool = lock_pool(nt, &call);
  if (pool == nullptr) {
    fn(0, 1);
    return;
  }
  pool->run(nt, 1, fn, /*fixed=*/true);
}

}  // namespace fastrec
