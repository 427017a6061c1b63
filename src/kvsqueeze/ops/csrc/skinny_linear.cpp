// y = x W^T (+ b) for a few fp32 rows x [M, K] and a weight W [N, K] in fp32 or bf16:
// the products of a decode step or a short teacher-forced answer, which read every
// weight once and so are bound by how fast the weights stream in. MKL's sgemm reads
// them at 3-5 GB/s on such shapes (2-core Zen 3); this streams them at the memory's
// pace. Dot products along K, in W's own layout (nothing packed), 6 weight rows by 2 x
// rows at a time in AVX2 registers; bf16 weights widen in registers (half the bytes).
// From a few rows up a block's products take as long as reading the next blocks, so
// the prefetch of the block two ahead is spread over all of a block's passes over x:
// reads and products overlap (16 rows: 50.7 -> 40.0 ms for SmolLM2's weights). From 16
// rows the products are compute-bound: about 60% of two Zen 3 cores' FMA peak.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cstdint>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

namespace {

constexpr int W_ROWS = 6;  // weight rows per block, by X_ROWS rows of x: 12 accumulators, 2 x
constexpr int X_ROWS = 2;  // vectors and a weight vector in the 16 ymm registers
constexpr int64_t AHEAD = 2 * W_ROWS;  // prefetch the weight rows two blocks ahead

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
inline void block(const float* x, const W* w, int64_t K, const char* pf, int64_t lines, float* y, int64_t ldy) {
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

// Every x row by the NW weight rows at w, X_ROWS rows a pass; the passes share the
// prefetch of the NW rows at `next` (none where null).
template <int NW, typename W>
inline void rows(const float* x, const W* w, int64_t M, int64_t K, const W* next, float* y, int64_t ldy) {
  const int64_t passes = (M + X_ROWS - 1) / X_ROWS;
  const int64_t lines = next == nullptr ? 0 : (NW * K * int64_t(sizeof(W)) + 63) / 64;
  const char* pf = reinterpret_cast<const char*>(next);
  for (int64_t p = 0; p < passes; ++p) {
    const int64_t m = p * X_ROWS, first = p * lines / passes, last = (p + 1) * lines / passes;
    if (M - m >= X_ROWS) {
      block<NW, X_ROWS>(x + m * K, w, K, pf + 64 * first, last - first, y + m * ldy, ldy);
    } else {
      block<NW, 1>(x + m * K, w, K, pf + 64 * first, last - first, y + m * ldy, ldy);
    }
  }
}

template <typename W>
void skinny(const float* x, const W* w, float* y, int64_t M, int64_t N, int64_t K) {
  const int64_t blocks = (N + W_ROWS - 1) / W_ROWS;
  at::parallel_for(0, blocks, 16, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n = b * W_ROWS;
      const W* at = w + n * K;
      const W* next = n + AHEAD + W_ROWS <= N ? at + AHEAD * K : nullptr;
      switch (std::min<int64_t>(W_ROWS, N - n)) {
        case 6: rows<6>(x, at, M, K, next, y + n, N); break;
        case 5: rows<5>(x, at, M, K, next, y + n, N); break;
        case 4: rows<4>(x, at, M, K, next, y + n, N); break;
        case 3: rows<3>(x, at, M, K, next, y + n, N); break;
        case 2: rows<2>(x, at, M, K, next, y + n, N); break;
        default: rows<1>(x, at, M, K, next, y + n, N); break;
      }
    }
  });
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
