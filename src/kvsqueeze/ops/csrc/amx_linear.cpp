// y = x W^T + b for a few bf16 rows (a decode step's batch) on AMX tiles.
//
// oneDNN's bf16 products read SmolLM2's small weights at 5-8 GB/s at 16 to 32 rows, about
// half of what this CPU streams, so a decode step's linear layers cost more than its
// attention. Here a weight is packed once into AMX's pair-interleaved tiles, ordered so
// one 16-column block streams through memory along K, and every 16 rows of x multiply
// it with tdpbf16ps while the next tiles are prefetched.
#include "kernels.h"
#include "prefetch.h"

#include <ATen/Parallel.h>

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#define KVSQUEEZE_AMX 1

namespace {

constexpr int64_t kTileRows = 16;                   // rows of x and columns of W per tile
constexpr int64_t kTileK = 32;                      // bf16 values along K per tile row (64 bytes)
constexpr int64_t kTileElems = kTileRows * kTileK;  // one packed weight tile, 1 KiB
constexpr int kPrefetchTiles = 4;                   // how far ahead along K the weights are fetched

struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Linux hands a process AMX's tile state only once asked (arch_prctl); asked once.
bool amx_permitted() {
  static const bool permitted = [] {
    constexpr int kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return permitted;
}

void configure_tiles() {
  TileConfig config;
  for (int t = 0; t < 8; ++t) {
    config.rows[t] = kTileRows;
    config.colsb[t] = kTileK * 2;
  }
  _tile_loadconfig(&config);
}

// MT (1-2) row tiles of x times NT (1-2) column blocks of W over all of K, into `out`
// [MT*16, NT*16] fp32. Tiles: C in tmm0-3 (row tile r, block c at 2r + c), x in tmm4-5, W in tmm6-7.
template <int MT, int NT>
void multiply(const at::BFloat16* x, int64_t x_row_bytes, const at::BFloat16* w0, const at::BFloat16* w1,
              int64_t k_tiles, float* out) {
  _tile_zero(0);
  if (NT == 2) _tile_zero(1);
  if (MT == 2) _tile_zero(2);
  if (MT == 2 && NT == 2) _tile_zero(3);
  for (int64_t k = 0; k < k_tiles; ++k) {
    const char* a = reinterpret_cast<const char*>(x) + k * kTileK * 2;
    _tile_loadd(4, a, x_row_bytes);
    if (MT == 2) _tile_loadd(5, a + kTileRows * x_row_bytes, x_row_bytes);
    prefetch_block(w0 + (k + kPrefetchTiles) * kTileElems, kTileElems);
    _tile_loadd(6, w0 + k * kTileElems, kTileK * 2);
    if (NT == 2) {
      prefetch_block(w1 + (k + kPrefetchTiles) * kTileElems, kTileElems);
      _tile_loadd(7, w1 + k * kTileElems, kTileK * 2);
    }
    _tile_dpbf16ps(0, 4, 6);
    if (NT == 2) _tile_dpbf16ps(1, 4, 7);
    if (MT == 2) _tile_dpbf16ps(2, 5, 6);
    if (MT == 2 && NT == 2) _tile_dpbf16ps(3, 5, 7);
  }
  const int64_t ld = NT * kTileRows * 4;
  float* lower = out + kTileRows * NT * kTileRows;
  _tile_stored(0, out, ld);
  if (NT == 2) _tile_stored(1, out + kTileRows, ld);
  if (MT == 2) _tile_stored(2, lower, ld);
  if (MT == 2 && NT == 2) _tile_stored(3, lower + kTileRows, ld);
}

}  // namespace
#endif

bool amx_linear_available() {
#ifdef KVSQUEEZE_AMX
  return amx_permitted();
#else
  return false;
#endif
}

torch::Tensor amx_linear(torch::Tensor x, torch::Tensor packed, c10::optional<torch::Tensor> bias) {
#ifdef KVSQUEEZE_AMX
  TORCH_CHECK(amx_permitted(), "amx_linear: the OS does not grant this process AMX tiles");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && x.is_contiguous(), "amx_linear: x must be contiguous bf16 [M, K]");
  TORCH_CHECK(packed.dim() == 4 && packed.size(2) == kTileRows && packed.size(3) == kTileK &&
                  packed.scalar_type() == at::kBFloat16 && packed.is_contiguous(),
              "amx_linear: packed must be a contiguous bf16 [N/16, K/32, 16, 32] (pack_amx_weight)");
  const int64_t M = x.size(0), K = x.size(1), n_blocks = packed.size(0), k_tiles = packed.size(1);
  const int64_t N = n_blocks * kTileRows;
  TORCH_CHECK(k_tiles * kTileK == K, "amx_linear: x has ", K, " columns, the weight ", k_tiles * kTileK);
  const float* b = nullptr;
  if (bias && bias->defined()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->numel() == N && bias->is_contiguous(),
                "amx_linear: bias must be contiguous fp32 [N]");
    b = bias->data_ptr<float>();
  }
  // Row tiles read 16 rows of x: pad x to a whole tile (rows are independent, so the pad only fills unused rows).
  const int64_t padded_rows = (M + kTileRows - 1) / kTileRows * kTileRows;
  torch::Tensor xs = x;
  if (padded_rows != M) {
    xs = torch::zeros({padded_rows, K}, x.options());
    xs.narrow(0, 0, M).copy_(x);
  }
  auto y = torch::empty({M, N}, x.options());
  const at::BFloat16* xd = xs.data_ptr<at::BFloat16>();
  const at::BFloat16* wd = packed.data_ptr<at::BFloat16>();
  at::BFloat16* yd = y.data_ptr<at::BFloat16>();
  const int64_t block_pairs = (n_blocks + 1) / 2;
  at::parallel_for(0, block_pairs, 1, [&](int64_t first, int64_t last) {
    configure_tiles();
    alignas(64) float out[4 * kTileRows * kTileRows];
    for (int64_t pair = first; pair < last; ++pair) {
      const int64_t col = 2 * pair * kTileRows;
      const bool two_blocks = 2 * pair + 1 < n_blocks;
      const int width = two_blocks ? 2 * kTileRows : kTileRows;
      const at::BFloat16* w0 = wd + 2 * pair * k_tiles * kTileElems;
      const at::BFloat16* w1 = w0 + k_tiles * kTileElems;
      for (int64_t row = 0; row < padded_rows; row += 2 * kTileRows) {
        const bool two_tiles = row + kTileRows < padded_rows;
        const at::BFloat16* xa = xd + row * K;
        if (two_tiles && two_blocks) multiply<2, 2>(xa, K * 2, w0, w1, k_tiles, out);
        else if (two_tiles) multiply<2, 1>(xa, K * 2, w0, w1, k_tiles, out);
        else if (two_blocks) multiply<1, 2>(xa, K * 2, w0, w1, k_tiles, out);
        else multiply<1, 1>(xa, K * 2, w0, w1, k_tiles, out);
        const int64_t rows = std::min<int64_t>(two_tiles ? 2 * kTileRows : kTileRows, M - row);
        for (int64_t r = 0; r < rows; ++r)
          for (int c = 0; c < width; c += 16) {
            __m512 v = _mm512_load_ps(out + r * width + c);
            if (b) v = _mm512_add_ps(v, _mm512_loadu_ps(b + col + c));
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(yd + (row + r) * N + col + c),
                                reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v)));
          }
      }
    }
    _tile_release();
  });
  return y;
#else
  TORCH_CHECK(false, "amx_linear: built for a CPU without AMX-BF16");
#endif
}
