// Kernels with the mistakes the host emulation is meant to catch, beside their correct forms
// (fastrec._C_cuda_emu._selftest; tests/test_cuda_emulation.py): a test that the emulator's
// schedules expose them, so that the emulated kernel tests can be trusted to.
#include "host_emulation.h"

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <vector>

#include "../common.cuh"

namespace {

// Each thread reads the value its neighbour wrote to shared memory, with or without a barrier
// between the write and the read.
__global__ void neighbour(int* out, bool barrier) {
  FASTREC_DYNAMIC_SMEM(int, s);
  const int t = threadIdx.x, n = blockDim.x;
  s[t] = 1000 * blockIdx.x + t;
  if (barrier) __syncthreads();
  out[blockIdx.x * n + t] = s[(t + 1) % n];
}

// Each thread copies 16 bytes into shared memory with cp.async and reads its neighbour's, with
// or without waiting for its copy before the barrier.
__global__ void async_copy(const int* in, int* out, bool wait) {
  FASTREC_DYNAMIC_SMEM(int, s);
  const int t = threadIdx.x, n = blockDim.x;
  fastrec_emu::cp_async16(s + 4 * t, in + 4 * t, 16);
  fastrec_emu::cp_async_commit();
  if (wait) fastrec_emu::cp_async_wait(0);
  __syncthreads();
  for (int j = 0; j < 4; ++j) out[4 * t + j] = s[4 * ((t + 1) % n) + j];
}

// Two cp.async groups per thread: after wait_group 1 the first has landed (everyone's, after the
// barrier), the second not necessarily; reading the second before wait_group 0 is the mistake.
__global__ void two_groups(const int* in, int* out, bool early) {
  FASTREC_DYNAMIC_SMEM(int, s);
  const int t = threadIdx.x, n = blockDim.x;
  fastrec_emu::cp_async16(s + 8 * t, in + 8 * t, 16);
  fastrec_emu::cp_async_commit();
  fastrec_emu::cp_async16(s + 8 * t + 4, in + 8 * t + 4, 16);
  fastrec_emu::cp_async_commit();
  fastrec_emu::cp_async_wait(1);
  __syncthreads();
  const int u = (t + 1) % n;
  for (int j = 0; j < 4; ++j) out[8 * t + j] = s[8 * u + j];
  if (!early) {
    fastrec_emu::cp_async_wait(0);
    __syncthreads();
  }
  for (int j = 4; j < 8; ++j) out[8 * t + j] = s[8 * u + j];
}

// Rounds of: write a shared buffer, barrier, read another warp's slot before and after a warp
// collective, and (or not) a barrier before the next round's write. Without it a warp that runs
// ahead overwrites what a slower warp has yet to read (write after read): threads that keep in
// step, as in index order, never show it.
__global__ void rounds(int* out, bool end_barrier) {
  FASTREC_DYNAMIC_SMEM(int, s);
  const int t = threadIdx.x, n = blockDim.x;
  int sum = 0;
  for (int r = 0; r < 4; ++r) {
    s[t] = 100 * r + t;
    __syncthreads();
    sum += s[(t + 32) % n];
    sum += __shfl_xor_sync(0xffffffffu, s[(t + 32) % n], 1);
    if (end_barrier) __syncthreads();
  }
  out[t] = sum;
}

// Half of each warp waits at a warp barrier, the other half at the block's: neither completes.
__global__ void split_barriers() {
  if (threadIdx.x % 32 < 16) {
    __syncwarp();
  } else {
    __syncthreads();
  }
}

// A full-warp shuffle after half the warp has returned.
__global__ void exited_lanes(int* out) {
  const int t = threadIdx.x;
  if (t >= 16) return;
  out[t] = __shfl_sync(0xffffffffu, t, (t + 1) % 32);
}

// A device-to-host cudaMemcpyAsync into pinned or pageable memory: the destination's values
// before the stream synchronize, then after.
std::vector<int> copy_back(int count, bool pinned) {
  std::vector<int> values(static_cast<size_t>(count));
  for (int i = 0; i < count; ++i) values[static_cast<size_t>(i)] = 7 * i + 1;
  const size_t bytes = values.size() * sizeof(int);
  int* dev = nullptr;
  FASTREC_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&dev), bytes));
  FASTREC_CUDA_CHECK(cudaMemcpy(dev, values.data(), bytes, cudaMemcpyHostToDevice));
  std::vector<int> pageable(values.size(), 0);
  int* host = pageable.data();
  if (pinned) FASTREC_CUDA_CHECK(cudaMallocHost(reinterpret_cast<void**>(&host), bytes));
  FASTREC_CUDA_CHECK(cudaMemcpyAsync(host, dev, bytes, cudaMemcpyDeviceToHost, nullptr));
  std::vector<int> seen(host, host + count);
  FASTREC_CUDA_CHECK(cudaStreamSynchronize(nullptr));
  seen.insert(seen.end(), host, host + count);
  if (pinned) cudaFreeHost(host);
  cudaFree(dev);
  return seen;
}

std::vector<int> run(const std::string& which, int blocks, int threads) {
  if (threads < 1 || threads > 1024 || blocks < 1) throw std::invalid_argument("bad launch shape");
  if (which == "copy_to_pinned" || which == "copy_to_pageable") return copy_back(threads, which == "copy_to_pinned");
  const size_t n = static_cast<size_t>(blocks) * threads;
  std::vector<int> out(8 * n, -1), in(8 * n);
  for (size_t i = 0; i < in.size(); ++i) in[i] = static_cast<int>(i);
  const size_t smem = 32 * static_cast<size_t>(threads);
  if (which == "neighbour" || which == "neighbour_no_barrier") {
    FASTREC_LAUNCH(neighbour, blocks, threads, smem, 0)(out.data(), which == "neighbour");
    out.resize(n);
  } else if (which == "async_copy" || which == "async_copy_no_wait") {
    FASTREC_LAUNCH(async_copy, 1, threads, smem, 0)(in.data(), out.data(), which == "async_copy");
    out.resize(4 * static_cast<size_t>(threads));
  } else if (which == "two_groups" || which == "two_groups_early_read") {
    FASTREC_LAUNCH(two_groups, 1, threads, smem, 0)(in.data(), out.data(), which == "two_groups_early_read");
    out.resize(8 * static_cast<size_t>(threads));
  } else if (which == "rounds" || which == "rounds_no_end_barrier") {
    FASTREC_LAUNCH(rounds, 1, threads, smem, 0)(out.data(), which == "rounds");
    out.resize(threads);
  } else if (which == "split_barriers") {
    FASTREC_LAUNCH(split_barriers, 1, threads, 0, 0)();
  } else if (which == "exited_lanes") {
    FASTREC_LAUNCH(exited_lanes, 1, threads, 0, 0)(out.data());
  } else {
    throw std::invalid_argument("unknown self-test: " + which);
  }
  return out;
}

}  // namespace

void bind_emulation_selftest(pybind11::module_& m) {
  m.def("_selftest", &run, pybind11::arg("which"), pybind11::arg("blocks"), pybind11::arg("threads"),
        "Runs one of the emulator's self-test kernels (tests/test_cuda_emulation.py); returns its output.");
}
