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

// q (a BITS-bit field of a packed word) as float without the quarter-rate I2F instruction:
// (q | 0x4B000000) is the float 2^23 + q exactly, so one full-rate FADD recovers q.
template <int BITS>
__device__ __forceinline__ float chess_qfloat(uint32_t word, int shift) {
  constexpr uint32_t MASK = (1u << BITS) - 1u;
  return __uint_as_float(((word >> shift) & MASK) | 0x4B000000u) - 8388608.0f;
}

// Ordered compaction of the active inputs of one split-K chunk into shared memory: idx[0..total)
// holds the rows j in [k_begin, k_begin + KC) with any x[m, j] != 0, in increasing order.
// All 256 threads of the block must call it. Returns the count.
template <typename T, int M, int K, int KC>
__device__ __forceinline__ int chess_compact(const T* x, int k_begin, int* idx, int* wcount) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int total = 0;
  for (int p = 0; p < KC; p += 256) {
    const int t = p + (int)threadIdx.x;
    const int j = k_begin + t;
    bool act = false;
    if (t < KC && j < K) {
#pragma unroll
      for (int m = 0; m < M; ++m) act |= (static_cast<float>(x[(size_t)m * K + j]) != 0.0f);
    }
    const unsigned bal = __ballot_sync(0xffffffffu, act);
    if (lane == 0) wcount[warp] = __popc(bal);
    __syncthreads();
    int off = total;
    for (int w = 0; w < warp; ++w) off += wcount[w];
    if (act) idx[off + __popc(bal & ((1u << lane) - 1u))] = j;
    for (int w = 0; w < 8; ++w) total += wcount[w];
    __syncthreads();
  }
  return total;
}

// Sparse-output rows: is row r (< N) active for any token, i.e. some a[m, r] != 0?
template <typename T, int M, int N>
__device__ __forceinline__ bool chess_row_active(const T* a, int r) {
  bool active = false;
#pragma unroll
  for (int m = 0; m < M; ++m) active |= (r < N) && (static_cast<float>(a[m * N + r]) != 0.0f);
  return active;
}

// Sparse-output epilogue: sum acc[m] over the warp and the WPR warps sharing row r (through
// red[8][M] in shared memory), then y[m, r] = sum * a[m, r]. All 256 threads must call it.
template <typename T, int M, int N, int WPR>
__device__ __forceinline__ void chess_finish_rows(const float* acc, const T* a, T* y, int r, float (*red)[M]) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int m = 0; m < M; ++m) {
    const float s = chess_warp_sum(acc[m]);
    if (lane == 0) red[warp][m] = s;
  }
  __syncthreads();
  if (r < N && warp % WPR == 0 && lane < M) {
    float s = 0.0f;
#pragma unroll
    for (int p = 0; p < WPR; ++p) s += red[warp + p][lane];
    y[lane * N + r] = static_cast<T>(s * static_cast<float>(a[lane * N + r]));
  }
}

// Sparse-input epilogue: sum the 8 warps' accumulators of one output tile (lane owns VPL
// consecutive outputs, plus a per-lane scalar) through red[8][TILE] and write partial[chunk, m, :].
template <int M, int N, int VPL>
__device__ __forceinline__ void chess_store_partial(const float (*acc)[VPL], const float* accb, float* partial,
                                                    int tile, int chunk, float (*red)[32 * VPL]) {
  constexpr int TILE = 32 * VPL;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int m = 0; m < M; ++m) {
#pragma unroll
    for (int e = 0; e < VPL; ++e) red[warp][lane * VPL + e] = acc[m][e] + accb[m];
    __syncthreads();
    for (int t = threadIdx.x; t < TILE; t += 256) {
      float s = 0.0f;
#pragma unroll
      for (int w8 = 0; w8 < 8; ++w8) s += red[w8][t];
      const int n = tile * TILE + t;
      if (n < N) partial[((size_t)chunk * M + m) * N + n] = s;
    }
    __syncthreads();
  }
}
