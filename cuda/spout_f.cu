// Sparse-output GEMV, float16/bfloat16 weights, fused with the gate product (up_proj under CATS/CHESS).
//   y[m, r] = a[m, r] * dot(w[r, :], x[m, :])  for rows r with any a[:, r] != 0,  else 0.
// Layout: w (N, K) row-major (MLX's nn.Linear weight). A block of 8 warps covers 8/WPR rows; the
// WPR warps of a row split it (lanes read 16 bytes at a time, WPR*32 lanes in step), reduce with
// shuffles, then through shared memory. Inactive rows cost one read of a[:, r] per warp.
// Template: T, M (tokens), K, N, WPR (warps per row: 1, 2, 4 or 8).
// Grid: ceil(N / (8/WPR)) * 256 threads, threadgroup 256. Needs K % 8 == 0.
constexpr int RPB = 8 / WPR;
const int warp = threadIdx.x >> 5;
const int part = warp % WPR;
const int r = (int)blockIdx.x * RPB + warp / WPR;
const bool active = chess_row_active<T, M, N>(a, r);
float acc[M];
#pragma unroll
for (int m = 0; m < M; ++m) acc[m] = 0.0f;
if (active) chess_row_dot<T, M, K, WPR>(w + (size_t)r * K, x, part, acc);
__shared__ float red[8][M];
chess_finish_rows<T, M, N, WPR>(acc, a, y, r, red);
