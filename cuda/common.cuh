// Shared helpers of the chess-mlx sparse GEMV kernels (CUDA). The Metal twin is metal/common.metal.
// Every kernel computes in float32 and reads weights with 16-byte loads where the layout allows.

template <typename T>
__device__ __forceinline__ void chess_unpack8(const uint4& v, float* f);

template <>
__device__ __forceinline__ void chess_unpack8<__half>(const uint4& v, float* f) {
  const __half2* h = reinterpret_cast<const __half2*>(&v);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    float2 t = __half22float2(h[i]);
    f[2 * i] = t.x;
    f[2 * i + 1] = t.y;
  }
}

template <>
__device__ __forceinline__ void chess_unpack8<__nv_bfloat16>(const uint4& v, float* f) {
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&v);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    float2 t = __bfloat1622float2(h[i]);
    f[2 * i] = t.x;
    f[2 * i + 1] = t.y;
  }
}

__device__ __forceinline__ float chess_warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Load W consecutive 32-bit words (W = 4, 2 or 1) with one vector load.
template <int W>
__device__ __forceinline__ void chess_load_words(const uint32_t* p, uint32_t* out);
template <>
__device__ __forceinline__ void chess_load_words<4>(const uint32_t* p, uint32_t* out) {
  uint4 v = *reinterpret_cast<const uint4*>(p);
  out[0] = v.x; out[1] = v.y; out[2] = v.z; out[3] = v.w;
}
template <>
__device__ __forceinline__ void chess_load_words<2>(const uint32_t* p, uint32_t* out) {
  uint2 v = *reinterpret_cast<const uint2*>(p);
  out[0] = v.x; out[1] = v.y;
}
template <>
__device__ __forceinline__ void chess_load_words<1>(const uint32_t* p, uint32_t* out) {
  out[0] = *p;
}
