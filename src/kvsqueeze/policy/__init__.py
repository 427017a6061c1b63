"""Policies: pure tensor functions deciding which KV entries each head keeps."""

from kvsqueeze.policy.budget import Budget
from kvsqueeze.policy.policy import Policy
from kvsqueeze.policy.presets import make_policy, policy_names
from kvsqueeze.policy.score import ScoreInput

__all__ = ["Budget", "Policy", "ScoreInput", "make_policy", "policy_names"]
