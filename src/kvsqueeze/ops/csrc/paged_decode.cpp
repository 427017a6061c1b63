// Decode attention straight out of the block pool, on the CPU.
//
// One query token per sequence: each (sequence, kv-head) row walks its own blocks
// (its block table) twice: it scores every entry against the row's GQA group of
// queries, takes one softmax over the scores, then accumulates the values. No gather
// of the cache, no padding, no mask tensor: every byte of K/V is read once, in its
// storage dtype, and converted to fp32 in registers. Rows run in parallel.
#include "kernels.h"
#include "prefetch.h"  // blocks lie scattered over the pool: the next is prefetched (1.7x with shuffled blocks)
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

namespace {

// Per-thread scratch, grown as needed and kept across rows: a step of many short rows
// (Ada-KV's heads) paid several allocations per row for its few small arrays.
inline float* scratch(int slot, size_t n) {
  thread_local std::vector<float> buffers[8];
  if (buffers[slot].size() < n) buffers[slot].resize(n);
  return buffers[slot].data();
}

inline void load_row(const float* src, float* dst, int64_t d) { std::memcpy(dst, src, d * sizeof(float)); }

inline void load_row(const at::BFloat16* src, float* dst, int64_t d) {
  // bf16 is the high half of an fp32: a shift, which the compiler vectorizes.
  const uint16_t* bits = reinterpret_cast<const uint16_t*>(src);
  for (int64_t i = 0; i < d; ++i) {
    uint32_t u = static_cast<uint32_t>(bits[i]) << 16;
    float f;
    std::memcpy(&f, &u, sizeof(f));
    dst[i] = f;
  }
}

inline void load_row(const at::Half* src, float* dst, int64_t d) {
  for (int64_t i = 0; i < d; ++i) dst[i] = static_cast<float>(src[i]);
}

inline void store_row(const float* src, float* dst, int64_t d) { std::memcpy(dst, src, d * sizeof(float)); }

template <typename T>
inline void store_row(const float* src, T* dst, int64_t d) {
  for (int64_t i = 0; i < d; ++i) dst[i] = static_cast<T>(src[i]);
}

// Scores -> unnormalized weights exp(s - max), in place; returns 1 / their sum, or 0
// when nothing was visible (every score at neg_inf: an empty head gets zeros, as the
// reference gives). A plain loop the compiler vectorizes, exp included (libmvec).
inline float softmax_in_place(float* p, int64_t n, float neg_inf) {
  float top = neg_inf;
  for (int64_t t = 0; t < n; ++t) top = std::max(top, p[t]);
  if (top <= neg_inf) {
    for (int64_t t = 0; t < n; ++t) p[t] = 0.f;
    return 0.f;
  }
  float sum = 0.f;
  for (int64_t t = 0; t < n; ++t) {
    p[t] = std::exp(p[t] - top);
    sum += p[t];
  }
  return 1.f / sum;
}

#if defined(__AVX512F__) && defined(__AVX512BF16__)
// The hot case on CPUs with AVX512-BF16 (Sapphire Rapids and later), bf16 K/V with a
// head dim that is a multiple of 32. A score is two vdpbf16ps per 64 dims: the bf16
// products are exact in fp32, so a bf16 query (the model's own dtype) loses nothing and
// the scale is applied to the sums. 16 keys' partial dots are summed across lanes together
// (sum16); values accumulate in fp32 as in the AVX2 path, 16 lanes at a time.

// 16 vectors of 16 partial sums -> the 16 totals, in order: four rounds of pairwise
// shuffles and adds instead of a horizontal reduction per vector.
inline __m512 sum16(const float* v) {
  auto at = [v](int i) { return _mm512_loadu_ps(v + 16 * i); };
  __m512 r[8], s[4], t[2];
  for (int k = 0; k < 8; ++k) {  // pairs within 64-bit halves
    const __m512 a = at(2 * k), b = at(2 * k + 1);
    r[k] = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
  }
  for (int k = 0; k < 4; ++k) {  // within 128-bit lanes: lane L holds 4 vectors' sums over L
    const __m512d a = _mm512_castps_pd(r[2 * k]), b = _mm512_castps_pd(r[2 * k + 1]);
    s[k] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  for (int k = 0; k < 2; ++k) {  // across 128-bit lanes
    t[k] = _mm512_add_ps(_mm512_shuffle_f32x4(s[2 * k], s[2 * k + 1], 0x88),
                         _mm512_shuffle_f32x4(s[2 * k], s[2 * k + 1], 0xDD));
  }
  return _mm512_add_ps(_mm512_shuffle_f32x4(t[0], t[1], 0x88), _mm512_shuffle_f32x4(t[0], t[1], 0xDD));
}

template <int D>
void attend_row_bf16(const uint16_t* q, int terms, float scale, float* out, const uint16_t* keys, const uint16_t* values,
                     const int32_t* positions, const int32_t* table, int64_t length, int64_t group,
                     int64_t block_size, int64_t q_pos, int64_t window, bool masked) {
  constexpr int C = D / 32;  // 512-bit chunks of 32 bf16 per row
  const float neg_inf = -1e30f;
  float* p = scratch(0, group * length);
  float* partial = scratch(1, group * 16 * 16);
  float* acc = scratch(2, group * 2 * C * 16);
  std::fill(acc, acc + group * 2 * C * 16, 0.f);
  const __m512 scale_v = _mm512_set1_ps(scale);
  const int64_t blocks = (length + block_size - 1) / block_size;
  int filled = 0;  // keys whose partial dots wait in `partial` (the row's latest ones)
  auto flush = [&](int64_t next) {  // sum the waiting keys' partials into their scores
    const __mmask16 live = static_cast<__mmask16>((1u << filled) - 1);
    for (int64_t g = 0; g < group; ++g) {
      float* part = &partial[g * 256];
      for (int j = filled; j < 16; ++j) _mm512_storeu_ps(part + 16 * j, _mm512_setzero_ps());
      _mm512_mask_storeu_ps(p + g * length + next - filled, live, _mm512_mul_ps(sum16(part), scale_v));
    }
    filled = 0;
  };
  for (int64_t b = 0, t0 = 0; t0 < length; ++b, t0 += block_size) {
    const int64_t base = static_cast<int64_t>(table[b]) * block_size;
    const int64_t n = std::min(block_size, length - t0);
    // Two blocks ahead (one is too little to hide the latency of a jump); past the
    // last keys, the value pass's first blocks.
    if (b + 2 < blocks) prefetch_block(keys + static_cast<int64_t>(table[b + 2]) * block_size * D, block_size * D);
    else if (b + 2 - blocks < blocks) prefetch_block(values + static_cast<int64_t>(table[b + 2 - blocks]) * block_size * D, block_size * D);
    for (int64_t j = 0; j < n; ++j) {
      const uint16_t* row = keys + (base + j) * D;
      __m512i k[C];
      for (int c = 0; c < C; ++c) k[c] = _mm512_loadu_si512(row + 32 * c);
      for (int64_t g = 0; g < group; ++g) {
        __m512 s = _mm512_setzero_ps();
        for (int term = 0; term < terms; ++term) {
          const uint16_t* qg = q + (g * terms + term) * D;
          for (int c = 0; c < C; ++c) {
            const __m512i qc = _mm512_loadu_si512(qg + 32 * c);
            s = _mm512_dpbf16_ps(s, reinterpret_cast<const __m512bh&>(qc), reinterpret_cast<const __m512bh&>(k[c]));
          }
        }
        _mm512_storeu_ps(&partial[(g * 16 + filled) * 16], s);
      }
      if (++filled == 16) flush(t0 + j + 1);
    }
    if (masked) {
      if (filled) flush(t0 + n);
      for (int64_t j = 0; j < n; ++j) {
        const int64_t pos = positions[base + j];
        if (pos > q_pos || (window > 0 && q_pos - pos >= window)) {
          for (int64_t g = 0; g < group; ++g) p[g * length + t0 + j] = neg_inf;
        }
      }
    }
  }
  if (filled) flush(length);
  float* inv = scratch(5, group);
  for (int64_t g = 0; g < group; ++g) inv[g] = softmax_in_place(p + g * length, length, neg_inf);
  const __m512i high = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  for (int64_t b = 0, t0 = 0; t0 < length; ++b, t0 += block_size) {
    const int64_t base = static_cast<int64_t>(table[b]) * block_size;
    const int64_t n = std::min(block_size, length - t0);
    if (b + 2 < blocks) prefetch_block(values + static_cast<int64_t>(table[b + 2]) * block_size * D, block_size * D);
    for (int64_t g = 0; g < group; ++g) {
      // Even elements of a 32-bf16 chunk are its 32-bit lanes shifted up, the odd ones masked.
      __m512 ae[C], ao[C];
      for (int c = 0; c < C; ++c) {
        ae[c] = _mm512_loadu_ps(&acc[((g * 2) * C + c) * 16]);
        ao[c] = _mm512_loadu_ps(&acc[((g * 2 + 1) * C + c) * 16]);
      }
      const float* pg = p + g * length + t0;
      for (int64_t j = 0; j < n; ++j) {
        const __m512 w = _mm512_set1_ps(pg[j]);
        const uint16_t* row = values + (base + j) * D;
        for (int c = 0; c < C; ++c) {
          const __m512i raw = _mm512_loadu_si512(row + 32 * c);
          ae[c] = _mm512_fmadd_ps(w, _mm512_castsi512_ps(_mm512_slli_epi32(raw, 16)), ae[c]);
          ao[c] = _mm512_fmadd_ps(w, _mm512_castsi512_ps(_mm512_and_si512(raw, high)), ao[c]);
        }
      }
      for (int c = 0; c < C; ++c) {
        _mm512_storeu_ps(&acc[((g * 2) * C + c) * 16], ae[c]);
        _mm512_storeu_ps(&acc[((g * 2 + 1) * C + c) * 16], ao[c]);
      }
    }
  }
  for (int64_t g = 0; g < group; ++g) {
    for (int c = 0; c < C; ++c) {
      for (int l = 0; l < 16; ++l) {
        out[g * D + c * 32 + 2 * l] = acc[((g * 2) * C + c) * 16 + l] * inv[g];
        out[g * D + c * 32 + 2 * l + 1] = acc[((g * 2 + 1) * C + c) * 16 + l] * inv[g];
      }
    }
  }
}
#elif defined(__AVX2__) && defined(__FMA__)
// The hot case, bf16 K/V with a head dim that is a multiple of 16, in AVX2. A bf16 is
// the high half of an fp32, so 16 bf16 loaded as 8 32-bit lanes give the even
// elements as floats by a shift and the odd ones by a mask: no shuffles. The query is
// split the same way (even, odd), so dots and the value sums need no reordering
// until the very end. Scores of 8 entries are summed across lanes together (hadd).
inline __m256 bf16_even(__m256i raw) { return _mm256_castsi256_ps(_mm256_slli_epi32(raw, 16)); }
inline __m256 bf16_odd(__m256i raw) {
  return _mm256_castsi256_ps(_mm256_and_si256(raw, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
}

// Eight vectors of partial dots -> the eight totals, in order.
inline __m256 sum_lanes8(const float* s) {
  auto at = [s](int i) { return _mm256_loadu_ps(s + 8 * i); };
  const __m256 a = _mm256_hadd_ps(_mm256_hadd_ps(at(0), at(1)), _mm256_hadd_ps(at(2), at(3)));
  const __m256 b = _mm256_hadd_ps(_mm256_hadd_ps(at(4), at(5)), _mm256_hadd_ps(at(6), at(7)));
  return _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
}

inline float sum_lanes(__m256 v) {
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  return _mm_cvtss_f32(_mm_add_ss(x, _mm_movehdup_ps(x)));
}

template <int D>
void attend_row_bf16(const float* q, float* out, const uint16_t* keys, const uint16_t* values,
                     const int32_t* positions, const int32_t* table, int64_t length, int64_t group,
                     int64_t block_size, int64_t q_pos, int64_t window, bool masked) {
  constexpr int C = D / 16;  // 256-bit chunks of 16 bf16 per row
  const float neg_inf = -1e30f;
  // Vectors kept in float arrays (8 floats each), in the thread's scratch: a step of
  // Ada-KV's many short rows paid for eight allocations a row.
  float* qe = scratch(0, group * C * 8);
  float* qo = scratch(1, group * C * 8);
  float* acc = scratch(2, group * 2 * C * 8);
  std::fill(acc, acc + group * 2 * C * 8, 0.f);
  for (int64_t g = 0; g < group; ++g) {
    for (int c = 0; c < C; ++c) {
      for (int l = 0; l < 8; ++l) {
        qe[(g * C + c) * 8 + l] = q[g * D + c * 16 + 2 * l];
        qo[(g * C + c) * 8 + l] = q[g * D + c * 16 + 2 * l + 1];
      }
    }
  }
  float* p = scratch(3, group * length);
  float* partial = scratch(4, group * block_size * 8);
  const int64_t blocks = (length + block_size - 1) / block_size;
  for (int64_t b = 0, t0 = 0; t0 < length; ++b, t0 += block_size) {
    const int64_t base = static_cast<int64_t>(table[b]) * block_size;
    const int64_t n = std::min(block_size, length - t0);
    // The block two ahead (past the last keys, the values' first blocks), a key's worth
    // of lines with each key: a burst of a whole block's prefetches stalls the loads.
    const uint16_t* ahead = b + 2 < blocks ? keys + static_cast<int64_t>(table[b + 2]) * block_size * D
                            : b + 2 - blocks < blocks ? values + static_cast<int64_t>(table[b + 2 - blocks]) * block_size * D
                                                      : nullptr;
    for (int64_t j = 0; j < n; ++j) {
      if (ahead != nullptr) prefetch_block(ahead + j * D, D);
      // The key is converted once, then dotted with every query of the group.
      const __m256i* row = reinterpret_cast<const __m256i*>(keys + (base + j) * D);
      __m256 ke[C], ko[C];
      for (int c = 0; c < C; ++c) {
        const __m256i raw = _mm256_loadu_si256(row + c);
        ke[c] = bf16_even(raw);
        ko[c] = bf16_odd(raw);
      }
      for (int64_t g = 0; g < group; ++g) {
        __m256 s = _mm256_setzero_ps();
        for (int c = 0; c < C; ++c) {
          s = _mm256_fmadd_ps(_mm256_loadu_ps(&qe[(g * C + c) * 8]), ke[c], s);
          s = _mm256_fmadd_ps(_mm256_loadu_ps(&qo[(g * C + c) * 8]), ko[c], s);
        }
        _mm256_storeu_ps(&partial[(g * block_size + j) * 8], s);
      }
    }
    for (int64_t g = 0; g < group; ++g) {
      const float* part = &partial[g * block_size * 8];
      float* pg = p + g * length + t0;
      int64_t j = 0;
      for (; j + 8 <= n; j += 8) _mm256_storeu_ps(pg + j, sum_lanes8(part + j * 8));
      for (; j < n; ++j) pg[j] = sum_lanes(_mm256_loadu_ps(part + j * 8));
    }
    if (masked) {
      for (int64_t j = 0; j < n; ++j) {
        const int64_t pos = positions[base + j];
        if (pos > q_pos || (window > 0 && q_pos - pos >= window)) {
          for (int64_t g = 0; g < group; ++g) p[g * length + t0 + j] = neg_inf;
        }
      }
    }
  }
  float* inv = scratch(5, group);
  for (int64_t g = 0; g < group; ++g) inv[g] = softmax_in_place(p + g * length, length, neg_inf);
  for (int64_t b = 0, t0 = 0; t0 < length; ++b, t0 += block_size) {
    const int64_t base = static_cast<int64_t>(table[b]) * block_size;
    const int64_t n = std::min(block_size, length - t0);
    const uint16_t* ahead = b + 2 < blocks ? values + static_cast<int64_t>(table[b + 2]) * block_size * D : nullptr;
    for (int64_t g = 0; g < group; ++g) {
      __m256 ae[C], ao[C];
      for (int c = 0; c < C; ++c) {
        ae[c] = _mm256_loadu_ps(&acc[((g * 2) * C + c) * 8]);
        ao[c] = _mm256_loadu_ps(&acc[((g * 2 + 1) * C + c) * 8]);
      }
      const float* pg = p + g * length + t0;
      for (int64_t j = 0; j < n; ++j) {
        if (g == 0 && ahead != nullptr) prefetch_block(ahead + j * D, D);
        const __m256 w = _mm256_set1_ps(pg[j]);
        const __m256i* row = reinterpret_cast<const __m256i*>(values + (base + j) * D);
        for (int c = 0; c < C; ++c) {
          const __m256i raw = _mm256_loadu_si256(row + c);
          ae[c] = _mm256_fmadd_ps(w, bf16_even(raw), ae[c]);
          ao[c] = _mm256_fmadd_ps(w, bf16_odd(raw), ao[c]);
        }
      }
      for (int c = 0; c < C; ++c) {
        _mm256_storeu_ps(&acc[((g * 2) * C + c) * 8], ae[c]);
        _mm256_storeu_ps(&acc[((g * 2 + 1) * C + c) * 8], ao[c]);
      }
    }
  }
  for (int64_t g = 0; g < group; ++g) {
    for (int c = 0; c < C; ++c) {
      for (int l = 0; l < 8; ++l) {
        out[g * D + c * 16 + 2 * l] = acc[((g * 2) * C + c) * 8 + l] * inv[g];
        out[g * D + c * 16 + 2 * l + 1] = acc[((g * 2 + 1) * C + c) * 8 + l] * inv[g];
      }
    }
  }
}
#endif

// One (sequence, kv-head) row: queries [group, d] at position q_pos over `length`
// entries in the blocks `table`. window <= 0: no sliding window. Two passes: every
// score of the row first (group x length floats stay in cache), one softmax over them
// (a loop the compiler vectorizes, exp included), then the values. D > 0 fixes the
// head dim at compile time (the common 64 and 128): the inner loops unroll fully.
template <int D, typename KV, typename Q>
void attend_row(const Q* query, Q* out, const KV* keys, const KV* values, const int32_t* positions,
                const int32_t* table, int64_t length, int64_t group, int64_t dim, int64_t block_size,
                int64_t q_pos, int64_t window, bool masked, float scale) {
  const int64_t d = D > 0 ? D : dim;
#if defined(__AVX512F__) && defined(__AVX512BF16__)
  if constexpr (std::is_same_v<KV, at::BFloat16> && D > 0 && D % 32 == 0) {
    // The query as bf16 terms [group, terms, D]: itself when the model runs in bf16; an
    // fp32 query as a bf16 head plus its bf16 remainder (16 bits of mantissa, not 8).
    constexpr int terms = std::is_same_v<Q, at::BFloat16> ? 1 : 2;
    at::BFloat16* qb = reinterpret_cast<at::BFloat16*>(scratch(3, group * terms * D));
    float* of = scratch(4, group * D);
    for (int64_t g = 0; g < group; ++g) {
      for (int i = 0; i < D; ++i) {
        const float x = static_cast<float>(query[g * D + i]);
        const at::BFloat16 head = static_cast<at::BFloat16>(x);
        qb[(g * terms) * D + i] = head;
        if (terms == 2) qb[(g * terms + 1) * D + i] = static_cast<at::BFloat16>(x - static_cast<float>(head));
      }
    }
    attend_row_bf16<D>(reinterpret_cast<const uint16_t*>(qb), terms, scale, of,
                       reinterpret_cast<const uint16_t*>(keys), reinterpret_cast<const uint16_t*>(values), positions,
                       table, length, group, block_size, q_pos, window, masked);
    for (int64_t g = 0; g < group; ++g) store_row(of + g * D, out + g * D, D);
    return;
  }
#elif defined(__AVX2__) && defined(__FMA__)
  if constexpr (std::is_same_v<KV, at::BFloat16> && D > 0 && D % 16 == 0) {
    float* qf = scratch(6, group * D);
    float* of = scratch(7, group * D);
    for (int64_t g = 0; g < group; ++g) {
      load_row(query + g * D, qf + g * D, D);
      for (int i = 0; i < D; ++i) qf[g * D + i] *= scale;
    }
    attend_row_bf16<D>(qf, of, reinterpret_cast<const uint16_t*>(keys),
                       reinterpret_cast<const uint16_t*>(values), positions, table, length, group, block_size, q_pos,
                       window, masked);
    for (int64_t g = 0; g < group; ++g) store_row(of + g * D, out + g * D, D);
    return;
  }
#endif
  // A finite "minus infinity": the file is built with -ffast-math, which assumes no infinities.
  const float neg_inf = -1e30f;
  std::vector<float> q(group * d), acc(group * d, 0.f), row(d), p(group * length);
  for (int64_t g = 0; g < group; ++g) {
    load_row(query + g * d, q.data() + g * d, d);
    for (int64_t i = 0; i < d; ++i) q[g * d + i] *= scale;
  }
  // Entry t of the row sits in slot j of block table[b], t = b * block_size + j (no
  // division per entry: a 64-bit divide costs more than the entry's arithmetic).
  for (int64_t b = 0, t = 0; t < length; ++b) {
   const int64_t base = static_cast<int64_t>(table[b]) * block_size;
   for (int64_t slot = base; slot < base + block_size && t < length; ++slot, ++t) {
    load_row(keys + slot * d, row.data(), d);
    for (int64_t g = 0; g < group; ++g) {
      const float* qg = q.data() + g * d;
      float s = 0.f;
      for (int64_t i = 0; i < d; ++i) s += qg[i] * row[i];
      p[g * length + t] = s;
    }
    if (masked) {
      const int64_t pos = positions[slot];
      if (pos > q_pos || (window > 0 && q_pos - pos >= window)) {
        for (int64_t g = 0; g < group; ++g) p[g * length + t] = neg_inf;
      }
    }
   }
  }
  std::vector<float> inv(group);
  for (int64_t g = 0; g < group; ++g) inv[g] = softmax_in_place(p.data() + g * length, length, neg_inf);
  for (int64_t b = 0, t = 0; t < length; ++b) {
   const int64_t base = static_cast<int64_t>(table[b]) * block_size;
   for (int64_t slot = base; slot < base + block_size && t < length; ++slot, ++t) {
    load_row(values + slot * d, row.data(), d);
    for (int64_t g = 0; g < group; ++g) {
      const float w = p[g * length + t];
      float* ag = acc.data() + g * d;
      for (int64_t i = 0; i < d; ++i) ag[i] += w * row[i];
    }
   }
  }
  for (int64_t g = 0; g < group; ++g) {
    float* ag = acc.data() + g * d;
    for (int64_t i = 0; i < d; ++i) ag[i] *= inv[g];
    store_row(ag, out + g * d, d);
  }
}


}  // namespace

// query [stores, heads, group, d]; tables[s] [heads, width_s] int32 and lengths[s]
// [heads] int64 (host) per store; query_positions [stores]; returns [stores, heads, group, d].
torch::Tensor paged_decode(torch::Tensor query, torch::Tensor keys, torch::Tensor values, torch::Tensor positions,
                           std::vector<torch::Tensor> tables, std::vector<torch::Tensor> lengths,
                           torch::Tensor query_positions, double scale, int64_t window, bool masked) {
  TORCH_CHECK(query.dim() == 4 && query.is_contiguous(), "query must be a contiguous [stores, heads, group, d]");
  TORCH_CHECK(keys.is_contiguous() && values.is_contiguous() && positions.is_contiguous(), "pool not contiguous");
  TORCH_CHECK(keys.scalar_type() == values.scalar_type(), "keys and values differ in dtype");
  const int64_t stores = query.size(0), heads = query.size(1), group = query.size(2), d = query.size(3);
  const int64_t block_size = keys.size(1);
  TORCH_CHECK(keys.size(2) == d, "query and pool head_dim differ");
  TORCH_CHECK(static_cast<int64_t>(tables.size()) == stores && static_cast<int64_t>(lengths.size()) == stores,
              "one block table and one lengths tensor per store");
  TORCH_CHECK(query_positions.numel() == stores, "one query position per store");
  std::vector<const int32_t*> table_ptr(stores);
  std::vector<int64_t> table_width(stores);
  std::vector<const int64_t*> length_ptr(stores);
  for (int64_t s = 0; s < stores; ++s) {
    TORCH_CHECK(tables[s].scalar_type() == torch::kInt32 && tables[s].is_contiguous(), "tables must be int32");
    TORCH_CHECK(lengths[s].scalar_type() == torch::kInt64 && lengths[s].is_contiguous(), "lengths must be int64");
    TORCH_CHECK(tables[s].size(0) == heads && lengths[s].numel() == heads, "store ", s, " has the wrong heads");
    table_ptr[s] = tables[s].data_ptr<int32_t>();
    table_width[s] = tables[s].size(1);
    length_ptr[s] = lengths[s].data_ptr<int64_t>();
    for (int64_t h = 0; h < heads; ++h) {
      TORCH_CHECK(length_ptr[s][h] <= table_width[s] * block_size, "store ", s, " head ", h, " outgrows its table");
    }
  }
  auto q_pos = query_positions.to(torch::kInt64).contiguous();
  const int64_t* q_pos_ptr = q_pos.data_ptr<int64_t>();
  // Split rows (a store's head each) among the threads by what they read, not by count:
  // under Ada-KV's budgets one head can hold ten times another's entries.
  constexpr int64_t kRowCost = 64;  // a row's fixed work, in entries
  std::vector<int64_t> cost(stores * heads + 1, 0);
  for (int64_t row = 0; row < stores * heads; ++row)
    cost[row + 1] = cost[row] + length_ptr[row / heads][row % heads] + kRowCost;
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), stores * heads));
  auto first_row = [&](int64_t part) {
    return static_cast<int64_t>(std::lower_bound(cost.begin(), cost.end() - 1, cost.back() * part / parts) - cost.begin());
  };
  auto out = torch::empty_like(query);
  const float scale_f = static_cast<float>(scale);
#define KVSQ_CASES(...)                              \
  AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)          \
  AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__)       \
  AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)
  AT_DISPATCH_SWITCH(keys.scalar_type(), "paged_decode_kv", KVSQ_CASES([&] {
    using KV = scalar_t;
    const KV* k = keys.data_ptr<KV>();
    const KV* v = values.data_ptr<KV>();
    const int32_t* pos = positions.data_ptr<int32_t>();
    AT_DISPATCH_SWITCH(query.scalar_type(), "paged_decode_q", KVSQ_CASES([&] {
      const scalar_t* q = query.data_ptr<scalar_t>();
      scalar_t* o = out.data_ptr<scalar_t>();
      at::parallel_for(0, parts, 1, [&](int64_t first_part, int64_t last_part) {
        const int64_t begin = first_row(first_part), end = first_row(last_part);
        for (int64_t row = begin; row < end; ++row) {
          const int64_t s = row / heads, h = row % heads;
          if (row + 1 < end) {  // the next row's first keys, asked for while this row runs
            const int64_t ns = (row + 1) / heads, nh = (row + 1) % heads;
            for (int64_t b = 0; b < 2 && b * block_size < length_ptr[ns][nh]; ++b)
              prefetch_block(k + static_cast<int64_t>(table_ptr[ns][nh * table_width[ns] + b]) * block_size * d,
                             block_size * d * static_cast<int64_t>(sizeof(KV)) / 2);
          }
          auto row_fn = d == 64 ? attend_row<64, KV, scalar_t>
                        : d == 128 ? attend_row<128, KV, scalar_t> : attend_row<0, KV, scalar_t>;
          row_fn(q + row * group * d, o + row * group * d, k, v, pos,
                                   table_ptr[s] + h * table_width[s], length_ptr[s][h], group, d, block_size,
                                   q_pos_ptr[s], window, masked, scale_f);
        }
      });
    }));
  }));
#undef KVSQ_CASES
  return out;
}
