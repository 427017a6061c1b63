// The elementwise parts of a Llama layer in bf16 or fp32, one pass each. torch runs
// each of them as several operations (convert, compute, round, write, per operation):
// on a 2048-token bf16 chunk RMSNorm alone took 4 ms, and at a decode step's few rows
// in fp32 the ~12 operations of a layer cost more in dispatch than in arithmetic. Each
// kernel rounds to bf16 exactly where torch's sequence of operations does, so results
// match the torch path (up to the order of the fp32 sum inside RMSNorm's mean; in fp32
// also the last bit of exp and of contracted multiply-adds).
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

// How a kernel reads and writes each dtype. `keep` rounds an fp32 intermediate where
// torch's bf16 operations round it; in fp32 it keeps it as it is.
struct Bf16 {
  using T = uint16_t;
  static float load(T b) { return from_bits(b); }
  static T store(float f) { return to_bits(f); }
  static float keep(float f) { return round_bf16(f); }
  static const T* data(const torch::Tensor& t) { return bits(t); }
  static T* data(torch::Tensor& t) { return bits(t); }
};

struct F32 {
  using T = float;
  static float load(T f) { return f; }
  static T store(float f) { return f; }
  static float keep(float f) { return f; }
  static const T* data(const torch::Tensor& t) { return t.data_ptr<float>(); }
  static T* data(torch::Tensor& t) { return t.data_ptr<float>(); }
};

void check(const torch::Tensor& t, const torch::Tensor& like, const char* name) {
  TORCH_CHECK(t.scalar_type() == like.scalar_type() && t.is_contiguous() && !t.is_cuda(), name,
              " must be a contiguous CPU tensor of x's dtype");
}

bool is_bf16(const torch::Tensor& x) {
  TORCH_CHECK(x.scalar_type() == torch::kBFloat16 || x.scalar_type() == torch::kFloat,
              "the layer kernels take bf16 or fp32, not ", x.scalar_type());
  return x.scalar_type() == torch::kBFloat16;
}

// transformers' LlamaRMSNorm: x * rsqrt(mean(x^2) + eps) in fp32, rounded to x's dtype, times weight.
template <class E>
torch::Tensor rms_norm_impl(const torch::Tensor& x, const torch::Tensor& weight, double eps) {
  const int64_t d = x.size(-1), rows = x.numel() / d;
  TORCH_CHECK(weight.numel() == d, "weight has ", weight.numel(), " entries for rows of ", d);
  auto out = torch::empty_like(x);
  const auto* in = E::data(x);
  const auto* w = E::data(weight);
  auto* o = E::data(out);
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const auto* xr = in + r * d;
      float sum = 0.f;
      for (int64_t i = 0; i < d; ++i) sum += E::load(xr[i]) * E::load(xr[i]);
      const float scale = 1.f / std::sqrt(sum / static_cast<float>(d) + static_cast<float>(eps));
      for (int64_t i = 0; i < d; ++i) o[r * d + i] = E::store(E::load(w[i]) * E::keep(E::load(xr[i]) * scale));
    }
  });
  return out;
}

// [T, 2I] (gate then up, as the fused projection writes them) -> silu(gate) * up [T, I].
template <class E>
torch::Tensor silu_mul_impl(const torch::Tensor& gate_up) {
  const int64_t two_i = gate_up.size(-1), rows = gate_up.numel() / two_i, inner = two_i / 2;
  TORCH_CHECK(two_i % 2 == 0, "gate_up's last dim must be even");
  auto sizes = gate_up.sizes().vec();
  sizes.back() = inner;
  auto out = torch::empty(sizes, gate_up.options());
  const auto* in = E::data(gate_up);
  auto* o = E::data(out);
  at::parallel_for(0, rows, 4, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const auto* gate = in + r * two_i;
      const auto* up = gate + inner;
      for (int64_t i = 0; i < inner; ++i) {
        const float g = E::load(gate[i]);
        o[r * inner + i] = E::store(E::keep(g / (1.f + std::exp(-g))) * E::load(up[i]));
      }
    }
  });
  return out;
}

// x [T, heads, d]; cos, sin [T, 1, d/2]. Rotate-half: (x1 c - x2 s, x2 c + x1 s), every
// product and sum rounded as torch's operations in x's dtype round them.
template <class E>
torch::Tensor rope_impl(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin) {
  TORCH_CHECK(x.dim() == 3, "x must be [T, heads, d]");
  const int64_t tokens = x.size(0), heads = x.size(1), d = x.size(2), half = d / 2;
  TORCH_CHECK(cos.numel() == tokens * half && sin.numel() == tokens * half, "cos/sin must be [T, 1, d/2]");
  auto out = torch::empty_like(x);
  const auto* in = E::data(x);
  const auto* c = E::data(cos);
  const auto* s = E::data(sin);
  auto* o = E::data(out);
  at::parallel_for(0, tokens, 8, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const auto* ct = c + t * half;
      const auto* st = s + t * half;
      for (int64_t h = 0; h < heads; ++h) {
        const auto* xr = in + (t * heads + h) * d;
        auto* orow = o + (t * heads + h) * d;
        for (int64_t i = 0; i < half; ++i) {
          const float x1 = E::load(xr[i]), x2 = E::load(xr[i + half]);
          const float cv = E::load(ct[i]), sv = E::load(st[i]);
          orow[i] = E::store(E::keep(x1 * cv) - E::keep(x2 * sv));
          orow[i + half] = E::store(E::keep(x2 * cv) + E::keep(x1 * sv));
        }
      }
    }
  });
  return out;
}

}  // namespace

torch::Tensor rms_norm(torch::Tensor x, torch::Tensor weight, double eps) {
  const bool bf16 = is_bf16(x);
  check(x, x, "x");
  check(weight, x, "weight");
  return bf16 ? rms_norm_impl<Bf16>(x, weight, eps) : rms_norm_impl<F32>(x, weight, eps);
}

torch::Tensor silu_mul(torch::Tensor gate_up) {
  const bool bf16 = is_bf16(gate_up);
  check(gate_up, gate_up, "gate_up");
  return bf16 ? silu_mul_impl<Bf16>(gate_up) : silu_mul_impl<F32>(gate_up);
}

torch::Tensor rope(torch::Tensor x, torch::Tensor cos, torch::Tensor sin) {
  const bool bf16 = is_bf16(x);
  check(x, x, "x");
  check(cos, x, "cos");
  check(sin, x, "sin");
  return bf16 ? rope_impl<Bf16>(x, cos, sin) : rope_impl<F32>(x, cos, sin);
}
