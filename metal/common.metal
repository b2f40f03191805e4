// Shared helpers of the chess-mlx sparse GEMV kernels (Metal). Twin of cuda/common.cuh: same
// functions, same semantics; simdgroups of 32 threads play the role of CUDA warps.

template <typename T>
struct ChessUnpack;

template <>
struct ChessUnpack<half> {
  static inline void run(uint4 v, thread float* f) {
    const uint w[4] = {v.x, v.y, v.z, v.w};
    for (int i = 0; i < 4; ++i) {
      const half2 h = as_type<half2>(w[i]);
      f[2 * i] = float(h.x);
      f[2 * i + 1] = float(h.y);
    }
  }
};

template <>
struct ChessUnpack<bfloat16_t> {
  static inline void run(uint4 v, thread float* f) {
    const uint w[4] = {v.x, v.y, v.z, v.w};
    for (int i = 0; i < 4; ++i) {
      f[2 * i] = as_type<float>(w[i] << 16);
      f[2 * i + 1] = as_type<float>(w[i] & 0xFFFF0000u);
    }
  }
};

// 8 consecutive T values (16 bytes) as floats.
template <typename T>
inline void chess_unpack8(uint4 v, thread float* f) {
  ChessUnpack<T>::run(v, f);
}

// Load W consecutive 32-bit words (W = 4, 2 or 1) with one vector load.
template <int W>
inline void chess_load_words(const device uint32_t* p, thread uint32_t* out) {
  if (W == 4) {
    const uint4 v = *((const device uint4*)p);
    out[0] = v.x; out[1] = v.y; out[2] = v.z; out[3] = v.w;
  } else if (W == 2) {
    const uint2 v = *((const device uint2*)p);
    out[0] = v.x; out[1] = v.y;
  } else {
    out[0] = p[0];
  }
}

// q (a BITS-bit field of a packed word) as float: (q | 0x4B000000) is the float 2^23 + q exactly.
template <int BITS>
inline float chess_qfloat(uint32_t word, int shift) {
  constexpr uint32_t MASK = (1u << BITS) - 1u;
  return as_type<float>(((word >> shift) & MASK) | 0x4B000000u) - 8388608.0f;
}

// Ordered compaction of the active inputs of one split-K chunk into threadgroup memory; all 256
// threads of the threadgroup must call it. Returns the count (same order as the CUDA twin).
template <typename T, int M, int K, int KC>
inline int chess_compact(const device T* x, int k_begin, threadgroup int* idx, threadgroup int* wcount,
                         uint tid, uint lane, uint warp) {
  int total = 0;
  for (int p = 0; p < KC; p += 256) {
    const int t = p + int(tid);
    const int j = k_begin + t;
    bool act = false;
    if (t < KC && j < K) {
      for (int m = 0; m < M; ++m) act = act || (float(x[m * K + j]) != 0.0f);
    }
    const uint before = simd_prefix_exclusive_sum(uint(act));
    const uint count = simd_sum(uint(act));
    if (lane == 0) wcount[warp] = int(count);
    threadgroup_barrier(mem_flags::mem_threadgroup);
    int off = total;
    for (uint w = 0; w < warp; ++w) off += wcount[w];
    if (act) idx[off + int(before)] = j;
    for (int w = 0; w < 8; ++w) total += wcount[w];
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }
  return total;
}

// Sparse-output rows: is row r (< N) active for any token, i.e. some a[m, r] != 0?
template <typename T, int M, int N>
inline bool chess_row_active(const device T* a, int r) {
  bool active = false;
  for (int m = 0; m < M; ++m) active = active || ((r < N) && float(a[m * N + r]) != 0.0f);
  return active;
}

// Sparse-output epilogue (twin of the CUDA one): simd_sum, then the WPR simdgroups of row r
// through red[8][M]; y[m, r] = sum * a[m, r]. All 256 threads must call it.
template <typename T, int M, int N, int WPR>
inline void chess_finish_rows(thread const float* acc, const device T* a, device T* y, int r,
                              threadgroup float (*red)[M], uint lane, uint warp) {
  for (int m = 0; m < M; ++m) {
    const float s = simd_sum(acc[m]);
    if (lane == 0) red[warp][m] = s;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (r < N && int(warp) % WPR == 0 && int(lane) < M) {
    float s = 0.0f;
    for (int p = 0; p < WPR; ++p) s += red[warp + p][lane];
    y[int(lane) * N + r] = static_cast<T>(s * float(a[int(lane) * N + r]));
  }
}

// Sparse-input epilogue (twin of the CUDA one): the 8 simdgroups' accumulators of one output tile
// through red[8][TILE] into partial[chunk, m, :].
template <int M, int N, int VPL>
inline void chess_store_partial(thread const float (*acc)[VPL], thread const float* accb, device float* partial,
                                int tile, int chunk, threadgroup float (*red)[32 * VPL], uint tid, uint lane,
                                uint warp) {
  constexpr int TILE = 32 * VPL;
  for (int m = 0; m < M; ++m) {
    for (int e = 0; e < VPL; ++e) red[warp][lane * VPL + e] = acc[m][e] + accb[m];
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (int t = int(tid); t < TILE; t += 256) {
      float s = 0.0f;
      for (int w8 = 0; w8 < 8; ++w8) s += red[w8][t];
      const int n = tile * TILE + t;
      if (n < N) partial[(chunk * M + m) * N + n] = s;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }
}
