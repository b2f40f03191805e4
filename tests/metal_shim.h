// Just enough of the Metal Shading Language, as declarations, for g++ -fsyntax-only to parse and
// type-check the chess-mlx Metal kernels as MLX assembles them (tests/test_kernels_cpu.py). No
// Apple toolchain reaches this project, so this is how the CPU suite finds a typo, an undeclared
// name or a type mismatch in a Metal twin. Nothing here runs: functions are declared, not defined,
// and address-space qualifiers are erased (what Metal checks about them, this cannot).
#pragma once
#include <cmath>
#include <cstdint>

#define device
#define threadgroup
#define thread
#define constant const
#define kernel

typedef unsigned int uint;
typedef unsigned short ushort;
typedef unsigned char uchar;

struct half {
  half() = default;
  half(float);
  operator float() const;
};
half operator""h(long double);  // 0.0h: a half literal (reserved suffix: the shim silences -Wliteral-suffix)
half operator-(half);

struct bfloat16_t {
  bfloat16_t() = default;
  bfloat16_t(float);
  operator float() const;
};

template <class T, int N>
struct vec;
template <class T>
struct vec<T, 2> {
  T x, y;
  vec() = default;
  explicit vec(T v);
  vec(T a, T b);
  template <class U>
  explicit vec(vec<U, 2> o);
};
template <class T>
struct vec<T, 3> {
  T x, y, z;
  vec() = default;
  explicit vec(T v);
  vec(T a, T b, T c);
};
template <class T>
struct vec<T, 4> {
  T x, y, z, w;
  vec() = default;
  explicit vec(T v);
  vec(T a, T b, T c, T d);
  template <class U>
  explicit vec(vec<U, 4> o);
};
template <class T, int N> vec<T, N> operator+(vec<T, N>, vec<T, N>);
template <class T, int N> vec<T, N> operator-(vec<T, N>, vec<T, N>);
template <class T, int N> vec<T, N> operator*(vec<T, N>, vec<T, N>);
template <class T, int N> vec<T, N> operator+(vec<T, N>, T);
template <class T, int N> vec<T, N> operator*(vec<T, N>, T);
template <class T, int N> vec<T, N> operator*(T, vec<T, N>);
template <class T, int N> vec<T, N>& operator+=(vec<T, N>&, vec<T, N>);
template <class T, int N> vec<T, N> fma(vec<T, N>, vec<T, N>, vec<T, N>);

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
T as_type(U);

using std::isfinite;
using std::isinf;
using std::isnan;
half fma(half, half, half);
float rsqrt(float);
template <class T> T min(T, T);
template <class T> T max(T, T);
template <class T> T clamp(T, T, T);
template <class T> T select(T, T, bool);

namespace precise {
float cos(float);
float sin(float);
float exp(float);
float rsqrt(float);
}  // namespace precise
namespace fast {
float cos(float);
float sin(float);
float exp(float);
float rsqrt(float);
}  // namespace fast

template <class T> T simd_sum(T);
template <class T> T simd_max(T);
template <class T> T simd_prefix_exclusive_sum(T);
template <class T> T simd_prefix_inclusive_sum(T);
template <class T> T simd_shuffle(T, ushort);
template <class T> T simd_broadcast(T, ushort);

enum class mem_flags : unsigned { mem_none = 0, mem_device = 1, mem_threadgroup = 2, mem_texture = 4 };
mem_flags operator|(mem_flags, mem_flags);
void threadgroup_barrier(mem_flags);
void simdgroup_barrier(mem_flags);

enum memory_order { memory_order_relaxed, memory_order_seq_cst };
enum thread_scope { thread_scope_thread, thread_scope_simdgroup, thread_scope_threadgroup, thread_scope_device };
struct atomic_int {
  int v;
};
struct atomic_uint {
  uint v;
};
int atomic_fetch_add_explicit(atomic_int*, int, memory_order);
int atomic_exchange_explicit(atomic_int*, int, memory_order);
int atomic_load_explicit(atomic_int*, memory_order);
void atomic_store_explicit(atomic_int*, int, memory_order);
void atomic_thread_fence(mem_flags, memory_order, thread_scope);
