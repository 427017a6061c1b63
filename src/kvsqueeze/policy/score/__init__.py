"""Scorers: which tokens matter, per (sequence, kv-head)."""

from kvsqueeze.policy.score.base import ScoreInput, Scorer, attention_probs
from kvsqueeze.policy.score.chunkkv import ChunkKVScorer
from kvsqueeze.policy.score.criticalkv import CriticalKVScorer
from kvsqueeze.policy.score.defensivekv import DefensiveKVScorer
from kvsqueeze.policy.score.expected_attention import ExpectedAttentionScorer
from kvsqueeze.policy.score.h2o import H2OScorer
from kvsqueeze.policy.score.knorm import KNormScorer
from kvsqueeze.policy.score.kvzip import KVzipScorer, ReconstructionChunk
from kvsqueeze.policy.score.random_baseline import RandomScorer
from kvsqueeze.policy.score.snapkv import SnapKVScorer
from kvsqueeze.policy.score.streamingllm import StreamingLLMScorer
from kvsqueeze.policy.score.tova import TOVAScorer
from kvsqueeze.policy.score.tova_head import TOVAHeadScorer

SCORERS: dict[str, type] = {
    "snapkv": SnapKVScorer,
    "h2o": H2OScorer,
    "streamingllm": StreamingLLMScorer,
    "knorm": KNormScorer,
    "tova": TOVAScorer,
    "tova-head": TOVAHeadScorer,
    "random": RandomScorer,
    "chunkkv": ChunkKVScorer,
    "expected-attention": ExpectedAttentionScorer,
    "kvzip": KVzipScorer,
    "criticalkv": CriticalKVScorer,
    "defensivekv": DefensiveKVScorer,
}

__all__ = [
    "SCORERS",
    "ChunkKVScorer",
    "CriticalKVScorer",
    "DefensiveKVScorer",
    "ExpectedAttentionScorer",
    "H2OScorer",
    "KNormScorer",
    "KVzipScorer",
    "RandomScorer",
    "ReconstructionChunk",
    "ScoreInput",
    "Scorer",
    "SnapKVScorer",
    "StreamingLLMScorer",
    "TOVAHeadScorer",
    "TOVAScorer",
    "attention_probs",
]
