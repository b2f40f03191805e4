// The execution model shared by the CPU emulations of Metal (metal_emu.h) and CUDA (cuda_emu.h),
// with which the CPU suite runs the kernels' launched texts (tests/test_*_emulated.py).
//
// A launch runs its threadgroups (blocks) one after another; a group's threads are real threads.
// The group barrier is a std::barrier; a warp (simdgroup) of 32 lanes exchanges values through a
// slot table between two barriers of its own, so, as on a GPU, every live lane of a warp must
// take part in a warp collective. A thread that returns drops out of both barriers and stops
// counting in its warp's collectives. Because one group runs at a time, a group's shared memory
// can be one static copy: the tests rewrite each shared/threadgroup storage declaration to
// `static`. What this cannot see: races between groups that a GPU runs side by side, address
// spaces, speed.
#pragma once
#include <algorithm>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

namespace chess_emu {
// bfloat16 (Metal's bfloat16_t, CUDA's __nv_bfloat16): float's top 16 bits, rounded to nearest even.
struct Bf16 {
  uint16_t bits;
  Bf16() = default;
  Bf16(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7f800000u) == 0x7f800000u && (u & 0x007fffffu)) {
      bits = (uint16_t)((u >> 16) | 0x40u);  // NaN stays NaN
    } else {
      u += 0x7fffu + ((u >> 16) & 1u);
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

struct Dim {
  unsigned x, y, z;
};

struct Warp {
  explicit Warp(int n) : bar(n) {}
  std::barrier<> bar;
  alignas(8) unsigned char slot[32][8];
  std::atomic<bool> live[32];
};

struct Group {
  explicit Group(int n) : bar(n) {
    for (int w = 0; w < (n + 31) / 32; ++w) {
      warps.emplace_back(new Warp(std::min(32, n - 32 * w)));
      for (int l = 0; l < 32; ++l) warps.back()->live[l] = 32 * w + l < n;
    }
  }
  std::barrier<> bar;
  std::vector<std::unique_ptr<Warp>> warps;
};

inline thread_local Group* group = nullptr;
inline thread_local int lane = 0, warp = 0;

inline void group_barrier() { group->bar.arrive_and_wait(); }

// Every live lane of the caller's warp gives v; f(values, live, lane) gives this lane's result.
template <class T, class F>
auto warp_collective(T v, F f) {
  static_assert(sizeof(T) <= 8, "a warp slot holds 8 bytes");
  Warp& w = *group->warps[warp];
  std::memcpy(w.slot[lane], &v, sizeof(T));
  w.bar.arrive_and_wait();
  T vals[32];
  bool live[32];
  for (int i = 0; i < 32; ++i) {
    live[i] = w.live[i];
    if (live[i]) std::memcpy(&vals[i], w.slot[i], sizeof(T));
  }
  auto r = f(vals, live, lane);
  w.bar.arrive_and_wait();
  return r;
}

// kern(group position, lane, warp, thread position, groups) for every thread of a launch of
// `grid` threads in groups of `tg` (MLX's metal_kernel and cuda_kernel both count the grid in
// threads; an edge group is cut to the grid).
// CHESS_EMU_REVERSE set: the groups run in the reverse order (a kernel whose result must not
// depend on which block finishes last is run both ways).
template <class F>
void launch(Dim grid, Dim tg, F kern) {
  if (tg.y != 1 || tg.z != 1) throw "chess_emu: one-dimensional groups only";
  const Dim groups{(grid.x + tg.x - 1) / tg.x, (grid.y + tg.y - 1) / tg.y, (grid.z + tg.z - 1) / tg.z};
  const bool rev = std::getenv("CHESS_EMU_REVERSE") != nullptr;
  for (unsigned iz = 0; iz < groups.z; ++iz)
    for (unsigned iy = 0; iy < groups.y; ++iy)
      for (unsigned ix = 0; ix < groups.x; ++ix) {
        const unsigned gx = rev ? groups.x - 1 - ix : ix, gy = rev ? groups.y - 1 - iy : iy,
                       gz = rev ? groups.z - 1 - iz : iz;
        const int n = (int)std::min(tg.x, grid.x - gx * tg.x);
        Group g(n);
        std::vector<std::thread> ts;
        ts.reserve(n);
        for (int t = 0; t < n; ++t)
          ts.emplace_back([&, t] {
            group = &g;
            lane = t % 32;
            warp = t / 32;
            kern(Dim{gx, gy, gz}, lane, warp, Dim{(unsigned)t, 0u, 0u}, groups);
            Warp& w = *g.warps[warp];
            w.live[lane] = false;
            w.bar.arrive_and_drop();
            g.bar.arrive_and_drop();
          });
        for (auto& th : ts) th.join();
      }
}
}  // namespace chess_emu
