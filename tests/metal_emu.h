// A CPU emulation of the part of the Metal Shading Language the chess-mlx kernels use, so the CPU
// suite can *run* the Metal twins (tests/test_metal_emulated.py) where no Apple GPU exists.
//
// Model: a launch runs its threadgroups one after another; a threadgroup's threads are real
// std::threads. threadgroup_barrier is a std::barrier over the threadgroup; simd_sum and
// simd_prefix_exclusive_sum exchange values through a per-simdgroup slot table between two
// barriers of that simdgroup (so, as on the GPU, every live lane of the simdgroup must call them).
// A thread that returns drops out of both barriers and stops counting in simd reductions.
// Threadgroup storage: the test rewrites each `threadgroup T name[...];` declaration to `static`
// (one threadgroup at a time, so one copy is the group's); `threadgroup` elsewhere (pointers,
// parameters) is erased, as are `device`, `thread` and `constant`. Atomics and device fences are
// sequentially consistent. half is _Float16 (GCC may keep an expression's intermediate results in
// float, so half arithmetic can be a little more precise here than on a GPU); bfloat16_t converts
// with round-to-nearest-even.
//
// What this does not check: address spaces, Metal's memory model beyond the above, the real
// scheduling of threadgroups (they never run side by side here), resource limits.
#pragma once
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

namespace chess_emu {
using Thread = std::thread;  // `thread` is a Metal qualifier below, erased by a macro
}

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

struct bfloat16_t {
  uint16_t bits;
  bfloat16_t() = default;
  bfloat16_t(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7f800000u) == 0x7f800000u && (u & 0x007fffffu)) {
      bits = (uint16_t)((u >> 16) | 0x40u);  // NaN stays NaN
    } else {
      u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
      bits = (uint16_t)(u >> 16);
    }
  }
  operator float() const {
    const uint32_t u = (uint32_t)bits << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
};

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
inline void atomic_thread_fence(mem_flags, memory_order, thread_scope) { std::atomic_thread_fence(std::memory_order_seq_cst); }

namespace chess_emu {
struct Simd {
  explicit Simd(int n) : bar(n) {}
  std::barrier<> bar;
  alignas(8) unsigned char slot[32][8];
  std::atomic<bool> live[32];
};
struct Group {
  explicit Group(int n) : bar(n) {
    for (int s = 0; s < (n + 31) / 32; ++s) {
      simd.emplace_back(new Simd(std::min(32, n - 32 * s)));
      for (int l = 0; l < 32; ++l) simd.back()->live[l] = 32 * s + l < n;
    }
  }
  std::barrier<> bar;
  std::vector<std::unique_ptr<Simd>> simd;
};
inline thread_local Group* group = nullptr;
inline thread_local int lane = 0, warp = 0;

// Runs kern(groupPos, lane, warp, threadPos, groups) for every thread of a (grid, tg) launch in
// threads (MLX's metal_kernel: grid counts threads; edge threadgroups are cut to the grid).
template <class F>
void launch(uint3 grid, uint3 tg, F kern) {
  const uint3 groups((grid.x + tg.x - 1) / tg.x, (grid.y + tg.y - 1) / tg.y, (grid.z + tg.z - 1) / tg.z);
  if (tg.y != 1 || tg.z != 1) throw "chess_emu: one-dimensional threadgroups only";
  for (uint gz = 0; gz < groups.z; ++gz)
    for (uint gy = 0; gy < groups.y; ++gy)
      for (uint gx = 0; gx < groups.x; ++gx) {
        const int n = (int)std::min(tg.x, grid.x - gx * tg.x);
        Group g(n);
        std::vector<Thread> ts;
        ts.reserve(n);
        for (int t = 0; t < n; ++t)
          ts.emplace_back([&, t] {
            group = &g;
            lane = t % 32;
            warp = t / 32;
            kern(uint3(gx, gy, gz), (uint)lane, (uint)warp, uint3((uint)t, 0u, 0u), groups);
            Simd& s = *g.simd[warp];
            s.live[lane] = false;  // a returned lane no longer counts in its simdgroup
            s.bar.arrive_and_drop();
            g.bar.arrive_and_drop();
          });
        for (auto& th : ts) th.join();
      }
}
}  // namespace chess_emu

inline void threadgroup_barrier(mem_flags) { chess_emu::group->bar.arrive_and_wait(); }

template <class T>
T simd_sum(T v) {
  chess_emu::Simd& s = *chess_emu::group->simd[chess_emu::warp];
  std::memcpy(s.slot[chess_emu::lane], &v, sizeof(T));
  s.bar.arrive_and_wait();
  T r = T(0);
  for (int i = 0; i < 32; ++i)
    if (s.live[i]) {
      T u;
      std::memcpy(&u, s.slot[i], sizeof(T));
      r = T(r + u);
    }
  s.bar.arrive_and_wait();
  return r;
}

template <class T>
T simd_prefix_exclusive_sum(T v) {
  chess_emu::Simd& s = *chess_emu::group->simd[chess_emu::warp];
  std::memcpy(s.slot[chess_emu::lane], &v, sizeof(T));
  s.bar.arrive_and_wait();
  T r = T(0);
  for (int i = 0; i < chess_emu::lane; ++i)
    if (s.live[i]) {
      T u;
      std::memcpy(&u, s.slot[i], sizeof(T));
      r = T(r + u);
    }
  s.bar.arrive_and_wait();
  return r;
}
