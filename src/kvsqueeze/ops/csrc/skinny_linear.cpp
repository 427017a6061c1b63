// y = x W^T (+ b) for a few fp32 rows x [M, K] and a weight W [N, K] in fp32 or bf16:
// the products of a decode step or a short teacher-forced answer, which read every
// weight once. MKL's sgemm reads them at 3-5 GB/s on such shapes (2-core Zen 3). W
// stays in its own layout (nothing packed; bf16 widened in registers, half the bytes),
// and the weight rows two blocks ahead are prefetched while a block is multiplied.
// Two forms, each giving a row the same bits whatever rows share its call:
// - from OUTER_MIN_ROWS rows, y^T = W x^T: x^T [K, MP] is packed once per call (MP = M
//   rounded up to 8, zero past M); each weight, broadcast, multiplies 8 rows of x^T: 6
//   weight rows by 16 rows of x in 12 accumulators, each y[m, n] one chain of FMAs over
//   k. There the products are compute-bound; SmolLM2's weights in fp32 at 16 rows: 27
//   ms, at the two cores' FMA peak (the dot form: 31); 32 rows 52 ms (56).
// - below, dot products along K (lanes along k, summed at the end), 6 weight rows by 2
//   x rows: at 1-7 rows bound by the memory (fp32 20-24 ms; bf16 12), where a broadcast
//   weight per lane-row would waste lanes (1 row: 10% slower in fp32, 2x in bf16).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

namespace {

constexpr int W_ROWS = 6;  // weight rows per block, by PANEL rows of x: 12 accumulators
constexpr int PANEL = 16;  // rows of x^T per pass: two ymm vectors
constexpr int64_t OUTER_MIN_ROWS = 8;  // below, the dot-product form (see skinny)

// One weight, broadcast to 8 lanes as fp32 (bf16 is fp32's upper half: shift it there).
inline __m256 broadcast(const float* w) { return _mm256_broadcast_ss(w); }

inline __m256 broadcast(const at::BFloat16* w) {
  const __m256i both = _mm256_set1_epi16(static_cast<short>(w->x));
  return _mm256_castsi256_ps(_mm256_slli_epi32(both, 16));
}

// NW (<= W_ROWS) weight rows by NV * 8 rows of x^T from xt (row stride MP); the products
// land in tile[j * PANEL + r]; prefetches the `lines` cache lines at pf, evenly over K.
template <int NW, int NV, typename W>
inline void block(const float* xt, int64_t MP, const W* w, int64_t K, const char* pf, int64_t lines, float* tile) {
  __m256 acc[NW][NV];
  for (int j = 0; j < NW; ++j)
    for (int v = 0; v < NV; ++v) acc[j][v] = _mm256_setzero_ps();
  // One line every `stride` steps, the rest after the loop: a fixed pattern the branch
  // predictor learns (an uneven spread cost 5-10% at 16-32 rows).
  const int64_t stride = lines > 0 ? (K + lines - 1) / lines : K + 1;
  int64_t issued = 0, countdown = stride;
  for (int64_t k = 0; k < K; ++k) {
    if (--countdown == 0) {
      countdown = stride;
      _mm_prefetch(pf + 64 * issued++, _MM_HINT_T0);
    }
    __m256 xv[NV];
    for (int v = 0; v < NV; ++v) xv[v] = _mm256_loadu_ps(xt + k * MP + 8 * v);
    for (int j = 0; j < NW; ++j) {
      const __m256 wv = broadcast(w + j * K + k);
      for (int v = 0; v < NV; ++v) acc[j][v] = _mm256_fmadd_ps(wv, xv[v], acc[j][v]);
    }
  }
  for (; issued < lines; ++issued) _mm_prefetch(pf + 64 * issued, _MM_HINT_T0);
  for (int j = 0; j < NW; ++j)
    for (int v = 0; v < NV; ++v) _mm256_storeu_ps(tile + j * PANEL + 8 * v, acc[j][v]);
}

// Pass p of `passes` over a block of NW weight rows prefetches an even share of the
// cache lines of the NW rows at `next` (none where null): the next block streams in
// while this one is multiplied.
struct PrefetchShare {
  const char* at;
  int64_t lines;
};

template <int NW, typename W>
inline PrefetchShare prefetch_share(const W* next, int64_t K, int64_t p, int64_t passes) {
  const int64_t lines = next == nullptr ? 0 : (NW * K * int64_t(sizeof(W)) + 63) / 64;
  const int64_t first = p * lines / passes, last = (p + 1) * lines / passes;
  return {reinterpret_cast<const char*>(next) + 64 * first, last - first};
}

// The NW weight rows at w by every panel of x^T, written to y (row stride N).
template <int NW, typename W>
inline void rows(const float* xt, int64_t M, int64_t MP, const W* w, int64_t K, const W* next, float* y, int64_t N) {
  alignas(32) float tile[W_ROWS * PANEL];
  const int64_t panels = (MP + PANEL - 1) / PANEL;
  for (int64_t p = 0; p < panels; ++p) {
    const int64_t m0 = p * PANEL;
    const PrefetchShare pf = prefetch_share<NW>(next, K, p, panels);
    if (MP - m0 >= PANEL) {
      block<NW, 2>(xt + m0, MP, w, K, pf.at, pf.lines, tile);
    } else {
      block<NW, 1>(xt + m0, MP, w, K, pf.at, pf.lines, tile);
    }
    for (int64_t m = m0; m < std::min(M, m0 + PANEL); ++m)
      for (int j = 0; j < NW; ++j) y[m * N + j] = tile[j * PANEL + (m - m0)];
  }
}

// ---- the dot-product form, below OUTER_MIN_ROWS rows: lanes along K, 6 weight rows by 2
// x rows in 12 accumulators, each summed across lanes at the end.
constexpr int X_ROWS = 2;

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }

inline __m256 load8(const at::BFloat16* p) {
  // bf16 is fp32's upper half: widen to 32 bits and shift into place
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// NW (<= W_ROWS) weight rows times MR (<= X_ROWS) x rows, written to y[m * ldy + j];
// prefetches the `lines` cache lines at pf, evenly over the pass.
template <int NW, int MR, typename W>
inline void dot_block(const float* x, const W* w, int64_t K, const char* pf, int64_t lines, float* y, int64_t ldy) {
  __m256 acc[NW][MR];
  for (int j = 0; j < NW; ++j)
    for (int m = 0; m < MR; ++m) acc[j][m] = _mm256_setzero_ps();
  // One line every `stride` of the K / 8 steps, the rest after the loop: a fixed pattern
  // the branch predictor learns (an uneven spread cost 5-10% at 16-32 rows).
  const int64_t steps = K / 8;
  const int64_t stride = lines > 0 ? (steps + lines - 1) / lines : steps + 1;
  int64_t issued = 0, countdown = stride;
  for (int64_t k = 0; k < K; k += 8) {
    if (--countdown == 0) {
      countdown = stride;
      _mm_prefetch(pf + 64 * issued++, _MM_HINT_T0);
    }
    __m256 xv[MR];
    for (int m = 0; m < MR; ++m) xv[m] = _mm256_loadu_ps(x + m * K + k);
    for (int j = 0; j < NW; ++j) {
      __m256 wv = load8(w + j * K + k);
      // Keep the weight in a register: GCC otherwise folds its load into every x row's
      // FMA, 14 loads a step instead of 8, and Zen 3 does two a cycle.
      asm("" : "+x"(wv));
      for (int m = 0; m < MR; ++m) acc[j][m] = _mm256_fmadd_ps(wv, xv[m], acc[j][m]);
    }
  }
  for (; issued < lines; ++issued) _mm_prefetch(pf + 64 * issued, _MM_HINT_T0);
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < NW; ++j) y[m * ldy + j] = hsum(acc[j][m]);
}

// Every x row by the NW weight rows at w, X_ROWS rows a pass (y's row stride N).
template <int NW, typename W>
inline void dot_rows(const float* x, int64_t M, const W* w, int64_t K, const W* next, float* y, int64_t N) {
  const int64_t passes = (M + X_ROWS - 1) / X_ROWS;
  for (int64_t p = 0; p < passes; ++p) {
    const int64_t m = p * X_ROWS;
    const PrefetchShare pf = prefetch_share<NW>(next, K, p, passes);
    if (M - m >= X_ROWS) {
      dot_block<NW, X_ROWS>(x + m * K, w, K, pf.at, pf.lines, y + m * N, N);
    } else {
      dot_block<NW, 1>(x + m * K, w, K, pf.at, pf.lines, y + m * N, N);
    }
  }
}

// ---- both forms: blocks of weight rows, split among the threads.

// The weight rows n.. (NW of them, or fewer at W's end) by every row of x, in the outer
// form (x holds x^T [K, MP]) or the dot form (x itself, [M, K]).
template <bool OUTER, int NW, typename W>
inline void weight_block(const float* x, int64_t M, int64_t MP, const W* w, int64_t N, int64_t K, int64_t n, float* y) {
  if constexpr (NW > 1) {
    if (N - n < NW) return weight_block<OUTER, NW - 1>(x, M, MP, w, N, K, n, y);
  }
  const W* at = w + n * K;
  const W* next = n + 3 * NW <= N ? at + 2 * NW * K : nullptr;  // two blocks ahead
  if constexpr (OUTER) {
    rows<NW>(x, M, MP, at, K, next, y + n, N);
  } else {
    dot_rows<NW>(x, M, at, K, next, y + n, N);
  }
}

template <bool OUTER, typename W>
void weight_blocks(const float* x, int64_t M, int64_t MP, const W* w, float* y, int64_t N, int64_t K) {
  at::parallel_for(0, (N + W_ROWS - 1) / W_ROWS, 16, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) weight_block<OUTER, W_ROWS>(x, M, MP, w, N, K, b * W_ROWS, y);
  });
}

// x [M, K] -> xt [K, MP] (K and MP multiples of 8, MP >= M; columns past M zeroed), by
// 8 x 8 tiles transposed in registers.
inline void transpose(const float* x, int64_t M, int64_t K, float* xt, int64_t MP) {
  for (int64_t m0 = 0; m0 < MP; m0 += 8) {
    for (int64_t k0 = 0; k0 < K; k0 += 8) {
      __m256 r[8];
      for (int i = 0; i < 8; ++i) r[i] = m0 + i < M ? _mm256_loadu_ps(x + (m0 + i) * K + k0) : _mm256_setzero_ps();
      // 8 x 8 transpose: unpack pairs, then quads, then swap 128-bit halves.
      __m256 t[8], u[8];
      for (int i = 0; i < 8; i += 2) {
        t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
      }
      for (int i = 0; i < 8; i += 4) {
        u[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
        u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
        u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
        u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
      }
      for (int i = 0; i < 4; ++i) {
        _mm256_storeu_ps(xt + (k0 + i) * MP + m0, _mm256_permute2f128_ps(u[i], u[i + 4], 0x20));
        _mm256_storeu_ps(xt + (k0 + i + 4) * MP + m0, _mm256_permute2f128_ps(u[i], u[i + 4], 0x31));
      }
    }
  }
}

template <typename W>
void outer(const float* x, const W* w, float* y, int64_t M, int64_t N, int64_t K) {
  const int64_t MP = (M + 7) / 8 * 8;
  // x^T, zero past row M, in a buffer kept across calls (allocating and zeroing it cost
  // as much as a small layer's products), filled 8 rows by 8 columns at a time.
  thread_local std::vector<float> buffer;
  if (static_cast<int64_t>(buffer.size()) < K * MP) buffer.resize(K * MP);
  float* xt = buffer.data();
  transpose(x, M, K, xt, MP);
  weight_blocks<true>(xt, M, MP, w, y, N, K);
}

template <typename W>
void skinny(const float* x, const W* w, float* y, int64_t M, int64_t N, int64_t K) {
  if (M >= OUTER_MIN_ROWS) {
    outer(x, w, y, M, N, K);
  } else {
    weight_blocks<false>(x, M, M, w, y, N, K);
  }
}

}  // namespace

bool skinny_linear_available() { return true; }

torch::Tensor skinny_linear(torch::Tensor x, torch::Tensor weight, c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1), "skinny_linear: x [M, K], W [N, K]");
  TORCH_CHECK(x.scalar_type() == at::kFloat, "skinny_linear: x must be fp32");
  TORCH_CHECK(weight.scalar_type() == at::kFloat || weight.scalar_type() == at::kBFloat16,
              "skinny_linear: W must be fp32 or bf16");
  TORCH_CHECK(x.size(1) % 8 == 0, "skinny_linear: K must be a multiple of 8");
  TORCH_CHECK(!bias.has_value() || (bias->dim() == 1 && bias->size(0) == weight.size(0)), "skinny_linear: bias [N]");
  x = x.contiguous();
  weight = weight.contiguous();
  const int64_t M = x.size(0), N = weight.size(0), K = x.size(1);
  auto y = torch::empty({M, N}, x.options());
  if (weight.scalar_type() == at::kFloat) {
    skinny(x.data_ptr<float>(), weight.data_ptr<float>(), y.data_ptr<float>(), M, N, K);
  } else {
    skinny(x.data_ptr<float>(), weight.data_ptr<at::BFloat16>(), y.data_ptr<float>(), M, N, K);
  }
  if (bias.has_value()) y.add_(bias->to(at::kFloat));
  return y;
}

#else  // no AVX2/FMA: callers keep F.linear

bool skinny_linear_available() { return false; }

torch::Tensor skinny_linear(torch::Tensor, torch::Tensor, c10::optional<torch::Tensor>) {
  TORCH_CHECK(false, "skinny_linear: built without AVX2/FMA");
}

#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("skinny_linear_available", &skinny_linear_available, "whether this build has the AVX2 kernel");
  m.def("skinny_linear", &skinny_linear, "x W^T + b for a few fp32 rows, W fp32 or bf16 [N, K]");
}
