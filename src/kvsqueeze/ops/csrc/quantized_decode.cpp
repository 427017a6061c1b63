// Decode attention straight out of a quantized page arena, on the CPU (KIVI, arXiv
// 2402.02750; layout: store/quantized_block_pool.py).
//
// One query token per (sequence, kv-head) row: the row walks its quantized pages (one
// key group each: packed key codes, value rows with per-token scales and zeros, int32
// positions, the group's fp16 per-channel key scale and zero point), then the
// full-precision residual's pages. Each key and value is dequantized into a row of
// d floats in registers and cache, dotted with the row's GQA group of queries or
// accumulated, and dropped: no gather, no dequantized copy of the cache. Two passes
// as in paged_decode.cpp (scores, one softmax, values). Rows run in parallel.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

struct Layout {
  int64_t group, block_size, bits, value_group, page_bytes, q_values, q_positions, q_scale, fp_values, fp_positions;
  int64_t fp_dtype;  // 0 float32, 1 bfloat16, 2 float16
};

inline float half_at(const uint8_t* p) {
  at::Half h;
  std::memcpy(&h, p, 2);
  return static_cast<float>(h);
}

// Planar codes (store/quantize.py's pack): byte i holds channels i, i + m, i + 2m, ...
// from its low bits up, m = d * bits / 8.
inline void unpack_row(const uint8_t* bytes, int64_t bits, int64_t d, float* out) {
  if (bits == 8) {
    for (int64_t i = 0; i < d; ++i) out[i] = static_cast<float>(bytes[i]);
    return;
  }
  const int64_t m = d * bits / 8, per = 8 / bits;
  const int mask = (1 << bits) - 1;
  for (int64_t k = 0; k < per; ++k) {
    const int shift = static_cast<int>(k * bits);
    for (int64_t i = 0; i < m; ++i) out[k * m + i] = static_cast<float>((bytes[i] >> shift) & mask);
  }
}

inline void load_full(const uint8_t* src, int64_t dtype, int64_t d, float* out) {
  if (dtype == 0) {
    std::memcpy(out, src, d * sizeof(float));
  } else if (dtype == 1) {
    const uint16_t* bits = reinterpret_cast<const uint16_t*>(src);
    for (int64_t i = 0; i < d; ++i) {
      uint32_t u = static_cast<uint32_t>(bits[i]) << 16;
      std::memcpy(out + i, &u, sizeof(float));
    }
  } else {
    for (int64_t i = 0; i < d; ++i) out[i] = half_at(src + 2 * i);
  }
}

// A value row: codes, then fp16 scales and zeros per group of value_group channels.
inline void value_row(const uint8_t* row, const Layout& L, int64_t d, float* codes, float* out) {
  const int64_t m = d * L.bits / 8, groups = d / L.value_group;
  unpack_row(row, L.bits, d, codes);
  for (int64_t gi = 0; gi < groups; ++gi) {
    const float s = half_at(row + m + 2 * gi), z = half_at(row + m + 2 * (groups + gi));
    for (int64_t i = gi * L.value_group; i < (gi + 1) * L.value_group; ++i) out[i] = codes[i] * s + z;
  }
}

void attend_row(const float* q_in, float* out, const uint8_t* arena, const Layout& L, const int64_t* q_table,
                const int64_t* q_counts, int64_t q_width, const int64_t* fp_table, int64_t fp_off, int64_t fp_len,
                int64_t d, int64_t group, int64_t q_pos, int64_t window, bool masked, float scale) {
  const float neg_inf = -1e30f;  // finite: the file is built with -ffast-math
  const int64_t key_bytes = d * L.bits / 8, row_bytes = key_bytes + 4 * (d / L.value_group);
  const int64_t esize = L.fp_dtype == 0 ? 4 : 2;
  int64_t n = fp_len;
  for (int64_t c = 0; c < q_width; ++c) n += q_table[c] >= 0 ? q_counts[c] : 0;
  std::vector<float> q(group * d), acc(group * d, 0.f), p(group * std::max<int64_t>(n, 1)), row(d), codes(d),
      ks(d), kz(d);
  for (int64_t i = 0; i < group * d; ++i) q[i] = q_in[i] * scale;
  auto score = [&](int64_t t, const float* key, int64_t pos) {
    const bool hidden = masked && (pos > q_pos || (window > 0 && q_pos - pos >= window));
    for (int64_t g = 0; g < group; ++g) {
      const float* qg = q.data() + g * d;
      float s = 0.f;
      for (int64_t i = 0; i < d; ++i) s += qg[i] * key[i];
      p[g * n + t] = hidden ? neg_inf : s;
    }
  };
  auto accumulate = [&](int64_t t, const float* value) {
    for (int64_t g = 0; g < group; ++g) {
      const float w = p[g * n + t];
      float* ag = acc.data() + g * d;
      for (int64_t i = 0; i < d; ++i) ag[i] += w * value[i];
    }
  };
  // Pass 1: scores.
  int64_t t = 0;
  for (int64_t c = 0; c < q_width; ++c) {
    if (q_table[c] < 0) continue;
    const uint8_t* page = arena + q_table[c] * L.page_bytes;
    for (int64_t i = 0; i < d; ++i) {
      ks[i] = half_at(page + L.q_scale + 2 * i);
      kz[i] = half_at(page + L.q_scale + 2 * (d + i));
    }
    const int32_t* pos = reinterpret_cast<const int32_t*>(page + L.q_positions);
    for (int64_t j = 0; j < q_counts[c]; ++j, ++t) {
      unpack_row(page + j * key_bytes, L.bits, d, codes.data());
      for (int64_t i = 0; i < d; ++i) row[i] = codes[i] * ks[i] + kz[i];
      score(t, row.data(), pos[j]);
    }
  }
  for (int64_t s = fp_off; s < fp_off + fp_len; ++s, ++t) {
    const uint8_t* page = arena + fp_table[s / L.block_size] * L.page_bytes;
    const int64_t w = s % L.block_size;
    load_full(page + w * d * esize, L.fp_dtype, d, row.data());
    int32_t pos;
    std::memcpy(&pos, page + L.fp_positions + 4 * w, 4);
    score(t, row.data(), pos);
  }
  // One softmax per query of the group.
  std::vector<float> inv(group, 0.f);
  for (int64_t g = 0; g < group; ++g) {
    float* pg = p.data() + g * n;
    float top = neg_inf;
    for (int64_t i = 0; i < n; ++i) top = std::max(top, pg[i]);
    if (top <= neg_inf) {
      for (int64_t i = 0; i < n; ++i) pg[i] = 0.f;
      continue;
    }
    float sum = 0.f;
    for (int64_t i = 0; i < n; ++i) {
      pg[i] = std::exp(pg[i] - top);
      sum += pg[i];
    }
    inv[g] = 1.f / sum;
  }
  // Pass 2: values.
  t = 0;
  for (int64_t c = 0; c < q_width; ++c) {
    if (q_table[c] < 0) continue;
    const uint8_t* page = arena + q_table[c] * L.page_bytes + L.q_values;
    for (int64_t j = 0; j < q_counts[c]; ++j, ++t) {
      value_row(page + j * row_bytes, L, d, codes.data(), row.data());
      accumulate(t, row.data());
    }
  }
  for (int64_t s = fp_off; s < fp_off + fp_len; ++s, ++t) {
    const uint8_t* page = arena + fp_table[s / L.block_size] * L.page_bytes;
    load_full(page + L.fp_values + (s % L.block_size) * d * esize, L.fp_dtype, d, row.data());
    accumulate(t, row.data());
  }
  for (int64_t g = 0; g < group; ++g) {
    for (int64_t i = 0; i < d; ++i) out[g * d + i] = acc[g * d + i] * inv[g];
  }
}

}  // namespace

// query [rows, group, d] float32; arena [pages, page bytes] uint8; q_table / q_counts
// [rows, Wq] int64 (-1 / 0 past a row's pages); fp_table [rows, Wf] int64; fp_off,
// fp_len, query_positions [rows] int64; layout: group, block_size, bits, value_group,
// page_bytes, q_values, q_positions, q_scale, fp_values, fp_positions, fp_dtype.
// Returns [rows, group, d] float32.
torch::Tensor quantized_paged_decode(torch::Tensor query, torch::Tensor arena, torch::Tensor q_table,
                                     torch::Tensor q_counts, torch::Tensor fp_table, torch::Tensor fp_off,
                                     torch::Tensor fp_len, torch::Tensor query_positions, std::vector<int64_t> layout,
                                     double scale, int64_t window, bool masked) {
  TORCH_CHECK(query.dim() == 3 && query.is_contiguous() && query.scalar_type() == torch::kFloat,
              "query must be a contiguous float32 [rows, group, d]");
  TORCH_CHECK(arena.scalar_type() == torch::kUInt8 && arena.is_contiguous() && arena.dim() == 2, "arena: uint8 pages");
  TORCH_CHECK(layout.size() == 11, "layout has 11 fields");
  const Layout L{layout[0], layout[1], layout[2], layout[3], layout[4], layout[5],
                 layout[6], layout[7], layout[8], layout[9], layout[10]};
  TORCH_CHECK(L.page_bytes == arena.size(1), "layout and arena disagree on the page size");
  const int64_t rows = query.size(0), group = query.size(1), d = query.size(2);
  for (auto* t : {&q_table, &q_counts, &fp_table, &fp_off, &fp_len, &query_positions}) {
    TORCH_CHECK(t->scalar_type() == torch::kInt64 && t->is_contiguous() && t->size(0) == rows,
                "tables, counts, offsets, lengths and positions: contiguous int64, one row per query row");
  }
  const int64_t pages = arena.size(0), q_width = q_table.size(1), fp_width = fp_table.size(1);
  const int64_t* qt = q_table.data_ptr<int64_t>();
  const int64_t* qc = q_counts.data_ptr<int64_t>();
  const int64_t* ft = fp_table.data_ptr<int64_t>();
  const int64_t* fo = fp_off.data_ptr<int64_t>();
  const int64_t* fl = fp_len.data_ptr<int64_t>();
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < q_width; ++c) {
      TORCH_CHECK(qt[r * q_width + c] < pages && (qt[r * q_width + c] < 0 || qc[r * q_width + c] <= L.group),
                  "row ", r, ": a quantized page outside the arena or holding more than a group");
    }
    TORCH_CHECK(fo[r] >= 0 && fl[r] >= 0 && fo[r] + fl[r] <= fp_width * L.block_size, "row ", r,
                ": the residual outgrows its table");
    for (int64_t c = 0; c < (fo[r] + fl[r] + L.block_size - 1) / L.block_size; ++c) {
      TORCH_CHECK(ft[r * fp_width + c] >= 0 && ft[r * fp_width + c] < pages, "row ", r, ": a residual page is missing");
    }
  }
  const int64_t* qp = query_positions.data_ptr<int64_t>();
  const uint8_t* base = arena.data_ptr<uint8_t>();
  const float* q = query.data_ptr<float>();
  auto out = torch::empty_like(query);
  float* o = out.data_ptr<float>();
  const float scale_f = static_cast<float>(scale);
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      attend_row(q + r * group * d, o + r * group * d, base, L, qt + r * q_width, qc + r * q_width, q_width,
                 ft + r * fp_width, fo[r], fl[r], d, group, qp[r], window, masked, scale_f);
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("quantized_paged_decode", &quantized_paged_decode,
        "decode attention over KIVI-quantized pages and a full-precision residual");
}
