// A CPU emulation of the part of CUDA the chess-mlx kernels use, so the CPU suite can run the CUDA
// kernels' launched texts (tests/test_cuda_emulated.py) before, and between, sessions on a GPU.
// The execution model (blocks as groups of real threads, barriers, warp collectives) is
// emu_core.h's; here are CUDA's names. `__shared__ T name[...];` storage is rewritten to `static` by
// the test. Atomics and fences are sequentially consistent. __half is _Float16 (GCC may keep an
// expression's intermediate results in float, so half arithmetic can be a little more precise here
// than on a GPU); __nv_bfloat16 converts with round-to-nearest-even. The H100 stays the authority:
// this finds wrong indexing, missing writes and broken counters, not memory-model or speed issues.
#pragma once
#include "emu_core.h"

#define __device__
#define __host__
#define __global__
#define __forceinline__ inline
#define __restrict__
#define __align__(n) __attribute__((aligned(n)))

typedef _Float16 __half;

typedef chess_emu::Bf16 __nv_bfloat16;

struct __half2 {
  __half x, y;
};
struct __nv_bfloat162 {
  __nv_bfloat16 x, y;
};
struct float2 {
  float x, y;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(8) uint2 {
  unsigned x, y;
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
inline float4 make_float4(float a, float b, float c, float d) { return float4{a, b, c, d}; }

inline thread_local chess_emu::Dim threadIdx, blockIdx, gridDim, blockDim;

inline void __syncthreads() { chess_emu::group_barrier(); }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline int atomicAdd(int* p, int v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
inline int atomicExch(int* p, int v) { return __atomic_exchange_n(p, v, __ATOMIC_SEQ_CST); }
inline unsigned atomicAdd(unsigned* p, unsigned v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
  return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST);
}
inline float atomicAdd(float* p, float v) {  // a compare-and-swap loop (no float fetch-add builtin)
  float old, want;
  __atomic_load(p, &old, __ATOMIC_SEQ_CST);
  do {
    want = old + v;
  } while (!__atomic_compare_exchange(p, &old, &want, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST));
  return old;
}
template <class T>
T __ldcg(const T* p) {
  return *p;
}

template <class T>
T __shfl_xor_sync(unsigned, T v, int mask) {
  return chess_emu::warp_collective(v, [mask](const T* vals, const bool*, int me) { return vals[me ^ mask]; });
}
template <class T>
T __shfl_sync(unsigned, T v, int src) {
  return chess_emu::warp_collective(v, [src](const T* vals, const bool*, int) { return vals[src & 31]; });
}
inline int __ffs(unsigned v) { return __builtin_ffs((int)v); }
inline unsigned __ballot_sync(unsigned, bool pred) {
  return chess_emu::warp_collective(pred, [](const bool* vals, const bool* live, int) {
    unsigned r = 0;
    for (int i = 0; i < 32; ++i)
      if (live[i] && vals[i]) r |= 1u << i;
    return r;
  });
}
inline int __reduce_add_sync(unsigned, int v) {
  return chess_emu::warp_collective(v, [](const int* vals, const bool* live, int) {
    int r = 0;
    for (int i = 0; i < 32; ++i)
      if (live[i]) r += vals[i];
    return r;
  });
}
inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline unsigned __byte_perm(unsigned x, unsigned y, unsigned s) {
  const uint64_t both = (uint64_t)y << 32 | x;
  unsigned r = 0;
  for (int i = 0; i < 4; ++i) r |= (unsigned)((both >> (8 * ((s >> (4 * i)) & 7))) & 0xffu) << (8 * i);
  return r;
}
inline float __int_as_float(int v) {
  float f;
  std::memcpy(&f, &v, 4);
  return f;
}
inline float __uint_as_float(unsigned v) {
  float f;
  std::memcpy(&f, &v, 4);
  return f;
}
inline int __float_as_int(float f) {
  int v;
  std::memcpy(&v, &f, 4);
  return v;
}
inline float rsqrtf(float v) { return 1.0f / std::sqrt(v); }
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a < b ? b : a; }

inline float2 __half22float2(__half2 h) { return float2{(float)h.x, (float)h.y}; }
inline float2 __bfloat1622float2(__nv_bfloat162 h) { return float2{(float)h.x, (float)h.y}; }
inline __half2 __float2half2_rn(float v) { return __half2{(__half)v, (__half)v}; }
inline __half2 __hfma2(__half2 a, __half2 b, __half2 c) {
  return __half2{(__half)std::fma((float)a.x, (float)b.x, (float)c.x), (__half)std::fma((float)a.y, (float)b.y, (float)c.y)};
}
inline __half2 __hmul2(__half2 a, __half2 b) { return __half2{(__half)((float)a.x * (float)b.x), (__half)((float)a.y * (float)b.y)}; }
inline __half2 __hsub2(__half2 a, __half2 b) { return __half2{(__half)((float)a.x - (float)b.x), (__half)((float)a.y - (float)b.y)}; }
inline __half2 __habs2(__half2 a) { return __half2{(__half)std::fabs((float)a.x), (__half)std::fabs((float)a.y)}; }
inline __half2 __hmax2(__half2 a, __half2 b) {  // a NaN operand gives the other, as CUDA's __hmax2
  auto m = [](__half p, __half q) { return std::isnan((float)p) ? q : std::isnan((float)q) ? p : ((float)p < (float)q ? q : p); };
  return __half2{m(a.x, b.x), m(a.y, b.y)};
}

// The CUDA entry point of a recorded launch: the built-in variables from the emulator's positions.
template <class F>
void cuda_launch(chess_emu::Dim grid, chess_emu::Dim tg, F kern) {
  chess_emu::launch(grid, tg, [&](chess_emu::Dim gp, int, int, chess_emu::Dim tp, chess_emu::Dim gs) {
    blockIdx = gp;
    threadIdx = tp;
    gridDim = gs;
    blockDim = tg;
    kern();
  });
}
