// AMX helpers shared by kiln's CPU kernels (gemv.cpp, paged_prefill.cpp): the process's
// permission to use the tiles, and a tile configuration.
#pragma once

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdint>

namespace kiln {

// Linux hands AMX's tile state to a process only on request (asked once; oneDNN asks too).
// False on kernels without AMX support: callers keep their other path.
inline bool amx_ready() {
  static const bool ok = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
  return ok;
}

// Palette 1 with tiles 0 .. tiles-1 each 16 rows of 64 bytes (16 float32, or 32 bf16, a row).
// Load it with _tile_loadconfig on every thread before its tile instructions.
struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
  explicit TileConfig(int tiles) {
    for (int t = 0; t < tiles; ++t) {
      colsb[t] = 64;
      rows[t] = 16;
    }
  }
};

}  // namespace kiln
#endif
