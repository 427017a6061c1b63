// kvsqueeze's CPU kernels, one file each, bound to Python in module.cpp.
#pragma once
#include <torch/extension.h>

#include <vector>

torch::Tensor paged_decode(torch::Tensor query, torch::Tensor keys, torch::Tensor values, torch::Tensor positions,
                           std::vector<torch::Tensor> tables, std::vector<torch::Tensor> lengths,
                           torch::Tensor query_positions, double scale, int64_t window, bool masked);

torch::Tensor next_slots(std::vector<torch::Tensor> tables, std::vector<torch::Tensor> lengths, int64_t block_size);

torch::Tensor rms_norm_bf16(torch::Tensor x, torch::Tensor weight, double eps);
torch::Tensor silu_mul_bf16(torch::Tensor gate_up);
torch::Tensor rope_bf16(torch::Tensor x, torch::Tensor cos, torch::Tensor sin);
