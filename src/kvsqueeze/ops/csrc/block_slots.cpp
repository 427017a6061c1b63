// Where each head's next entry goes, for a decode step over many stores: slot
// table[h, n / block_size] * block_size + n % block_size for every head's length n.
// In Python this was a handful of tensor operations per store, per layer, per step.
#include "kernels.h"

torch::Tensor next_slots(std::vector<torch::Tensor> tables, std::vector<torch::Tensor> lengths, int64_t block_size) {
  TORCH_CHECK(tables.size() == lengths.size(), "one table per lengths tensor");
  int64_t total = 0;
  for (const auto& l : lengths) total += l.numel();
  auto slots = torch::empty({total}, torch::kInt64);
  int64_t* out = slots.data_ptr<int64_t>();
  for (size_t s = 0; s < tables.size(); ++s) {
    const auto& table = tables[s];
    TORCH_CHECK(table.scalar_type() == torch::kInt32 && table.is_contiguous() && !table.is_cuda(), "tables: int32 host");
    TORCH_CHECK(lengths[s].scalar_type() == torch::kInt64 && lengths[s].is_contiguous(), "lengths: int64 host");
    const int32_t* t = table.data_ptr<int32_t>();
    const int64_t* n = lengths[s].data_ptr<int64_t>();
    const int64_t heads = lengths[s].numel(), width = table.size(1);
    TORCH_CHECK(table.size(0) == heads, "store ", s, ": table and lengths differ in heads");
    for (int64_t h = 0; h < heads; ++h) {
      const int64_t column = n[h] / block_size;
      TORCH_CHECK(column < width && t[h * width + column] >= 0, "store ", s, " head ", h, " has no room for its next entry");
      *out++ = static_cast<int64_t>(t[h * width + column]) * block_size + n[h] % block_size;
    }
  }
  return slots;
}
