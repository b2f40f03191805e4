// Sum the split-K partials of spin_f / spin_q: y[m, n] = sum_c partial[c, m, n] (cast to T).
// Template: T, M, N, C. Grid: M*N threads, threadgroup 256.
const int idx = (int)(blockIdx.x * blockDim.x + threadIdx.x);
if (idx >= M * N) return;
float s = 0.0f;
#pragma unroll 4
for (int c = 0; c < C; ++c) s += partial[(size_t)c * M * N + idx];
y[idx] = static_cast<T>(s);
