#include "kernels.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode", &paged_decode, "decode attention over per-head blocks of a pool");
  m.def("blocks_needed", &blocks_needed, "blocks many stores' heads must take to grow by n tokens each");
  m.def("append_decode", &append_decode, "write one entry into every head of many stores (full heads take spare block ids), or name the full heads");
  m.def("rms_norm", &rms_norm, "Llama RMSNorm of bf16 or fp32 rows, rounded as transformers rounds");
  m.def("silu_mul", &silu_mul, "silu(gate) * up of a fused [T, 2I] bf16 or fp32 gate/up projection");
  m.def("amx_linear_available", &amx_linear_available, "whether this build and OS run amx_linear");
  m.def("amx_linear", &amx_linear, "x W^T + b for a few bf16 rows on AMX tiles, W packed by pack_amx_weight");
  m.def("rope", &rope, "rotate-half RoPE of bf16 or fp32 [T, heads, d] by cos/sin [T, 1, d/2]");
}
