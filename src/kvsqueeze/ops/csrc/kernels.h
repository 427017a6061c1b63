// kvsqueeze's CPU kernels, one file each, bound to Python in module.cpp.
#pragma once
#include <torch/extension.h>

#include <vector>

torch::Tensor paged_decode(torch::Tensor query, torch::Tensor keys, torch::Tensor values, torch::Tensor positions,
                           std::vector<torch::Tensor> tables, std::vector<torch::Tensor> lengths,
                           torch::Tensor query_positions, double scale, int64_t window, bool masked);

int64_t blocks_needed(std::vector<torch::Tensor> lengths, std::vector<torch::Tensor> num_blocks, int64_t n_tokens,
                      int64_t block_size);
torch::Tensor append_decode(torch::Tensor pool_keys, torch::Tensor pool_values, torch::Tensor pool_positions,
                            std::vector<torch::Tensor> tables, std::vector<torch::Tensor> num_blocks,
                            std::vector<torch::Tensor> host_lengths, std::vector<torch::Tensor> lengths,
                            torch::Tensor keys, torch::Tensor values, torch::Tensor positions, torch::Tensor spare);

torch::Tensor rms_norm(torch::Tensor x, torch::Tensor weight, double eps);
torch::Tensor silu_mul(torch::Tensor gate_up);
torch::Tensor rope(torch::Tensor x, torch::Tensor cos, torch::Tensor sin);

bool amx_linear_available();
torch::Tensor amx_linear(torch::Tensor x, torch::Tensor packed, c10::optional<torch::Tensor> bias);
