// (glibc's fortified longjmp refuses to jump onto another stack, which is what a fiber switch is)
#undef _FORTIFY_SOURCE

// The host emulation's scheduler (fibers for a block's threads: host_emulation.h) and the CUDA
// runtime calls fastrec's launchers make: "device" memory is host memory, a stream runs its
// work at once, except that what the host reads of it waits for a synchronisation (see "what
// the host sees" below), and there is one device, 0.
#include "host_emulation.h"

#include <setjmp.h>
#include <ucontext.h>

#include <cstdlib>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)  // (built with -fsanitize=address: tell it about each stack switch)
#include <sanitizer/common_interface_defs.h>
#define FASTREC_EMU_ASAN 1
#endif

namespace fastrec_emu {

thread_local dim3 thread_idx, block_idx, block_dim, grid_dim;

namespace {

constexpr size_t kStackBytes = 256 * 1024;

// One block's threads as fibers on the calling thread. A fiber is started with swapcontext (its
// own stack) and from then on switched with _setjmp / _longjmp, which save no signal mask (no
// system call per switch: a block waits at thousands of barriers).
struct Block {
  ucontext_t main{};
  jmp_buf main_env;
  struct Env {
    jmp_buf e;
  };
  std::vector<Env> env;
  std::vector<ucontext_t> ctx;
  std::vector<std::unique_ptr<char[]>> stacks;
  // AddressSanitizer's view of the switches: each side's fake stack, and the launching thread's
  // stack (learned on the first switch into a fiber)
  std::vector<void*> fake;
  void* main_fake = nullptr;
  const void* main_bottom = nullptr;
  size_t main_size = 0;
  std::vector<char> done;
  const std::function<void()>* body = nullptr;
  int live = 0, current = 0;
  uint64_t progress = 0;  // barrier releases and thread exits: the scheduler's deadlock check
  std::exception_ptr error;
  // __syncthreads
  int bar_arrived = 0;
  uint64_t bar_phase = 0;
  // per warp: a barrier and the exchange slots
  struct Warp {
    int arrived = 0, live = 0;
    uint64_t phase = 0;
    uint64_t slot[32] = {};
    unsigned live_mask = 0;
  };
  std::vector<Warp> warps;
  // per thread: its cp.async copies not yet landed, and its committed group count
  struct Copy {
    void* dst;
    const void* src;
    int n;
    uint64_t group;
  };
  std::vector<std::vector<Copy>> copies;
  std::vector<Copy> orphans;  // of threads that returned: landed when the block ends
  std::vector<uint64_t> committed;
  // the schedule: index order, or (seeded) a random order of threads in each round, of blocks,
  // and of when each cp.async copy lands
  uint64_t rng = 0;
  bool shuffled = false;
};

// splitmix64
uint64_t next_random(uint64_t& state) {
  uint64_t z = (state += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

template <class T>
void shuffle(std::vector<T>& v, uint64_t& state) {
  for (size_t i = v.size(); i > 1; --i) std::swap(v[i - 1], v[next_random(state) % i]);
}

void land(const Block::Copy& c) {
  if (c.n > 0) std::memcpy(c.dst, c.src, static_cast<size_t>(c.n));
  if (c.n < 16) std::memset(static_cast<char*>(c.dst) + c.n, 0, static_cast<size_t>(16 - c.n));
}

// FASTREC_EMU_SEED: 0 or unset runs threads and blocks in index order and lands every cp.async
// copy at its wait; any other value, a schedule drawn from it (host_emulation.h).
uint64_t schedule_seed() {
  const char* s = std::getenv("FASTREC_EMU_SEED");
  if (s == nullptr || *s == '\0') return 0;
  char* end = nullptr;
  const unsigned long long v = std::strtoull(s, &end, 10);
  if (*end != '\0' || *s == '-') throw std::invalid_argument("FASTREC_EMU_SEED must be a non-negative integer");
  return v;
}
thread_local uint64_t launches = 0;

thread_local Block* cur = nullptr;
thread_local std::unique_ptr<char[]> smem_buffer;  // exactly one launch's bytes (ASan sees overruns)

// Stack switches, announced to AddressSanitizer when built with it (no-ops otherwise):
// to_fiber / back_in_main on the launching thread's stack, to_main / in_fiber on a fiber's.
inline void to_fiber(Block& b, int i) {
#ifdef FASTREC_EMU_ASAN
  __sanitizer_start_switch_fiber(&b.main_fake, b.stacks[i].get(), kStackBytes);
#endif
}
inline void back_in_main(Block& b) {
#ifdef FASTREC_EMU_ASAN
  __sanitizer_finish_switch_fiber(b.main_fake, nullptr, nullptr);
#endif
}
inline void to_main(Block& b, bool exiting) {
#ifdef FASTREC_EMU_ASAN
  __sanitizer_start_switch_fiber(exiting ? nullptr : &b.fake[b.current], b.main_bottom, b.main_size);
#endif
}
inline void in_fiber(Block& b) {
#ifdef FASTREC_EMU_ASAN
  __sanitizer_finish_switch_fiber(b.fake[b.current], &b.main_bottom, &b.main_size);
#endif
}

void yield() {
  if (_setjmp(cur->env[cur->current].e) == 0) {
    to_main(*cur, false);
    _longjmp(cur->main_env, 1);
  }
  in_fiber(*cur);
}

// The last thread to arrive releases the others (they notice the phase change when resumed).
void release_if_complete_block() {
  if (cur->bar_arrived > 0 && cur->bar_arrived == cur->live) {
    cur->bar_arrived = 0;
    ++cur->bar_phase;
    ++cur->progress;
  }
}
void release_if_complete_warp(Block::Warp& w) {
  if (w.arrived > 0 && w.arrived == w.live) {
    w.arrived = 0;
    ++w.phase;
    ++cur->progress;
  }
}

void trampoline() {
  Block* b = cur;
  in_fiber(*b);
  if (_setjmp(b->env[b->current].e) == 0) {  // started: run when next scheduled
    to_main(*b, false);
    _longjmp(b->main_env, 1);
  }
  in_fiber(*b);
  try {
    (*b->body)();
  } catch (...) {
    if (!b->error) b->error = std::current_exception();
  }
  // this thread leaves its block's and its warp's barriers; its copies still in flight land
  // (nothing may read them before the block ends: they land then, so that an exit never
  // stands in for a missing wait)
  b->orphans.insert(b->orphans.end(), b->copies[b->current].begin(), b->copies[b->current].end());
  b->copies[b->current].clear();
  b->done[b->current] = 1;
  --b->live;
  Block::Warp& w = b->warps[b->current / 32];
  --w.live;
  w.live_mask &= ~(1u << (b->current & 31));
  ++b->progress;
  release_if_complete_block();
  release_if_complete_warp(w);
  to_main(*b, true);
  _longjmp(b->main_env, 1);  // never resumed
}

}  // namespace

void* dynamic_smem() { return smem_buffer.get(); }

int lane() { return cur == nullptr ? 0 : cur->current & 31; }

void syncthreads() {
  if (cur == nullptr) throw std::logic_error("host emulation: __syncthreads outside a kernel");
  const uint64_t mine = cur->bar_phase;
  ++cur->bar_arrived;
  release_if_complete_block();
  while (cur->bar_phase == mine) yield();
}

void syncwarp() {
  Block::Warp& w = cur->warps[cur->current / 32];
  const uint64_t mine = w.phase;
  ++w.arrived;
  release_if_complete_warp(w);
  while (w.phase == mine) yield();
}

WarpValues warp_exchange(uint64_t v) {
  if (cur == nullptr) throw std::logic_error("host emulation: a warp collective outside a kernel");
  Block::Warp& w = cur->warps[cur->current / 32];
  w.slot[cur->current & 31] = v;
  syncwarp();  // every live lane has put its value
  WarpValues r;
  std::memcpy(r.v, w.slot, sizeof(r.v));
  r.live = w.live_mask;
  syncwarp();  // every live lane has read before any lane puts again
  return r;
}

// ---- what the host sees of device work: only after a synchronisation ---------------------------
// A device-to-host cudaMemcpyAsync into pinned memory (cudaHostAlloc / cudaMallocHost) copies its
// source at once (all earlier work has run) but writes its destination only at the next
// synchronisation (stream, event or device synchronize, or a blocking cudaMemcpy), and fills it
// with 0xA5 bytes meanwhile; one into pageable memory completes before it returns, as CUDA's
// does. Mapped pinned memory (cudaHostAllocMapped) has a device view of its own: kernels write
// the view, which reaches the host buffer at a synchronisation; host writes reach the view at the
// next launch or synchronisation. So a host read of device results without a wait reads garbage
// or stale values, which the tests notice. A synchronisation lands every pending copy (whichever
// thread or stream queued it: early, as the hardware may), but exchanges only the mapped memory
// the calling thread allocated (fastrec's launchers keep their flag buffers per thread, and
// another thread's kernel may be writing its own). One mutex guards all of it.
namespace {

struct PendingCopy {
  char* dst;
  std::vector<char> bytes;
};

struct Pinned {
  char* host;
  size_t bytes;
  bool mapped;
  std::unique_ptr<char[]> view, synced;  // (mapped) the device's view; the host buffer as last synchronised
  std::thread::id owner;
};

std::mutex host_mutex;
std::vector<PendingCopy> pending_copies;
std::vector<std::unique_ptr<Pinned>> pinned;

bool overlaps(const char* a, size_t na, const char* b, size_t nb) { return a < b + nb && b < a + na; }

// Under host_mutex: pending copies land; host writes since the last synchronisation reach each
// mapped view the calling thread owns, and (at a synchronisation) device writes reach the host
// buffer (a byte both wrote: the host's).
void land_pending_locked() {
  for (const PendingCopy& c : pending_copies) std::memcpy(c.dst, c.bytes.data(), c.bytes.size());
  pending_copies.clear();
}
void exchange_mapped_locked(bool device_to_host) {
  const std::thread::id me = std::this_thread::get_id();
  for (const auto& m : pinned) {
    if (!m->mapped || m->owner != me) continue;
    for (size_t i = 0; i < m->bytes; ++i) {
      if (m->host[i] != m->synced[i]) {
        m->view[i] = m->host[i];
      } else if (device_to_host && m->view[i] != m->synced[i]) {
        m->host[i] = m->view[i];
      }
      m->synced[i] = m->host[i];
    }
  }
}

bool in_pinned_locked(const void* p, size_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (const auto& m : pinned)
    if (c >= m->host && c + bytes <= m->host + m->bytes) return true;
  return false;
}

}  // namespace

void before_launch() {
  std::lock_guard<std::mutex> lock(host_mutex);
  exchange_mapped_locked(false);
}

void synchronize() {
  std::lock_guard<std::mutex> lock(host_mutex);
  land_pending_locked();
  exchange_mapped_locked(true);
}

// A copy reading host memory a pending copy still has to write comes after it in stream order:
// everything pending lands first.
void before_reading_host(const void* src, size_t bytes) {
  std::lock_guard<std::mutex> lock(host_mutex);
  for (const PendingCopy& c : pending_copies) {
    if (overlaps(c.dst, c.bytes.size(), static_cast<const char*>(src), bytes)) {
      land_pending_locked();
      return;
    }
  }
}

void copy_to_host_async(void* dst, const void* src, size_t bytes) {
  std::lock_guard<std::mutex> lock(host_mutex);
  if (!in_pinned_locked(dst, bytes)) {  // pageable: done before the call returns
    std::memmove(dst, src, bytes);
    return;
  }
  PendingCopy c{static_cast<char*>(dst),
                std::vector<char>(static_cast<const char*>(src), static_cast<const char*>(src) + bytes)};
  std::memset(dst, 0xA5, bytes);
  pending_copies.push_back(std::move(c));
}

void register_pinned(void* host, size_t bytes, bool mapped) {
  auto m = std::make_unique<Pinned>();
  m->host = static_cast<char*>(host);
  m->bytes = bytes;
  m->mapped = mapped;
  if (mapped) {
    m->view.reset(new char[bytes == 0 ? 1 : bytes]);
    m->synced.reset(new char[bytes == 0 ? 1 : bytes]);
    std::memcpy(m->view.get(), host, bytes);
    std::memcpy(m->synced.get(), host, bytes);
  }
  m->owner = std::this_thread::get_id();
  std::lock_guard<std::mutex> lock(host_mutex);
  pinned.push_back(std::move(m));
}

// The device's address of pinned host memory: the view of mapped memory, else the memory itself.
void* device_view(void* host) {
  std::lock_guard<std::mutex> lock(host_mutex);
  for (const auto& m : pinned)
    if (m->host == host) return m->mapped ? m->view.get() : host;
  return nullptr;
}

// Freed: its pending copies are dropped (they would write freed memory).
void unregister_pinned(void* host) {
  std::lock_guard<std::mutex> lock(host_mutex);
  for (size_t i = 0; i < pinned.size(); ++i) {
    const Pinned& m = *pinned[i];
    if (m.host != host) continue;
    pending_copies.erase(std::remove_if(pending_copies.begin(), pending_copies.end(),
                                        [&](const PendingCopy& c) { return overlaps(c.dst, c.bytes.size(), m.host, m.bytes); }),
                         pending_copies.end());
    pinned.erase(pinned.begin() + static_cast<std::ptrdiff_t>(i));
    return;
  }
}

void cp_async16(void* smem, const void* gmem, int n) {
  if (cur == nullptr) throw std::logic_error("host emulation: cp.async outside a kernel");
  const Block::Copy c{smem, gmem, n, cur->committed[cur->current]};
  if (cur->shuffled && (next_random(cur->rng) & 1)) {
    land(c);
  } else {
    cur->copies[cur->current].push_back(c);
  }
}

void cp_async_commit() {
  if (cur == nullptr) throw std::logic_error("host emulation: cp.async outside a kernel");
  ++cur->committed[cur->current];
}

// Lands the calling thread's copies of every committed group but the newest `pending_groups`.
void cp_async_wait(int pending_groups) {
  if (cur == nullptr) throw std::logic_error("host emulation: cp.async outside a kernel");
  std::vector<Block::Copy>& mine = cur->copies[cur->current];
  const uint64_t committed = cur->committed[cur->current];
  size_t kept = 0;
  for (const Block::Copy& c : mine) {
    if (c.group + static_cast<uint64_t>(pending_groups) < committed) {
      land(c);
    } else {
      mine[kept++] = c;
    }
  }
  mine.resize(kept);
}

__attribute__((noinline)) static void make_fiber(Block& b, int i) {
  getcontext(&b.ctx[i]);
  b.ctx[i].uc_stack.ss_sp = b.stacks[i].get();
  b.ctx[i].uc_stack.ss_size = kStackBytes;
  b.ctx[i].uc_link = nullptr;
  makecontext(&b.ctx[i], trampoline, 0);
}

// Starts thread i's fiber: it stops at once, before the kernel. (The jumps live in these two
// small functions and getcontext in make_fiber, not in run_grid, whose locals a jump back could
// otherwise clobber.)
__attribute__((noinline)) static void start(Block& b, int i) {
  b.current = i;
  if (_setjmp(b.main_env) == 0) {
    to_fiber(b, i);
    swapcontext(&b.main, &b.ctx[i]);
  }
  back_in_main(b);
}

// Runs thread i of the block until it next waits or returns.
__attribute__((noinline)) static void resume(Block& b, int i) {
  if (b.done[i]) return;
  b.current = i;
  const dim3& d = block_dim;
  thread_idx = dim3(i % d.x, (i / d.x) % d.y, i / (d.x * d.y));
  if (_setjmp(b.main_env) == 0) {
    to_fiber(b, i);
    _longjmp(b.env[i].e, 1);
  }
  back_in_main(b);
}

void run_grid(dim3 grid, dim3 block, size_t smem, const std::function<void()>& body) {
  if (cur != nullptr) throw std::logic_error("host emulation: a launch inside a kernel");
  before_launch();
  smem_buffer.reset(smem ? new char[smem] : nullptr);  // (filled at each block below)
  const int n = static_cast<int>(block.x * block.y * block.z);
  Block b;
  b.body = &body;
  b.ctx.resize(n);
  b.env.resize(n);
  b.stacks.resize(n);
  for (auto& s : b.stacks) s.reset(new char[kStackBytes]);
  grid_dim = grid;
  block_dim = block;
  const uint64_t seed = schedule_seed();
  b.shuffled = seed != 0;
  b.rng = seed ^ (++launches * 0xD1B54A32D192ED03ull);
  std::vector<uint64_t> blocks(static_cast<size_t>(grid.x) * grid.y * grid.z);
  for (size_t i = 0; i < blocks.size(); ++i) blocks[i] = i;
  if (b.shuffled) shuffle(blocks, b.rng);
  for (const uint64_t linear : blocks) {
    block_idx = dim3(static_cast<unsigned>(linear % grid.x), static_cast<unsigned>(linear / grid.x % grid.y),
                     static_cast<unsigned>(linear / grid.x / grid.y));
    // uninitialised shared memory: not zeros
    if (smem) std::memset(smem_buffer.get(), b.shuffled ? static_cast<int>(next_random(b.rng) & 0xFF) : 0xA5, smem);
    b.copies.assign(n, {});
    b.orphans.clear();
    b.fake.assign(n, nullptr);
    b.committed.assign(n, 0);
    b.done.assign(n, 0);
    b.live = n;
    b.bar_arrived = 0;
    b.warps.assign((n + 31) / 32, Block::Warp());
    for (int i = 0; i < n; ++i) {
      Block::Warp& w = b.warps[i / 32];
      ++w.live;
      w.live_mask |= 1u << (i & 31);
      make_fiber(b, i);
    }
    cur = &b;
    for (int i = 0; i < n; ++i) start(b, i);
    uint64_t seen = ~0ull;
    std::vector<int> warp_order, lanes;
    while (b.live > 0) {
      if (b.progress == seen) {  // a whole round and nobody moved: a barrier not all reach
        cur = nullptr;
        throw std::logic_error("host emulation: deadlock (a barrier or warp collective that not every thread "
                               "reaches)");
      }
      seen = b.progress;
      if (!b.shuffled) {
        for (int i = 0; i < n; ++i) resume(b, i);
        continue;
      }
      // Seeded: the warps in a random order, each run as far as it goes (until its threads all
      // wait for other warps, at __syncthreads, or have returned) before the next one starts, its
      // threads in a random order at each step: warps drift as far apart as the barriers let them.
      warp_order.resize(b.warps.size());
      for (size_t w = 0; w < warp_order.size(); ++w) warp_order[w] = static_cast<int>(w);
      shuffle(warp_order, b.rng);
      for (const int w : warp_order) {
        uint64_t before;
        int passes = 0;  // (a warp spinning on another's flag, with a collective in the loop, moves on)
        do {
          before = b.progress;
          lanes.clear();
          for (int i = 32 * w; i < std::min(n, 32 * w + 32); ++i) lanes.push_back(i);
          shuffle(lanes, b.rng);
          for (const int i : lanes) resume(b, i);
        } while (b.progress != before && ++passes < 100000);
      }
    }
    cur = nullptr;
    for (const Block::Copy& c : b.orphans) land(c);
    if (b.error) std::rethrow_exception(b.error);
  }
}

}  // namespace fastrec_emu

namespace {
// 256-byte aligned, as cudaMalloc's, and exactly `bytes` long: under AddressSanitizer a kernel
// reading or writing past the end of an allocation is reported.
void* allocate(size_t bytes) {
  void* p = nullptr;
  return posix_memalign(&p, 256, bytes == 0 ? 1 : bytes) == 0 ? p : nullptr;
}
}  // namespace

extern "C" {

cudaError_t cudaMalloc(void** p, size_t bytes) {
  *p = allocate(bytes);
  return *p ? cudaSuccess : cudaErrorMemoryAllocation;
}
cudaError_t cudaFree(void* p) {
  std::free(p);
  return cudaSuccess;
}
cudaError_t cudaHostAlloc(void** p, size_t bytes, unsigned int flags) {
  *p = allocate(bytes);
  if (*p == nullptr) return cudaErrorMemoryAllocation;
  fastrec_emu::register_pinned(*p, bytes, (flags & cudaHostAllocMapped) != 0);
  return cudaSuccess;
}
cudaError_t cudaMallocHost(void** p, size_t bytes) { return cudaHostAlloc(p, bytes, cudaHostAllocDefault); }
cudaError_t cudaFreeHost(void* p) {
  fastrec_emu::unregister_pinned(p);
  std::free(p);
  return cudaSuccess;
}
cudaError_t cudaHostGetDevicePointer(void** dev, void* host, unsigned int) {
  *dev = fastrec_emu::device_view(host);
  return *dev ? cudaSuccess : cudaErrorInvalidValue;
}
cudaError_t cudaMemcpy(void* dst, const void* src, size_t bytes, cudaMemcpyKind) {
  fastrec_emu::synchronize();  // (blocking: after everything queued before it)
  if (bytes) std::memmove(dst, src, bytes);
  return cudaSuccess;
}
cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind, cudaStream_t) {
  if (bytes == 0) return cudaSuccess;
  if (kind == cudaMemcpyDeviceToHost) {
    fastrec_emu::copy_to_host_async(dst, src, bytes);
  } else {
    fastrec_emu::before_reading_host(src, bytes);
    std::memmove(dst, src, bytes);
  }
  return cudaSuccess;
}
cudaError_t cudaMemsetAsync(void* p, int value, size_t bytes, cudaStream_t) {
  if (bytes) std::memset(p, value, bytes);
  return cudaSuccess;
}
cudaError_t cudaStreamSynchronize(cudaStream_t) {
  fastrec_emu::synchronize();
  return cudaSuccess;
}
cudaError_t cudaDeviceSynchronize(void) {
  fastrec_emu::synchronize();
  return cudaSuccess;
}
cudaError_t cudaStreamIsCapturing(cudaStream_t, cudaStreamCaptureStatus* status) {
  *status = cudaStreamCaptureStatusNone;
  return cudaSuccess;
}
cudaError_t cudaEventCreateWithFlags(cudaEvent_t* e, unsigned int) {
  static char token;
  *e = reinterpret_cast<cudaEvent_t>(&token);
  return cudaSuccess;
}
cudaError_t cudaEventDestroy(cudaEvent_t) { return cudaSuccess; }
cudaError_t cudaEventRecord(cudaEvent_t, cudaStream_t) { return cudaSuccess; }
cudaError_t cudaEventSynchronize(cudaEvent_t) {
  fastrec_emu::synchronize();
  return cudaSuccess;
}
cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
cudaError_t cudaSetDevice(int device) { return device == 0 ? cudaSuccess : cudaErrorInvalidDevice; }
cudaError_t cudaGetDeviceCount(int* n) {
  *n = 1;
  return cudaSuccess;
}
// An H100's limits, with few multiprocessors (the launchers size their grids by them).
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  if (device != 0) return cudaErrorInvalidDevice;
  switch (attr) {
    case cudaDevAttrMultiProcessorCount: *value = 2; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = 227 * 1024; return cudaSuccess;
    default: return cudaErrorInvalidValue;
  }
}
cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attr, const void*) {
  std::memset(attr, 0, sizeof(*attr));
  return cudaSuccess;
}
cudaError_t cudaFuncSetAttribute(const void*, cudaFuncAttribute, int) { return cudaSuccess; }
cudaError_t cudaGetLastError(void) { return cudaSuccess; }
const char* cudaGetErrorName(cudaError_t e) { return e == cudaSuccess ? "cudaSuccess" : "cudaError (emulated)"; }
const char* cudaGetErrorString(cudaError_t e) { return e == cudaSuccess ? "no error" : "error (host emulation)"; }

}  // extern "C"
