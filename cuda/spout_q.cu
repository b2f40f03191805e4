// Sparse-output GEMV, MLX affine-quantized weights (4 or 8 bits, group GS), fused with the gate.
//   y[m, r] = a[m, r] * sum_k (scale[r, k/GS] * q[r, k] + bias[r, k/GS]) * x[m, k]   (active rows)
// Layout: MLX's own (w (N, K*BITS/32) uint32, scales/biases (N, K/GS)): element k of a row sits in
// word k / (32/BITS) at bit BITS * (k % (32/BITS)). Same tiling as spout_f (WPR warps per row,
// 8/WPR rows per block); each 16-byte weight load (32 values at 4 bits, 16 at 8) lies inside one
// quantization group, so it needs one scale and one bias; q is decoded without I2F (chess_qfloat).
// Template: T, M, K, N, BITS, GS, WPR. Grid: ceil(N / (8/WPR)) * 256 threads, threadgroup 256.
// Needs K % (128/BITS) == 0.
constexpr int VPW = 32 / BITS;
constexpr int VPL = 4 * VPW;
constexpr int WORDS_PER_ROW = K / VPW;
constexpr int RPB = 8 / WPR;
const int lane = threadIdx.x & 31;
const int warp = threadIdx.x >> 5;
const int part = warp % WPR;
const int r = (int)blockIdx.x * RPB + warp / WPR;
const bool active = chess_row_active<T, M, N>(a, r);
float acc[M];
#pragma unroll
for (int m = 0; m < M; ++m) acc[m] = 0.0f;
if (active) {
  const uint32_t* wrow = w + (size_t)r * WORDS_PER_ROW;
  const T* srow = scales + (size_t)r * (K / GS);
  const T* brow = biases + (size_t)r * (K / GS);
#pragma unroll 2
  for (int v = part * 32 + lane; v < WORDS_PER_ROW / 4; v += 32 * WPR) {
    uint32_t words[4];
    chess_load_words<4>(wrow + 4 * v, words);
    const int k0 = v * VPL;
    const float s = static_cast<float>(srow[k0 / GS]);
    const float b = static_cast<float>(brow[k0 / GS]);
#pragma unroll
    for (int m = 0; m < M; ++m) {
      const uint4* xv = reinterpret_cast<const uint4*>(x + (size_t)m * K + k0);
      float qx[4] = {0.0f, 0.0f, 0.0f, 0.0f}, xs[4] = {0.0f, 0.0f, 0.0f, 0.0f};  // 4 chains for ILP
#pragma unroll
      for (int c = 0; c < VPL / 8; ++c) {
        float xf[8];
        chess_unpack8<T>(xv[c], xf);
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          const int i = c * 8 + e;
          const float q = chess_qfloat<BITS>(words[i / VPW], BITS * (i % VPW));
          qx[e & 3] += q * xf[e];
          xs[e & 3] += xf[e];
        }
      }
      acc[m] += s * ((qx[0] + qx[1]) + (qx[2] + qx[3])) + b * ((xs[0] + xs[1]) + (xs[2] + xs[3]));
    }
  }
}
__shared__ float red[8][M];
chess_finish_rows<T, M, N, WPR>(acc, a, y, r, red);
