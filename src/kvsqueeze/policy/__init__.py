"""Policies: pure tensor functions deciding which KV entries each head keeps."""

from kvsqueeze.policy.budget import Budget
from kvsqueeze.policy.names import PolicyName, parse_policy_name, policy_names
from kvsqueeze.policy.policy import Policy
from kvsqueeze.policy.presets import make_policy
from kvsqueeze.policy.score import ScoreInput

__all__ = ["Budget", "Policy", "PolicyName", "ScoreInput", "make_policy", "parse_policy_name", "policy_names"]
