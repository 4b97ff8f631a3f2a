// AMX helpers shared by kiln's CPU kernels (gemv.cpp, paged_prefill.cpp, paged_decode.cpp): the
// process's permission to use the tiles, a tile configuration, and V rows as a P.V operand.
#pragma once

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdint>
#include <cstdlib>

namespace kiln {

// Linux hands AMX's tile state to a process only on request (asked once; oneDNN asks too).
// False on kernels without AMX support, or with KILN_CPU_AMX=0 (to run and test the AVX-512
// paths on an AMX machine): callers keep their other path.
inline bool amx_ready() {
  static const bool ok = [] {
    const char* env = std::getenv("KILN_CPU_AMX");
    if (env != nullptr && env[0] == '0' && env[1] == '\0') return false;
    return syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
  }();
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

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>

#include <cstdint>

namespace kiln {

// The P.V product's B operand from V rows (AMX tiles, or AVX512-BF16 dot products that read the
// same layout): rows r0 and r1 (D bf16 each; nullptr reads as
// zeros) interleaved element by element into row `pair` of D/16 tiles [16 row pairs][16 dims],
// so each 64-byte tile row holds 16 dims of two consecutive positions.
class PairInterleave {
 public:
  PairInterleave() {
    for (int sub = 0; sub < 2; ++sub) {  // pick_[sub]: elements 16 sub .. 16 sub + 15 of both rows
      alignas(64) uint16_t idx[32];
      for (int i = 0; i < 16; ++i) {
        idx[2 * i] = static_cast<uint16_t>(sub * 16 + i);
        idx[2 * i + 1] = static_cast<uint16_t>(32 + sub * 16 + i);
      }
      pick_[sub] = _mm512_load_si512(idx);
    }
  }
  template <int D>
  void rows(const uint16_t* r0, const uint16_t* r1, uint32_t (*out)[16][16], int pair) const {
    for (int z = 0; z < D / 32; ++z) {
      const __m512i a = r0 ? _mm512_loadu_si512(r0 + 32 * z) : _mm512_setzero_si512();
      const __m512i b = r1 ? _mm512_loadu_si512(r1 + 32 * z) : _mm512_setzero_si512();
      for (int sub = 0; sub < 2; ++sub)
        _mm512_store_si512(out[2 * z + sub][pair], _mm512_permutex2var_epi16(a, pick_[sub], b));
    }
  }

 private:
  __m512i pick_[2];
};

}  // namespace kiln
#endif
