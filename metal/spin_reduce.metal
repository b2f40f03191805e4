// Sum the split-K partials of spin_f / spin_q: y[m, n] = sum_c partial[c, m, n] (cast to T).
// Twin of cuda/spin_reduce.cu. Template: T, M, N, C. Grid: M*N threads, threadgroup 256.
const int i = int(thread_position_in_grid.x);
if (i >= M * N) return;
float s = 0.0f;
for (int c = 0; c < C; ++c) s += partial[c * M * N + i];
y[i] = static_cast<T>(s);
