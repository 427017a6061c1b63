// The elementwise parts of a Llama layer in bf16, one pass each. torch runs each of
// them as several bf16 operations (convert, compute, round, write, per operation):
// on a 2048-token chunk RMSNorm alone took 4 ms. Each kernel rounds to bf16 exactly
// where torch's sequence of operations does, so results match the torch path (up to
// the order of the fp32 sum inside RMSNorm's mean).
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#include "kernels.h"

namespace {

using bf16 = at::BFloat16;

// bf16 <-> fp32 on raw bits, branch-free so the loops vectorize (c10's conversion
// checks for NaN per element and stays scalar). Rounds to nearest even, as torch does
// for finite values.
inline float from_bits(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

inline uint16_t to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

inline float round_bf16(float x) { return from_bits(to_bits(x)); }

inline const uint16_t* bits(const torch::Tensor& t) { return reinterpret_cast<const uint16_t*>(t.data_ptr<bf16>()); }
inline uint16_t* bits(torch::Tensor& t) { return reinterpret_cast<uint16_t*>(t.data_ptr<bf16>()); }

void check_bf16(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == torch::kBFloat16 && t.is_contiguous() && !t.is_cuda(), name,
              " must be a contiguous bf16 CPU tensor");
}

}  // namespace

// transformers' LlamaRMSNorm: x * rsqrt(mean(x^2) + eps) in fp32, rounded to bf16, times weight.
torch::Tensor rms_norm_bf16(torch::Tensor x, torch::Tensor weight, double eps) {
  check_bf16(x, "x");
  check_bf16(weight, "weight");
  const int64_t d = x.size(-1), rows = x.numel() / d;
  TORCH_CHECK(weight.numel() == d, "weight has ", weight.numel(), " entries for rows of ", d);
  auto out = torch::empty_like(x);
  const uint16_t* in = bits(x);
  const uint16_t* w = bits(weight);
  uint16_t* o = bits(out);
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const uint16_t* xr = in + r * d;
      float sum = 0.f;
      for (int64_t i = 0; i < d; ++i) sum += from_bits(xr[i]) * from_bits(xr[i]);
      const float scale = 1.f / std::sqrt(sum / static_cast<float>(d) + static_cast<float>(eps));
      for (int64_t i = 0; i < d; ++i) o[r * d + i] = to_bits(from_bits(w[i]) * round_bf16(from_bits(xr[i]) * scale));
    }
  });
  return out;
}

// [T, 2I] (gate then up, as the fused projection writes them) -> silu(gate) * up [T, I].
torch::Tensor silu_mul_bf16(torch::Tensor gate_up) {
  check_bf16(gate_up, "gate_up");
  const int64_t two_i = gate_up.size(-1), rows = gate_up.numel() / two_i, inner = two_i / 2;
  TORCH_CHECK(two_i % 2 == 0, "gate_up's last dim must be even");
  auto sizes = gate_up.sizes().vec();
  sizes.back() = inner;
  auto out = torch::empty(sizes, gate_up.options());
  const uint16_t* in = bits(gate_up);
  uint16_t* o = bits(out);
  at::parallel_for(0, rows, 4, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const uint16_t* gate = in + r * two_i;
      const uint16_t* up = gate + inner;
      for (int64_t i = 0; i < inner; ++i) {
        const float g = from_bits(gate[i]);
        o[r * inner + i] = to_bits(round_bf16(g / (1.f + std::exp(-g))) * from_bits(up[i]));
      }
    }
  });
  return out;
}

// x [T, heads, d]; cos, sin [T, 1, d/2] (or [T, d/2]). Rotate-half: (x1 c - x2 s, x2 c + x1 s),
// every product and sum rounded to bf16 as torch's bf16 ops round them.
torch::Tensor rope_bf16(torch::Tensor x, torch::Tensor cos, torch::Tensor sin) {
  check_bf16(x, "x");
  check_bf16(cos, "cos");
  check_bf16(sin, "sin");
  TORCH_CHECK(x.dim() == 3, "x must be [T, heads, d]");
  const int64_t tokens = x.size(0), heads = x.size(1), d = x.size(2), half = d / 2;
  TORCH_CHECK(cos.numel() == tokens * half && sin.numel() == tokens * half, "cos/sin must be [T, 1, d/2]");
  auto out = torch::empty_like(x);
  const uint16_t* in = bits(x);
  const uint16_t* c = bits(cos);
  const uint16_t* s = bits(sin);
  uint16_t* o = bits(out);
  at::parallel_for(0, tokens, 8, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const uint16_t* ct = c + t * half;
      const uint16_t* st = s + t * half;
      for (int64_t h = 0; h < heads; ++h) {
        const uint16_t* xr = in + (t * heads + h) * d;
        uint16_t* orow = o + (t * heads + h) * d;
        for (int64_t i = 0; i < half; ++i) {
          const float x1 = from_bits(xr[i]), x2 = from_bits(xr[i + half]);
          const float cv = from_bits(ct[i]), sv = from_bits(st[i]);
          orow[i] = to_bits(round_bf16(x1 * cv) - round_bf16(x2 * sv));
          orow[i + half] = to_bits(round_bf16(x2 * cv) + round_bf16(x1 * sv));
        }
      }
    }
  });
  return out;
}
