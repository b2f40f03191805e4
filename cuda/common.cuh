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

// x[m, j] after the input threshold: kept where |x| >= t (t[j] per channel if TPC, else t[0]),
// else 0. A plain sparse input passes t = 0. Compared in float32, as MLX compares |x| with t
// after promoting both to the wider type (a scalar t arrives already in x's dtype).
template <int K, int TPC, typename T, typename TT>
__device__ __forceinline__ float chess_xval(const T* x, const TT* t, int m, int j) {
  const float v = static_cast<float>(x[(size_t)m * K + j]);
  return fabsf(v) >= static_cast<float>(t[TPC ? j : 0]) ? v : 0.0f;
}

// Ordered compaction of the active inputs of one split-K chunk into shared memory: idx[0..total)
// holds the rows j in [k_begin, k_begin + KC) with any thresholded x[m, j] != 0, in increasing
// order, and xsh[m * KC + i] the thresholded x[m, idx[i]] as float. The inner loops then read x
// from shared memory only: global x loads there wait on L1, which every gpu-scope fence of a
// finishing block on the same SM invalidates (Nsight, benchmarks/RESULTS.md). *nnz gets the
// number of non-zero (m, j) elements of the chunk (the density the stats report). Each thread
// loads all of its P = KC/256 inputs before the one barrier pair, so a block waits for one x load,
// not P in a row (session 10). wcount and wnnz hold 8 * P ints. All 256 threads of the block must
// call it. Returns the count of active rows.
template <int M, int K, int KC, int TPC, typename T, typename TT>
__device__ __forceinline__ int chess_compact(const T* x, const TT* t, int k_begin, int* idx, float* xsh,
                                             int* wcount, int* wnnz, int* nnz) {
  constexpr int P = (KC + 255) / 256;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  float v[P][M];
  bool act[P];
  unsigned bal[P];
#pragma unroll
  for (int p = 0; p < P; ++p) {
    const int i = 256 * p + (int)threadIdx.x;
    const int j = k_begin + i;
    const bool valid = i < KC && j < K;
#pragma unroll
    for (int m = 0; m < M; ++m) v[p][m] = valid ? chess_xval<K, TPC>(x, t, m, j) : 0.0f;
  }
#pragma unroll
  for (int p = 0; p < P; ++p) {
    int mine = 0;
#pragma unroll
    for (int m = 0; m < M; ++m) mine += v[p][m] != 0.0f;
    act[p] = mine > 0;
    bal[p] = __ballot_sync(0xffffffffu, act[p]);
    const int wsum = __reduce_add_sync(0xffffffffu, mine);
    if (lane == 0) {
      wcount[8 * p + warp] = __popc(bal[p]);
      wnnz[8 * p + warp] = wsum;
    }
  }
  __syncthreads();
  int total = 0, elems = 0;
#pragma unroll
  for (int p = 0; p < P; ++p) {
    int off = total;
    for (int w = 0; w < warp; ++w) off += wcount[8 * p + w];
    if (act[p]) {
      const int slot = off + __popc(bal[p] & ((1u << lane) - 1u));
      idx[slot] = k_begin + 256 * p + (int)threadIdx.x;
#pragma unroll
      for (int m = 0; m < M; ++m) xsh[m * KC + slot] = v[p][m];
    }
#pragma unroll
    for (int w = 0; w < 8; ++w) {
      total += wcount[8 * p + w];
      elems += wnnz[8 * p + w];
    }
  }
  __syncthreads();
  *nnz = elems;
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

// Sparse-output row dot products: acc[m] += w_row . x[m, :] over this lane's share of the row
// (the WPR warps of a row step through it together, 16 bytes per lane per step).
template <typename T, int M, int K, int WPR>
__device__ __forceinline__ void chess_row_dot(const T* w_row, const T* x, int part, float* acc) {
  constexpr int V = K / 8;
  const int lane = threadIdx.x & 31;
  const uint4* wrow = reinterpret_cast<const uint4*>(w_row);
#pragma unroll 4
  for (int v = part * 32 + lane; v < V; v += 32 * WPR) {
    float wf[8];
    chess_unpack8<T>(wrow[v], wf);
#pragma unroll
    for (int m = 0; m < M; ++m) {
      float xf[8];
      chess_unpack8<T>(reinterpret_cast<const uint4*>(x + (size_t)m * K)[v], xf);
#pragma unroll
      for (int e = 0; e < 8; ++e) acc[m] += wf[e] * xf[e];
    }
  }
}

// Quantized sparse-output row dot products, RPW rows per warp (spout_q, gateup_q):
// acc[q][m] += w[r0 + q, :] . x[m, :] for the rows with act[q], over this warp's share of the row:
// the PARTS warps of a row group step through it together (warp ``part`` takes steps part, part +
// PARTS, ...). Each lane takes 16-byte steps (32 values at 4 bits, 16 at 8, inside one
// quantization group: one scale and one bias per row); x is loaded once per step and applied to
// all RPW rows, so the x traffic and the latency chain of a step are shared by RPW rows (Nsight
// A/B, benchmarks/RESULTS.md: 1.45x the one-row-per-warp design at 50% sparsity).
template <typename T, int M, int K, int BITS, int GS, int RPW, int PARTS>
__device__ __forceinline__ void chess_qrows_dot(const uint32_t* w, const T* scales, const T* biases, const T* x,
                                                int r0, const bool* act, float (*acc)[M], int part) {
  constexpr int VPW = 32 / BITS;
  constexpr int VPL = 4 * VPW;
  constexpr int WORDS_PER_ROW = K / VPW;
  constexpr int STEPS = WORDS_PER_ROW / 4;
  const int lane = threadIdx.x & 31;
#pragma unroll 2
  for (int v = part * 32 + lane; v < STEPS; v += 32 * PARTS) {
    const int k0 = v * VPL;
    uint32_t words[RPW][4];
    float sc[RPW], bi[RPW];
#pragma unroll
    for (int q = 0; q < RPW; ++q) {
      if (act[q]) {
        chess_load_words<4>(w + (size_t)(r0 + q) * WORDS_PER_ROW + 4 * v, words[q]);
        sc[q] = static_cast<float>(scales[(size_t)(r0 + q) * (K / GS) + k0 / GS]);
        bi[q] = static_cast<float>(biases[(size_t)(r0 + q) * (K / GS) + k0 / GS]);
      }
    }
#pragma unroll
    for (int m = 0; m < M; ++m) {
      float xf[VPL];
      const uint4* xv = reinterpret_cast<const uint4*>(x + (size_t)m * K + k0);
#pragma unroll
      for (int c = 0; c < VPL / 8; ++c) chess_unpack8<T>(xv[c], xf + 8 * c);
      float xs4[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
      for (int i = 0; i < VPL; ++i) xs4[i & 3] += xf[i];
      const float xsum = (xs4[0] + xs4[1]) + (xs4[2] + xs4[3]);
#pragma unroll
      for (int q = 0; q < RPW; ++q) {
        if (act[q]) {
          float qx[4] = {0.0f, 0.0f, 0.0f, 0.0f};  // 4 chains for ILP
#pragma unroll
          for (int i = 0; i < VPL; ++i) qx[i & 3] += chess_qfloat<BITS>(words[q][i / VPW], BITS * (i % VPW)) * xf[i];
          acc[q][m] += sc[q] * ((qx[0] + qx[1]) + (qx[2] + qx[3])) + bi[q] * xsum;
        }
      }
    }
  }
}

// First step of a sparse-output epilogue: each warp's sum of acc[m] into red[warp][m], then a
// barrier. All 256 threads must call it.
template <int M>
__device__ __forceinline__ void chess_warp_sums_to_shared(const float* acc, float (*red)[M]) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int m = 0; m < M; ++m) {
    const float s = chess_warp_sum(acc[m]);
    if (lane == 0) red[warp][m] = s;
  }
  __syncthreads();
}

// Sparse-output epilogue: sum acc[m] over the warp and the WPR warps sharing row r (through
// red[8][M] in shared memory), then y[m, r] = sum * a[m, r]. All 256 threads must call it.
template <typename T, int M, int N, int WPR>
__device__ __forceinline__ void chess_finish_rows(const float* acc, const T* a, T* y, int r, float (*red)[M]) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  chess_warp_sums_to_shared<M>(acc, red);
  if (r < N && warp % WPR == 0 && lane < M) {
    float s = 0.0f;
#pragma unroll
    for (int p = 0; p < WPR; ++p) s += red[warp + p][lane];
    y[lane * N + r] = static_cast<T>(s * static_cast<float>(a[lane * N + r]));
  }
}

// Sparse-input epilogue, one launch for what used to be two (fewer graph nodes per token is what
// decode speed depends on, benchmarks/RESULTS.md): the 8 warps' accumulators of one output tile
// (lane owns VPL consecutive outputs, plus a per-lane scalar) are summed through red[8][TILE] into
// partial[chunk, m, :]; the last of the tile's CHUNKS chunk blocks to arrive (counted in
// sem[tile]) sums the chunks in order 0..C-1 into y. The tile-0 blocks add their non-zero input
// counts into sem[tiles] before they count in, so tile 0's last block holds the whole count and
// writes dens[0] = non-zero inputs / (M*K). sem is a per-call-site int32 workspace of tiles + 1
// zeros; each counter is reset by the block that consumed it, so the next launch finds zeros
// again. Only thread 0 fences, after the block barrier (the pattern of cooperative groups' grid
// sync): a fence per warp cost up to 40% of the kernel's time. The last block's serial tail is two
// round trips to L2 (count, partial loads) plus the y store: the cross-tile counter that used to
// decide who writes dens added two more (session 10). The chunk count is a compile-time constant
// so the in-order sum issues up to 32 partial loads together. All 256 threads must call it.
template <typename T, int M, int N, int K, int KC, int VPL>
__device__ __forceinline__ void chess_spin_finish(const float (*acc)[VPL], const float* accb, float* partial,
                                                  T* y, float* dens, const int* sem_in, int nnz,
                                                  float (*red)[32 * VPL], int* flag) {
  constexpr int TILE = 32 * VPL;
  constexpr int CHUNKS = (K + KC - 1) / KC;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int tile = blockIdx.x, chunk = blockIdx.y;
  const int tiles = gridDim.x;
  int* sem = const_cast<int*>(sem_in);
#pragma unroll
  for (int m = 0; m < M; ++m) {
    float4* dst = reinterpret_cast<float4*>(&red[warp][lane * VPL]);  // 16-byte stores: fewer bank conflicts
#pragma unroll
    for (int q = 0; q < VPL / 4; ++q)
      dst[q] = make_float4(acc[m][4 * q] + accb[m], acc[m][4 * q + 1] + accb[m], acc[m][4 * q + 2] + accb[m],
                           acc[m][4 * q + 3] + accb[m]);
    __syncthreads();
    for (int i = threadIdx.x; i < TILE; i += 256) {
      float s = 0.0f;
#pragma unroll
      for (int w8 = 0; w8 < 8; ++w8) s += red[w8][i];
      const int n = tile * TILE + i;
      if (n < N) partial[((size_t)chunk * M + m) * N + n] = s;
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    if (tile == 0) atomicAdd(&sem[tiles], nnz);
    __threadfence();  // release: the block's partials (ordered before by the barrier) and its count
    const bool last = atomicAdd(&sem[tile], 1) == CHUNKS - 1;
    if (last) __threadfence();  // acquire: the other chunks' partials
    *flag = last;
  }
  __syncthreads();
  if (!*flag) return;
  for (int i = threadIdx.x; i < M * TILE; i += 256) {
    const int m = i / TILE, n = tile * TILE + i % TILE;
    if (n < N) {
      float s = 0.0f;
#pragma unroll 32
      for (int c = 0; c < CHUNKS; ++c) s += __ldcg(&partial[((size_t)c * M + m) * N + n]);
      y[(size_t)m * N + n] = static_cast<T>(s);
    }
  }
  if (threadIdx.x == 0) {
    sem[tile] = 0;  // every chunk has counted in; the next launch reads it after this kernel ends
    if (tile == 0) dens[0] = (float)atomicExch(&sem[tiles], 0) / (float)(M * K);
  }
}

// Row sums of a sparse-output block: acc[m] summed over the warp and the WPR warps sharing the
// row (through red[8][M]), returned to every thread of those warps. All 256 threads must call it.
template <int M, int WPR>
__device__ __forceinline__ void chess_row_sums(const float* acc, float (*red)[M], float* out) {
  const int warp = threadIdx.x >> 5;
  chess_warp_sums_to_shared<M>(acc, red);
  const int w0 = warp - warp % WPR;
#pragma unroll
  for (int m = 0; m < M; ++m) {
    out[m] = 0.0f;
#pragma unroll
    for (int p = 0; p < WPR; ++p) out[m] += red[w0 + p][m];
  }
  __syncthreads();
}

// Round a float32 to T and back: the fused kernels round where the op-by-op graph stores a T.
template <typename T>
__device__ __forceinline__ float chess_round(float v) {
  return static_cast<float>(static_cast<T>(v));
}
