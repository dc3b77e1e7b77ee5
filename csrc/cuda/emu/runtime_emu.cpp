// (glibc's fortified longjmp refuses to jump onto another stack, which is what a fiber switch is)
#undef _FORTIFY_SOURCE

// The host emulation's scheduler (fibers for a block's threads: host_emulation.h) and the CUDA
// runtime calls fastrec's launchers make: "device" memory is host memory, a stream runs its
// work at once (so every wait returns at once), and there is one device, 0.
#include "host_emulation.h"

#include <setjmp.h>
#include <ucontext.h>

#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

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
};

thread_local Block* cur = nullptr;
thread_local std::vector<char> smem_buffer;

void yield() {
  if (_setjmp(cur->env[cur->current].e) == 0) _longjmp(cur->main_env, 1);
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
  if (_setjmp(b->env[b->current].e) == 0) _longjmp(b->main_env, 1);  // started: run when next scheduled
  try {
    (*b->body)();
  } catch (...) {
    if (!b->error) b->error = std::current_exception();
  }
  // this thread leaves its block's and its warp's barriers
  b->done[b->current] = 1;
  --b->live;
  Block::Warp& w = b->warps[b->current / 32];
  --w.live;
  w.live_mask &= ~(1u << (b->current & 31));
  ++b->progress;
  release_if_complete_block();
  release_if_complete_warp(w);
  _longjmp(b->main_env, 1);  // never resumed
}

}  // namespace

void* dynamic_smem() { return smem_buffer.data(); }

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

void run_grid(dim3 grid, dim3 block, size_t smem, const std::function<void()>& body) {
  if (cur != nullptr) throw std::logic_error("host emulation: a launch inside a kernel");
  smem_buffer.resize(smem);  // (exactly the size asked for: filled at each block below)
  const int n = static_cast<int>(block.x * block.y * block.z);
  Block b;
  b.body = &body;
  b.ctx.resize(n);
  b.env.resize(n);
  b.stacks.resize(n);
  for (auto& s : b.stacks) s.reset(new char[kStackBytes]);
  grid_dim = grid;
  block_dim = block;
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        block_idx = dim3(bx, by, bz);
        if (smem) std::memset(smem_buffer.data(), 0xA5, smem);  // uninitialised shared memory: not zeros
        b.done.assign(n, 0);
        b.live = n;
        b.bar_arrived = 0;
        b.warps.assign((n + 31) / 32, Block::Warp());
        for (int i = 0; i < n; ++i) {
          Block::Warp& w = b.warps[i / 32];
          ++w.live;
          w.live_mask |= 1u << (i & 31);
          getcontext(&b.ctx[i]);
          b.ctx[i].uc_stack.ss_sp = b.stacks[i].get();
          b.ctx[i].uc_stack.ss_size = kStackBytes;
          b.ctx[i].uc_link = nullptr;
          makecontext(&b.ctx[i], trampoline, 0);
        }
        cur = &b;
        for (int i = 0; i < n; ++i) {  // start each fiber: it stops at once, before the kernel
          b.current = i;
          if (_setjmp(b.main_env) == 0) swapcontext(&b.main, &b.ctx[i]);
        }
        uint64_t seen = ~0ull;
        while (b.live > 0) {
          if (b.progress == seen) {  // a whole round and nobody moved: a barrier not all reach
            cur = nullptr;
            throw std::logic_error("host emulation: deadlock (a barrier or warp collective that not every thread "
                                   "reaches)");
          }
          seen = b.progress;
          for (int i = 0; i < n; ++i) {
            if (b.done[i]) continue;
            b.current = i;
            thread_idx = dim3(i % block.x, (i / block.x) % block.y, i / (block.x * block.y));
            if (_setjmp(b.main_env) == 0) _longjmp(b.env[i].e, 1);
          }
        }
        cur = nullptr;
        if (b.error) std::rethrow_exception(b.error);
      }
}

}  // namespace fastrec_emu

namespace {
void* allocate(size_t bytes) { return std::aligned_alloc(256, (bytes + 255) / 256 * 256 + 256); }
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
cudaError_t cudaHostAlloc(void** p, size_t bytes, unsigned int) {
  *p = allocate(bytes);
  return *p ? cudaSuccess : cudaErrorMemoryAllocation;
}
cudaError_t cudaFreeHost(void* p) {
  std::free(p);
  return cudaSuccess;
}
cudaError_t cudaHostGetDevicePointer(void** dev, void* host, unsigned int) {
  *dev = host;
  return cudaSuccess;
}
cudaError_t cudaMemcpy(void* dst, const void* src, size_t bytes, cudaMemcpyKind) {
  if (bytes) std::memmove(dst, src, bytes);
  return cudaSuccess;
}
cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind, cudaStream_t) {
  if (bytes) std::memmove(dst, src, bytes);
  return cudaSuccess;
}
cudaError_t cudaMemsetAsync(void* p, int value, size_t bytes, cudaStream_t) {
  if (bytes) std::memset(p, value, bytes);
  return cudaSuccess;
}
cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
cudaError_t cudaDeviceSynchronize(void) { return cudaSuccess; }
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
cudaError_t cudaEventSynchronize(cudaEvent_t) { return cudaSuccess; }
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
