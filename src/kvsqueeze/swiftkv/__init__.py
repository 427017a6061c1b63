"""SwiftKV (arXiv 2410.03960) as a model of its own: importing this package registers
its config and model with AutoConfig / AutoModelForCausalLM, so a converted or
distilled checkpoint folder loads with `from_pretrained` (no trust_remote_code)."""

from kvsqueeze.swiftkv.config import SwiftKVLlamaConfig
from kvsqueeze.swiftkv.convert import convert
from kvsqueeze.swiftkv.modeling import SwiftKVLlamaForCausalLM

__all__ = ["SwiftKVLlamaConfig", "SwiftKVLlamaForCausalLM", "convert"]
