// KIVI's quantizer (arXiv 2402.02750) in one pass over the K/V, on the CPU: the same
// arithmetic as store/quantize.py, fused. Each min-max slice (a key channel over a
// group of tokens, or a group of a value row's channels) is read once; its fp16
// scale and zero point, codes and packed bytes are written in the same pass.
//
// The codes must equal the torch path's bit for bit (the HF path, the engine and the
// tests share quantized stores), so this file is built without -ffast-math and
// without contraction: every step is the fp32 operation torch performs, in its order
// (scale = fp16((hi - lo) / levels), zero = fp16(lo), code = round-half-even((x -
// zero) * (1 / scale)) clamped to [0, levels]).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr float kFp16Max = 65504.0f;

// A slice's scale and zero point, from its min and max (fp32).
inline void fit(float lo, float hi, int levels, at::Half& scale, at::Half& zero, float& inv) {
  TORCH_CHECK_VALUE(std::abs(lo) <= kFp16Max && std::abs(hi) <= kFp16Max,
                    "K/V values beyond the fp16 range cannot take an fp16 scale and zero point");
  scale = at::Half((hi - lo) / static_cast<float>(levels));
  if (!(static_cast<float>(scale) > 0.f)) scale = at::Half(1.f);  // a constant slice: any scale codes it
  zero = at::Half(lo);
  inv = 1.f / static_cast<float>(scale);
}

// Codes of x[0..n) against per-element zero points and reciprocal scales. Restrict
// pointers and the int32 step let the loop vectorise (uint8 stores may alias anything).
inline void code_row(const float* __restrict x, const float* __restrict zero, const float* __restrict inv,
                     uint8_t* __restrict out, int64_t n, float levels) {
  for (int64_t i = 0; i < n; ++i) {
    const float c = std::nearbyint((x[i] - zero[i]) * inv[i]);
    out[i] = static_cast<uint8_t>(static_cast<int32_t>(std::min(std::max(c, 0.f), levels)));
  }
}

// Planar packing (store/quantize.py's pack): byte i holds codes i, i + m, i + 2m, ...
// from its low bits up, m = d * bits / 8.
inline void pack(const uint8_t* codes, int64_t d, int64_t bits, uint8_t* out) {
  if (bits == 8) {
    std::memcpy(out, codes, d);
    return;
  }
  const int64_t per = 8 / bits, m = d / per;
  for (int64_t i = 0; i < m; ++i) {
    uint8_t byte = 0;
    for (int64_t k = 0; k < per; ++k) byte |= static_cast<uint8_t>(codes[k * m + i] << (k * bits));
    out[i] = byte;
  }
}

torch::Tensor as_float(const torch::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu(), "the fused quantizer runs on CPU tensors");
  return x.to(torch::kFloat).contiguous();
}

void check_bits(int64_t bits) { TORCH_CHECK_VALUE(bits == 8 || bits == 4 || bits == 2, "bits must be 8, 4 or 2"); }

}  // namespace

// keys [n, G, d] -> (packed codes [n, G, d * bits / 8] uint8, scale [n, d] fp16, zero
// [n, d] fp16): one scale and zero per channel of each group of G tokens.
std::vector<torch::Tensor> quantize_key_groups(torch::Tensor keys, int64_t bits) {
  check_bits(bits);
  TORCH_CHECK(keys.dim() == 3, "keys must be [groups, tokens, head_dim]");
  const torch::Tensor x = as_float(keys);
  const int64_t n = x.size(0), g = x.size(1), d = x.size(2), m = d * bits / 8;
  const int levels = (1 << bits) - 1;
  auto codes = torch::empty({n, g, m}, x.options().dtype(torch::kUInt8));
  auto scale = torch::empty({n, d}, x.options().dtype(torch::kHalf));
  auto zero = torch::empty({n, d}, x.options().dtype(torch::kHalf));
  const float* src = x.data_ptr<float>();
  uint8_t* dst = codes.data_ptr<uint8_t>();
  at::Half* sc = scale.data_ptr<at::Half>();
  at::Half* ze = zero.data_ptr<at::Half>();
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    // Channels run along the inner loops (contiguous, vectorised), tokens along the outer.
    std::vector<float> lo(d), hi(d), z(d), inv(d);
    std::vector<uint8_t> raw(g * d);
    for (int64_t j = begin; j < end; ++j) {
      const float* group = src + j * g * d;
      std::copy(group, group + d, lo.begin());
      std::copy(group, group + d, hi.begin());
      for (int64_t t = 1; t < g; ++t) {
        for (int64_t c = 0; c < d; ++c) {
          lo[c] = std::min(lo[c], group[t * d + c]);
          hi[c] = std::max(hi[c], group[t * d + c]);
        }
      }
      for (int64_t c = 0; c < d; ++c) {
        fit(lo[c], hi[c], levels, sc[j * d + c], ze[j * d + c], inv[c]);
        z[c] = static_cast<float>(ze[j * d + c]);
      }
      for (int64_t t = 0; t < g; ++t) {
        code_row(group + t * d, z.data(), inv.data(), raw.data() + t * d, d, levels);
        pack(raw.data() + t * d, d, bits, dst + (j * g + t) * m);
      }
    }
  });
  return {codes, scale, zero};
}

// x [n, d] -> self-contained rows [n, d * bits / 8 + 4 * d / channel_group] uint8: the
// packed codes, then one fp16 scale per group of channel_group channels, then the zeros.
torch::Tensor quantize_rows(torch::Tensor x_in, int64_t bits, int64_t channel_group) {
  check_bits(bits);
  TORCH_CHECK(x_in.dim() == 2, "rows must be [n, head_dim]");
  const torch::Tensor x = as_float(x_in);
  const int64_t n = x.size(0), d = x.size(1), m = d * bits / 8;
  TORCH_CHECK(channel_group > 0 && d % channel_group == 0, "head_dim must be a multiple of the channel group");
  const int64_t groups = d / channel_group, row_bytes = m + 4 * groups;
  const int levels = (1 << bits) - 1;
  auto rows = torch::empty({n, row_bytes}, x.options().dtype(torch::kUInt8));
  const float* src = x.data_ptr<float>();
  uint8_t* dst = rows.data_ptr<uint8_t>();
  at::parallel_for(0, n, 64, [&](int64_t begin, int64_t end) {
    std::vector<float> z(d), inv(d);
    std::vector<uint8_t> raw(d);
    for (int64_t r = begin; r < end; ++r) {
      const float* row = src + r * d;
      uint8_t* out = dst + r * row_bytes;
      for (int64_t k = 0; k < groups; ++k) {
        const float* slice = row + k * channel_group;
        float lo = slice[0], hi = slice[0], group_inv;
#pragma omp simd reduction(min : lo) reduction(max : hi)
        for (int64_t i = 1; i < channel_group; ++i) {
          lo = std::min(lo, slice[i]);
          hi = std::max(hi, slice[i]);
        }
        at::Half scale, zero;
        fit(lo, hi, levels, scale, zero, group_inv);
        std::fill(z.begin() + k * channel_group, z.begin() + (k + 1) * channel_group, static_cast<float>(zero));
        std::fill(inv.begin() + k * channel_group, inv.begin() + (k + 1) * channel_group, group_inv);
        std::memcpy(out + m + 2 * k, &scale, 2);
        std::memcpy(out + m + 2 * (groups + k), &zero, 2);
      }
      code_row(row, z.data(), inv.data(), raw.data(), d, levels);
      pack(raw.data(), d, bits, out);
    }
  });
  return rows;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("quantize_key_groups", &quantize_key_groups, "KIVI key groups: per-channel codes, scales and zeros");
  m.def("quantize_rows", &quantize_rows, "KIVI value rows: per-token codes with their scales and zeros");
}
