// A CPU emulation of the part of the Metal Shading Language the chess-mlx kernels use, so the CPU
// suite can run the Metal twins (tests/test_kernels_emulated.py) where no Apple GPU exists. The
// execution model (threadgroups as real threads, barriers, simdgroup collectives) is emu_core.h's;
// here are Metal's names. `threadgroup T name[...];` storage is rewritten to `static` by the test;
// `threadgroup` elsewhere (pointers, parameters) is erased, as are `device`, `thread` and
// `constant`. Atomics and device fences are sequentially consistent. half is _Float16 (GCC may keep
// an expression's intermediate results in float, so half arithmetic can be a little more precise
// here than on a GPU); bfloat16_t converts with round-to-nearest-even.
#pragma once
#include "emu_core.h"

#define device
#define thread
#define constant const
#define kernel
#define threadgroup

typedef unsigned int uint;
typedef unsigned short ushort;
typedef unsigned char uchar;
typedef _Float16 half;

inline half operator""h(long double v) { return (half)(float)v; }

typedef chess_emu::Bf16 bfloat16_t;

template <class T, int N>
struct vec;
template <class T>
struct vec<T, 2> {
  T x, y;
  vec() = default;
  explicit vec(T v) : x(v), y(v) {}
  vec(T a, T b) : x(a), y(b) {}
  template <class U>
  explicit vec(vec<U, 2> o) : x(T(o.x)), y(T(o.y)) {}
  T& operator[](int i) { return i == 0 ? x : y; }
  T operator[](int i) const { return i == 0 ? x : y; }
};
template <class T>
struct vec<T, 3> {
  T x, y, z;
  vec() = default;
  explicit vec(T v) : x(v), y(v), z(v) {}
  vec(T a, T b, T c) : x(a), y(b), z(c) {}
  T& operator[](int i) { return i == 0 ? x : i == 1 ? y : z; }
  T operator[](int i) const { return i == 0 ? x : i == 1 ? y : z; }
};
template <class T>
struct vec<T, 4> {
  T x, y, z, w;
  vec() = default;
  explicit vec(T v) : x(v), y(v), z(v), w(v) {}
  vec(T a, T b, T c, T d) : x(a), y(b), z(c), w(d) {}
  template <class U>
  explicit vec(vec<U, 4> o) : x(T(o.x)), y(T(o.y)), z(T(o.z)), w(T(o.w)) {}
  T& operator[](int i) { return i == 0 ? x : i == 1 ? y : i == 2 ? z : w; }
  T operator[](int i) const { return i == 0 ? x : i == 1 ? y : i == 2 ? z : w; }
};

#define CHESS_EMU_VOP(OP)                                                          \
  template <class T, int N>                                                        \
  vec<T, N> operator OP(vec<T, N> a, vec<T, N> b) {                                \
    vec<T, N> r;                                                                   \
    for (int i = 0; i < N; ++i) r[i] = T(a[i] OP b[i]);                            \
    return r;                                                                      \
  }                                                                                \
  template <class T, int N>                                                        \
  vec<T, N> operator OP(vec<T, N> a, T b) {                                        \
    vec<T, N> r;                                                                   \
    for (int i = 0; i < N; ++i) r[i] = T(a[i] OP b);                               \
    return r;                                                                      \
  }                                                                                \
  template <class T, int N>                                                        \
  vec<T, N> operator OP(T a, vec<T, N> b) {                                        \
    vec<T, N> r;                                                                   \
    for (int i = 0; i < N; ++i) r[i] = T(a OP b[i]);                               \
    return r;                                                                      \
  }
CHESS_EMU_VOP(+)
CHESS_EMU_VOP(-)
CHESS_EMU_VOP(*)
#undef CHESS_EMU_VOP
template <class T, int N>
vec<T, N>& operator+=(vec<T, N>& a, vec<T, N> b) {
  a = a + b;
  return a;
}

typedef vec<half, 2> half2;
typedef vec<half, 4> half4;
typedef vec<float, 2> float2;
typedef vec<float, 4> float4;
typedef vec<uint, 2> uint2;
typedef vec<uint, 3> uint3;
typedef vec<uint, 4> uint4;
typedef vec<int, 2> int2;
typedef vec<int, 4> int4;

template <class T, class U>
T as_type(U u) {
  static_assert(sizeof(T) == sizeof(U), "as_type needs equal sizes");
  T t;
  std::memcpy(&t, &u, sizeof(T));
  return t;
}

using std::isfinite;
using std::isinf;
using std::isnan;
inline half fma(half a, half b, half c) { return (half)std::fma((float)a, (float)b, (float)c); }
template <class T, int N>
vec<T, N> fma(vec<T, N> a, vec<T, N> b, vec<T, N> c) {
  vec<T, N> r;
  for (int i = 0; i < N; ++i) r[i] = T(std::fma((float)a[i], (float)b[i], (float)c[i]));
  return r;
}
inline float rsqrt(float v) { return 1.0f / std::sqrt(v); }
template <class T> T min(T a, T b) { return b < a ? b : a; }
template <class T> T max(T a, T b) { return a < b ? b : a; }
template <class T> T clamp(T v, T lo, T hi) { return min(max(v, lo), hi); }

namespace precise {
inline float cos(float v) { return std::cos(v); }
inline float sin(float v) { return std::sin(v); }
inline float exp(float v) { return std::exp(v); }
inline float rsqrt(float v) { return 1.0f / std::sqrt(v); }
}  // namespace precise
namespace fast = precise;

enum class mem_flags : unsigned { mem_none = 0, mem_device = 1, mem_threadgroup = 2, mem_texture = 4 };
inline mem_flags operator|(mem_flags a, mem_flags b) { return mem_flags((unsigned)a | (unsigned)b); }
enum memory_order { memory_order_relaxed, memory_order_seq_cst };
enum thread_scope { thread_scope_thread, thread_scope_simdgroup, thread_scope_threadgroup, thread_scope_device };
struct atomic_int {
  int v;
};
inline int atomic_fetch_add_explicit(atomic_int* p, int x, memory_order) { return __atomic_fetch_add(&p->v, x, __ATOMIC_SEQ_CST); }
inline int atomic_exchange_explicit(atomic_int* p, int x, memory_order) { return __atomic_exchange_n(&p->v, x, __ATOMIC_SEQ_CST); }
inline int atomic_load_explicit(atomic_int* p, memory_order) { return __atomic_load_n(&p->v, __ATOMIC_SEQ_CST); }
inline void atomic_store_explicit(atomic_int* p, int x, memory_order) { __atomic_store_n(&p->v, x, __ATOMIC_SEQ_CST); }
struct atomic_uint {
  uint v;
};
inline uint atomic_fetch_add_explicit(atomic_uint* p, uint x, memory_order) { return __atomic_fetch_add(&p->v, x, __ATOMIC_SEQ_CST); }
inline void atomic_thread_fence(mem_flags, memory_order, thread_scope) { std::atomic_thread_fence(std::memory_order_seq_cst); }

// The Metal entry point of a recorded launch: the thread-position arguments from the emulator's.
template <class F>
void metal_launch(uint3 grid, uint3 tg, F kern) {
  chess_emu::launch({grid.x, grid.y, grid.z}, {tg.x, tg.y, tg.z},
                    [&](chess_emu::Dim gp, int l, int w, chess_emu::Dim tp, chess_emu::Dim gs) {
                      kern(uint3(gp.x, gp.y, gp.z), (uint)l, (uint)w, uint3(tp.x, tp.y, tp.z), uint3(gs.x, gs.y, gs.z));
                    });
}

inline void threadgroup_barrier(mem_flags) { chess_emu::group_barrier(); }

template <class T>
T simd_sum(T v) {
  return chess_emu::warp_collective(v, [](const T* vals, const bool* live, int) {
    T r = T(0);
    for (int i = 0; i < 32; ++i)
      if (live[i]) r = T(r + vals[i]);
    return r;
  });
}

template <class T>
T simd_prefix_exclusive_sum(T v) {
  return chess_emu::warp_collective(v, [](const T* vals, const bool* live, int me) {
    T r = T(0);
    for (int i = 0; i < me; ++i)
      if (live[i]) r = T(r + vals[i]);
    return r;
  });
}
