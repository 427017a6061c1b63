// Block bookkeeping of a decode step, over many stores (one per sequence) at once.
// In Python each was a handful of tensor operations per store, per layer, per step:
// at 32 sequences that was a quarter of a decode step.
#include "kernels.h"

#include <cstring>

namespace {

void check_store(const torch::Tensor& table, const torch::Tensor& lengths, const torch::Tensor& owned, size_t s) {
  TORCH_CHECK(table.scalar_type() == torch::kInt32 && table.is_contiguous() && !table.is_cuda(), "tables: int32 host");
  TORCH_CHECK(lengths.scalar_type() == torch::kInt64 && lengths.is_contiguous(), "lengths: int64 host");
  TORCH_CHECK(owned.scalar_type() == torch::kInt64 && owned.is_contiguous() && owned.numel() == lengths.numel(),
              "num_blocks: int64 per head");
  TORCH_CHECK(table.size(0) == lengths.numel(), "store ", s, ": table and lengths differ in heads");
}

}  // namespace

int64_t blocks_needed(std::vector<torch::Tensor> lengths, std::vector<torch::Tensor> num_blocks, int64_t n_tokens,
                      int64_t block_size) {
  TORCH_CHECK(lengths.size() == num_blocks.size(), "one num_blocks per lengths tensor");
  int64_t total = 0;
  for (size_t s = 0; s < lengths.size(); ++s) {
    const int64_t* n = lengths[s].data_ptr<int64_t>();
    const int64_t* b = num_blocks[s].data_ptr<int64_t>();
    for (int64_t h = 0; h < lengths[s].numel(); ++h) {
      const int64_t need = (n[h] + n_tokens + block_size - 1) / block_size - b[h];
      if (need > 0) total += need;
    }
  }
  return total;
}

torch::Tensor append_decode(torch::Tensor pool_keys, torch::Tensor pool_values, torch::Tensor pool_positions,
                            std::vector<torch::Tensor> tables, std::vector<torch::Tensor> num_blocks,
                            std::vector<torch::Tensor> host_lengths, std::vector<torch::Tensor> lengths,
                            torch::Tensor keys, torch::Tensor values, torch::Tensor positions, torch::Tensor spare) {
  const size_t stores = tables.size();
  TORCH_CHECK(num_blocks.size() == stores && host_lengths.size() == stores && lengths.size() == stores,
              "one table, num_blocks and lengths per store");
  TORCH_CHECK(positions.scalar_type() == torch::kInt64 && positions.numel() == static_cast<int64_t>(stores),
              "positions: int64, one per store");
  TORCH_CHECK(keys.scalar_type() == pool_keys.scalar_type() && values.scalar_type() == pool_values.scalar_type(),
              "keys and values in the pool's dtype");
  TORCH_CHECK(keys.is_contiguous() && values.is_contiguous() && pool_keys.is_contiguous() && pool_values.is_contiguous(),
              "contiguous keys, values and pool");
  TORCH_CHECK(spare.scalar_type() == torch::kInt32 && spare.is_contiguous(), "spare: int32 block ids");
  const int64_t block_size = pool_keys.size(1), d = pool_keys.size(2);
  // A head whose last block is full needs a block first. With too few spare ids, or a
  // table with no free column for one, say which heads (store-major rows), write nothing.
  std::vector<int64_t> full;
  bool room = true;
  int64_t rows = 0;
  for (size_t s = 0; s < stores; ++s) {
    check_store(tables[s], host_lengths[s], num_blocks[s], s);
    const int64_t* n = host_lengths[s].data_ptr<int64_t>();
    const int64_t* b = num_blocks[s].data_ptr<int64_t>();
    for (int64_t h = 0; h < host_lengths[s].numel(); ++h, ++rows) {
      if (n[h] >= b[h] * block_size) {
        full.push_back(rows);
        room = room && b[h] < tables[s].size(1);
      }
    }
  }
  TORCH_CHECK(keys.size(0) == rows && values.size(0) == rows && keys.size(1) == d, "keys/values: [heads, d]");
  if (!full.empty() && (!room || spare.numel() < static_cast<int64_t>(full.size())))
    return torch::tensor(full, torch::kInt64);
  // Hand the spare ids to the full heads in row order (as one allocation across the stores would).
  const int32_t* id = spare.data_ptr<int32_t>();
  for (size_t s = 0; s < stores && !full.empty(); ++s) {
    int32_t* t = tables[s].data_ptr<int32_t>();
    int64_t* b = num_blocks[s].data_ptr<int64_t>();
    const int64_t* n = host_lengths[s].data_ptr<int64_t>();
    for (int64_t h = 0; h < host_lengths[s].numel(); ++h)
      if (n[h] >= b[h] * block_size) t[h * tables[s].size(1) + b[h]++] = *id++;
  }
  const int64_t row_bytes = d * keys.element_size();
  char* pk = static_cast<char*>(pool_keys.data_ptr());
  char* pv = static_cast<char*>(pool_values.data_ptr());
  int32_t* pp = pool_positions.data_ptr<int32_t>();
  const char* k = static_cast<const char*>(keys.data_ptr());
  const char* v = static_cast<const char*>(values.data_ptr());
  const int64_t* pos = positions.data_ptr<int64_t>();
  int64_t row = 0;
  for (size_t s = 0; s < stores; ++s) {
    const int32_t* t = tables[s].data_ptr<int32_t>();
    const int64_t width = tables[s].size(1);
    int64_t* n = host_lengths[s].data_ptr<int64_t>();
    TORCH_CHECK(lengths[s].scalar_type() == torch::kInt64 && lengths[s].is_contiguous() && !lengths[s].is_cuda(),
                "lengths: int64 host");
    int64_t* mirror = lengths[s].data_ptr<int64_t>();
    const bool aliased = mirror == n;  // on the CPU the device lengths may be the host tensor itself
    for (int64_t h = 0; h < host_lengths[s].numel(); ++h, ++row) {
      const int64_t slot = static_cast<int64_t>(t[h * width + n[h] / block_size]) * block_size + n[h] % block_size;
      std::memcpy(pk + slot * row_bytes, k + row * row_bytes, row_bytes);
      std::memcpy(pv + slot * row_bytes, v + row * row_bytes, row_bytes);
      pp[slot] = static_cast<int32_t>(pos[s]);
      ++n[h];
      if (!aliased) ++mirror[h];
    }
  }
  return torch::empty({0}, torch::kInt64);
}
