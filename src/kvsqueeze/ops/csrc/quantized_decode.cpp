// Decode attention straight out of KIVI-quantized K/V, on the CPU (arXiv 2402.02750),
// for both layouts: the flat store of the HF path (store/quantized_kv.py) and the
// engine's page arena (store/quantized_block_pool.py).
//
// One query token per (sequence, kv-head) row, with its GQA group of queries. A row
// is a list of quantized key groups (packed key codes, value rows with per-token
// scales and zeros, positions, the group's fp16 per-channel key scale and zero
// point) and of full-precision residual runs. Nothing is dequantized into a copy of
// the cache: a key group's scale and zero fold into the queries once per group,
//   q . (c * s + z) = (q * s) . c + q . z,
// so a key costs one unpack of its codes and a dot per query; a value row is
// dequantized once for the whole group of queries. Two passes as in paged_decode.cpp
// (scores, one softmax, values); rows run in parallel. The inner loops are plain
// loops over head_dim that the compiler vectorises (-O3 -march=native -ffast-math).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

struct Format {
  int64_t d, bits, value_group;
  int64_t fp_dtype;       // residual K/V: 0 float32, 1 bfloat16, 2 float16
  int64_t position_size;  // 2 (int16) or 4 (int32)
};

// A quantized key group of one row: `count` entries.
struct QuantRun {
  const uint8_t* keys;       // [count, d * bits / 8] packed codes
  const uint8_t* values;     // [count, value row bytes]
  const uint8_t* positions;  // [count] int16 / int32
  const uint8_t* key_scale;  // [d] fp16
  const uint8_t* key_zero;   // [d] fp16
  int64_t count;
};

// Full-precision entries of one row, contiguous.
struct FullRun {
  const uint8_t* keys;  // [count, d]
  const uint8_t* values;
  const uint8_t* positions;
  int64_t count;
};

inline float half_at(const uint8_t* p) {
  at::Half h;
  std::memcpy(&h, p, 2);
  return static_cast<float>(h);
}

inline int64_t position_at(const uint8_t* p, int64_t j, int64_t size) {
  if (size == 2) {
    int16_t v;
    std::memcpy(&v, p + 2 * j, 2);
    return v;
  }
  int32_t v;
  std::memcpy(&v, p + 4 * j, 4);
  return v;
}

// Planar codes (store/quantize.py's pack): byte i holds channels i, i + m, i + 2m, ...
// from its low bits up, m = d * BITS / 8.
template <int BITS>
inline void unpack_row(const uint8_t* __restrict bytes, int64_t d, float* __restrict out) {
  constexpr int per = 8 / BITS, mask = (1 << BITS) - 1;
  const int64_t m = d / per;
  for (int k = 0; k < per; ++k) {
    for (int64_t i = 0; i < m; ++i) out[k * m + i] = static_cast<float>((bytes[i] >> (k * BITS)) & mask);
  }
}

inline void load_full(const uint8_t* src, int64_t dtype, int64_t d, float* __restrict out) {
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

inline float dot(const float* __restrict a, const float* __restrict b, int64_t d) {
  float s = 0.f;
  for (int64_t i = 0; i < d; ++i) s += a[i] * b[i];
  return s;
}

inline void axpy(float w, const float* __restrict x, float* __restrict y, int64_t d) {
  for (int64_t i = 0; i < d; ++i) y[i] += w * x[i];
}

// Attention of one row's `group` queries [group, d] (unscaled) over its runs into out
// [group, d]. masked=false promises every entry is older than q_pos and inside any window.
// BITS and D (0: head_dim known only at run time) are template arguments so that the
// loops over a key or value row have a constant trip count and vectorise fully.
template <int BITS, int D>
void attend_row(const float* q_in, float* out, const std::vector<QuantRun>& quant, const std::vector<FullRun>& full,
                const Format& F, int64_t group, int64_t q_pos, int64_t window, bool masked, float scale) {
  const float neg_inf = -1e30f;  // finite: the file is built with -ffast-math
  const int64_t d = D ? D : F.d, key_bytes = d * BITS / 8, value_groups = d / F.value_group;
  const int64_t row_bytes = key_bytes + 4 * value_groups, esize = F.fp_dtype == 0 ? 4 : 2;
  int64_t n = 0;
  for (const auto& r : quant) n += r.count;
  for (const auto& r : full) n += r.count;
  std::vector<float> q(group * d), qs(group * d), bias(group), acc(group * d, 0.f), p(group * std::max<int64_t>(n, 1)),
      row(d), ks(d), kz(d);
  for (int64_t i = 0; i < group * d; ++i) q[i] = q_in[i] * scale;
  auto hidden = [&](const uint8_t* positions, int64_t j) {
    if (!masked) return false;
    const int64_t pos = position_at(positions, j, F.position_size);
    return pos > q_pos || (window > 0 && q_pos - pos >= window);
  };

  // Pass 1: scores.
  int64_t t = 0;
  for (const auto& r : quant) {
    for (int64_t i = 0; i < d; ++i) {
      ks[i] = half_at(r.key_scale + 2 * i);
      kz[i] = half_at(r.key_zero + 2 * i);
    }
    for (int64_t g = 0; g < group; ++g) {
      for (int64_t i = 0; i < d; ++i) qs[g * d + i] = q[g * d + i] * ks[i];
      bias[g] = dot(q.data() + g * d, kz.data(), d);
    }
    for (int64_t j = 0; j < r.count; ++j, ++t) {
      unpack_row<BITS>(r.keys + j * key_bytes, d, row.data());
      const bool off = hidden(r.positions, j);
      for (int64_t g = 0; g < group; ++g) p[g * n + t] = off ? neg_inf : bias[g] + dot(qs.data() + g * d, row.data(), d);
    }
  }
  for (const auto& r : full) {
    for (int64_t j = 0; j < r.count; ++j, ++t) {
      load_full(r.keys + j * d * esize, F.fp_dtype, d, row.data());
      const bool off = hidden(r.positions, j);
      for (int64_t g = 0; g < group; ++g) p[g * n + t] = off ? neg_inf : dot(q.data() + g * d, row.data(), d);
    }
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

  // Pass 2: values, each row dequantized once and added to every query's accumulator.
  t = 0;
  for (const auto& r : quant) {
    for (int64_t j = 0; j < r.count; ++j, ++t) {
      const uint8_t* v = r.values + j * row_bytes;
      unpack_row<BITS>(v, d, row.data());
      for (int64_t k = 0; k < value_groups; ++k) {
        const float vs = half_at(v + key_bytes + 2 * k), vz = half_at(v + key_bytes + 2 * (value_groups + k));
        for (int64_t i = k * F.value_group; i < (k + 1) * F.value_group; ++i) row[i] = row[i] * vs + vz;
      }
      for (int64_t g = 0; g < group; ++g) axpy(p[g * n + t], row.data(), acc.data() + g * d, d);
    }
  }
  for (const auto& r : full) {
    for (int64_t j = 0; j < r.count; ++j, ++t) {
      load_full(r.values + j * d * esize, F.fp_dtype, d, row.data());
      for (int64_t g = 0; g < group; ++g) axpy(p[g * n + t], row.data(), acc.data() + g * d, d);
    }
  }
  for (int64_t g = 0; g < group; ++g) {
    for (int64_t i = 0; i < d; ++i) {
      out[g * d + i] = acc[g * d + i] * inv[g];
    }
  }
}

using RowKernel = void (*)(const float*, float*, const std::vector<QuantRun>&, const std::vector<FullRun>&,
                          const Format&, int64_t, int64_t, int64_t, bool, float);

template <int BITS>
RowKernel row_kernel_for(int64_t d) {
  return d == 64 ? attend_row<BITS, 64> : d == 128 ? attend_row<BITS, 128> : attend_row<BITS, 0>;
}

RowKernel row_kernel(const Format& F) {
  TORCH_CHECK(F.bits == 2 || F.bits == 4 || F.bits == 8, "bits must be 2, 4 or 8, got ", F.bits);
  return F.bits == 2 ? row_kernel_for<2>(F.d) : F.bits == 4 ? row_kernel_for<4>(F.d) : row_kernel_for<8>(F.d);
}

// Every row of query [rows, group, d] through the kernel, in parallel: runs(r, quant,
// full) lists row r's runs into the two (cleared) lists.
template <typename Runs>
void attend_rows(const torch::Tensor& query, torch::Tensor& out, const Format& F, const torch::Tensor& query_positions,
                 int64_t window, bool masked, double scale, Runs runs) {
  const int64_t group = query.size(1), d = query.size(2);
  const int64_t* qp = query_positions.data_ptr<int64_t>();
  const float* q = query.data_ptr<float>();
  float* o = out.data_ptr<float>();
  const RowKernel kernel = row_kernel(F);
  at::parallel_for(0, query.size(0), 1, [&](int64_t begin, int64_t end) {
    std::vector<QuantRun> quant;
    std::vector<FullRun> full;
    for (int64_t r = begin; r < end; ++r) {
      quant.clear();
      full.clear();
      runs(r, quant, full);
      kernel(q + r * group * d, o + r * group * d, quant, full, F, group, qp[r], window, masked,
             static_cast<float>(scale));
    }
  });
}

void check_int64_rows(std::initializer_list<const torch::Tensor*> tensors, int64_t rows, const char* what) {
  for (const auto* t : tensors) {
    TORCH_CHECK(t->scalar_type() == torch::kInt64 && t->is_contiguous() && t->size(0) == rows, what,
                ": contiguous int64, one row per query row");
  }
}

int64_t fp_dtype_code(const torch::Tensor& t) {
  switch (t.scalar_type()) {
    case torch::kFloat: return 0;
    case torch::kBFloat16: return 1;
    case torch::kHalf: return 2;
    default: TORCH_CHECK(false, "full-precision K/V must be float32, bfloat16 or float16");
  }
  return 0;
}

torch::Tensor check_query(const torch::Tensor& query) {
  TORCH_CHECK(query.dim() == 3 && query.is_contiguous() && query.scalar_type() == torch::kFloat,
              "query must be a contiguous float32 [rows, group, d]");
  return torch::empty_like(query);
}

}  // namespace

// The engine's page arena (store/quantized_block_pool.py), several stores (one per
// sequence) of `heads` rows each, their tables read in place (no stacking). query [stores
// x heads, group, d] float32; arena [pages, page bytes] uint8; per store: q_table /
// q_count [heads, Wq] int64 (-1 / 0 past a head's pages), fp_table [heads, Wf] int64,
// fp_off / fp_len [heads] int64; query_positions [stores x heads] int64; layout: group,
// block_size, bits, value_group, page_bytes, q_values, q_positions, q_scale, fp_values,
// fp_positions, fp_dtype. Returns [stores x heads, group, d] float32.
torch::Tensor quantized_paged_decode(torch::Tensor query, torch::Tensor arena, std::vector<torch::Tensor> q_tables,
                                     std::vector<torch::Tensor> q_counts, std::vector<torch::Tensor> fp_tables,
                                     std::vector<torch::Tensor> fp_offs, std::vector<torch::Tensor> fp_lens,
                                     torch::Tensor query_positions, std::vector<int64_t> layout, double scale,
                                     int64_t window, bool masked) {
  auto out = check_query(query);
  TORCH_CHECK(arena.scalar_type() == torch::kUInt8 && arena.is_contiguous() && arena.dim() == 2, "arena: uint8 pages");
  TORCH_CHECK(layout.size() == 11, "layout has 11 fields");
  const int64_t key_group = layout[0], block_size = layout[1], page_bytes = layout[4];
  const int64_t q_values = layout[5], q_positions = layout[6], q_scale = layout[7];
  const int64_t fp_values = layout[8], fp_positions = layout[9];
  TORCH_CHECK(page_bytes == arena.size(1), "layout and arena disagree on the page size");
  const int64_t stores = static_cast<int64_t>(q_tables.size()), d = query.size(2);
  TORCH_CHECK(stores > 0 && q_counts.size() == q_tables.size() && fp_tables.size() == q_tables.size() &&
                  fp_offs.size() == q_tables.size() && fp_lens.size() == q_tables.size(),
              "one q_table, q_count, fp_table, fp_off and fp_len per store");
  const int64_t heads = q_tables[0].size(0), rows = stores * heads;
  TORCH_CHECK(query.size(0) == rows, "query has ", query.size(0), " rows, the stores ", rows);
  check_int64_rows({&query_positions}, rows, "query positions");
  const Format F{d, layout[2], layout[3], layout[10], 4};
  const int64_t esize = F.fp_dtype == 0 ? 4 : 2;
  const int64_t pages = arena.size(0);
  for (int64_t s = 0; s < stores; ++s) {
    check_int64_rows({&q_tables[s], &q_counts[s], &fp_tables[s], &fp_offs[s], &fp_lens[s]}, heads,
                     "a store's tables, counts, offsets and lengths");
    const int64_t q_width = q_tables[s].size(1), fp_width = fp_tables[s].size(1);
    TORCH_CHECK(q_counts[s].size(1) == q_width, "store ", s, ": q_table and q_count differ in width");
    const int64_t* qt = q_tables[s].data_ptr<int64_t>();
    const int64_t* qc = q_counts[s].data_ptr<int64_t>();
    const int64_t* ft = fp_tables[s].data_ptr<int64_t>();
    const int64_t* fo = fp_offs[s].data_ptr<int64_t>();
    const int64_t* fl = fp_lens[s].data_ptr<int64_t>();
    for (int64_t h = 0; h < heads; ++h) {
      for (int64_t c = 0; c < q_width; ++c) {
        TORCH_CHECK(qt[h * q_width + c] < pages && (qt[h * q_width + c] < 0 || qc[h * q_width + c] <= key_group),
                    "store ", s, " head ", h, ": a quantized page outside the arena or holding more than a group");
      }
      TORCH_CHECK(fo[h] >= 0 && fl[h] >= 0 && fo[h] + fl[h] <= fp_width * block_size, "store ", s, " head ", h,
                  ": the residual outgrows its table");
      for (int64_t c = 0; c < (fo[h] + fl[h] + block_size - 1) / block_size; ++c) {
        TORCH_CHECK(ft[h * fp_width + c] >= 0 && ft[h * fp_width + c] < pages, "store ", s, " head ", h,
                    ": a residual page is missing");
      }
    }
  }
  const uint8_t* base = arena.data_ptr<uint8_t>();
  attend_rows(query, out, F, query_positions, window, masked, scale,
              [&](int64_t r, std::vector<QuantRun>& quant, std::vector<FullRun>& full) {
                const int64_t s = r / heads, h = r % heads;
                const int64_t q_width = q_tables[s].size(1), fp_width = fp_tables[s].size(1);
                const int64_t* qt = q_tables[s].data_ptr<int64_t>() + h * q_width;
                const int64_t* qc = q_counts[s].data_ptr<int64_t>() + h * q_width;
                const int64_t* ft = fp_tables[s].data_ptr<int64_t>() + h * fp_width;
                const int64_t fo = fp_offs[s].data_ptr<int64_t>()[h], fl = fp_lens[s].data_ptr<int64_t>()[h];
                for (int64_t c = 0; c < q_width; ++c) {
                  if (qt[c] < 0) continue;
                  const uint8_t* p = base + qt[c] * page_bytes;
                  quant.push_back({p, p + q_values, p + q_positions, p + q_scale, p + q_scale + 2 * d, qc[c]});
                }
                // The residual's entries [fp_off, fp_off + fp_len) of its pages, one run per page.
                for (int64_t e = fo; e < fo + fl;) {
                  const int64_t w = e % block_size, count = std::min(block_size - w, fo + fl - e);
                  const uint8_t* p = base + ft[e / block_size] * page_bytes;
                  full.push_back({p + w * d * esize, p + fp_values + w * d * esize, p + fp_positions + 4 * w, count});
                  e += count;
                }
              });
  return out;
}

// The HF path's flat store (store/quantized_kv.py): three FlatKVs, each head's entries
// at [starts[r], starts[r] + lengths[r]) of its buffers. codes: key codes [slots, d *
// bits / 8] uint8, value rows [slots, bytes] uint8, positions [slots] int16 / int32;
// groups: scale and zero [group slots, d] fp16, live entries per group [group slots]
// int32 (a head's groups cover its codes in order); residual: keys and values [slots,
// d], positions. starts / lengths / query_positions [rows] int64. Returns [rows, group, d].
torch::Tensor quantized_flat_decode(torch::Tensor query, torch::Tensor key_codes, torch::Tensor value_rows,
                                    torch::Tensor positions, torch::Tensor starts, torch::Tensor lengths,
                                    torch::Tensor key_scale, torch::Tensor key_zero, torch::Tensor group_counts,
                                    torch::Tensor group_starts, torch::Tensor group_lengths, torch::Tensor r_keys,
                                    torch::Tensor r_values, torch::Tensor r_positions, torch::Tensor r_starts,
                                    torch::Tensor r_lengths, torch::Tensor query_positions, int64_t bits,
                                    int64_t value_group, double scale, int64_t window, bool masked) {
  auto out = check_query(query);
  const int64_t rows = query.size(0), d = query.size(2);
  check_int64_rows({&starts, &lengths, &group_starts, &group_lengths, &r_starts, &r_lengths, &query_positions}, rows,
                   "starts, lengths and query positions");
  for (const auto* t : {&key_codes, &value_rows}) {
    TORCH_CHECK(t->scalar_type() == torch::kUInt8 && t->is_contiguous() && t->dim() == 2, "codes: uint8 rows");
  }
  TORCH_CHECK(key_codes.size(1) == d * bits / 8 && value_rows.size(1) == d * bits / 8 + 4 * (d / value_group),
              "code rows do not match head_dim ", d, " at ", bits, " bits");
  for (const auto* t : {&key_scale, &key_zero}) {
    TORCH_CHECK(t->scalar_type() == torch::kHalf && t->is_contiguous() && t->size(1) == d, "key scales: fp16 [groups, d]");
  }
  TORCH_CHECK(group_counts.scalar_type() == torch::kInt && group_counts.is_contiguous(), "group counts: int32");
  TORCH_CHECK(r_keys.is_contiguous() && r_values.is_contiguous() && r_keys.size(1) == d &&
              r_keys.scalar_type() == r_values.scalar_type(), "residual: contiguous [slots, d] keys and values");
  TORCH_CHECK(positions.scalar_type() == r_positions.scalar_type() &&
              (positions.scalar_type() == torch::kShort || positions.scalar_type() == torch::kInt),
              "positions: int16 or int32, the same for codes and residual");
  const Format F{d, bits, value_group, fp_dtype_code(r_keys), positions.element_size()};
  const int64_t esize = r_keys.element_size(), key_bytes = key_codes.size(1), row_bytes = value_rows.size(1);
  const int64_t* st = starts.data_ptr<int64_t>();
  const int64_t* ln = lengths.data_ptr<int64_t>();
  const int64_t* gs = group_starts.data_ptr<int64_t>();
  const int64_t* gl = group_lengths.data_ptr<int64_t>();
  const int64_t* rs = r_starts.data_ptr<int64_t>();
  const int64_t* rl = r_lengths.data_ptr<int64_t>();
  const int32_t* counts = group_counts.data_ptr<int32_t>();
  for (int64_t r = 0; r < rows; ++r) {
    TORCH_CHECK(st[r] >= 0 && ln[r] >= 0 && st[r] + ln[r] <= key_codes.size(0) && st[r] + ln[r] <= positions.size(0),
                "row ", r, ": codes outside their buffer");
    TORCH_CHECK(gs[r] >= 0 && gl[r] >= 0 && gs[r] + gl[r] <= key_scale.size(0) && gs[r] + gl[r] <= group_counts.size(0),
                "row ", r, ": key groups outside their buffer");
    TORCH_CHECK(rs[r] >= 0 && rl[r] >= 0 && rs[r] + rl[r] <= r_keys.size(0) && rs[r] + rl[r] <= r_positions.size(0),
                "row ", r, ": residual outside its buffer");
    int64_t covered = 0;
    for (int64_t k = gs[r]; k < gs[r] + gl[r]; ++k) covered += counts[k];
    TORCH_CHECK(covered == ln[r], "row ", r, ": key groups cover ", covered, " entries, the codes hold ", ln[r]);
  }
  const uint8_t* kc = key_codes.data_ptr<uint8_t>();
  const uint8_t* vr = value_rows.data_ptr<uint8_t>();
  const uint8_t* pos = static_cast<const uint8_t*>(positions.data_ptr());
  const uint8_t* ksc = static_cast<const uint8_t*>(key_scale.data_ptr());
  const uint8_t* kze = static_cast<const uint8_t*>(key_zero.data_ptr());
  const uint8_t* rk = static_cast<const uint8_t*>(r_keys.data_ptr());
  const uint8_t* rv = static_cast<const uint8_t*>(r_values.data_ptr());
  const uint8_t* rp = static_cast<const uint8_t*>(r_positions.data_ptr());
  const int64_t psize = F.position_size;
  attend_rows(query, out, F, query_positions, window, masked, scale,
              [&](int64_t r, std::vector<QuantRun>& quant, std::vector<FullRun>& full) {
                int64_t e = st[r];
                for (int64_t k = gs[r]; k < gs[r] + gl[r]; ++k) {
                  if (counts[k] == 0) continue;
                  quant.push_back({kc + e * key_bytes, vr + e * row_bytes, pos + e * psize, ksc + k * 2 * d,
                                   kze + k * 2 * d, counts[k]});
                  e += counts[k];
                }
                if (rl[r]) full.push_back({rk + rs[r] * d * esize, rv + rs[r] * d * esize, rp + rs[r] * psize, rl[r]});
              });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("quantized_paged_decode", &quantized_paged_decode,
        "decode attention over KIVI-quantized pages and a full-precision residual");
  m.def("quantized_flat_decode", &quantized_flat_decode,
        "decode attention over a flat KIVI-quantized store and its full-precision residual");
}
