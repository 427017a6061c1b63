// Software prefetch of a run of bf16 values, shared by the kernels that read scattered
// blocks (paged_decode.cpp) or tiles (amx_linear.cpp): the hardware prefetcher loses
// the stream at every jump, so the next run is asked for while this one is read.
#pragma once
#include <cstdint>

#if defined(__SSE__)
#include <immintrin.h>

inline void prefetch_block(const void* block, int64_t bf16_elements) {
  const char* bytes = static_cast<const char*>(block);
  for (int64_t off = 0; off < bf16_elements * 2; off += 64) _mm_prefetch(bytes + off, _MM_HINT_T0);
}
#endif
