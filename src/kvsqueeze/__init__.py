"""kvsqueeze: per-head KV-cache compression with real memory savings."""

from kvsqueeze.policy import Budget, Policy, make_policy, policy_names

__all__ = ["Budget", "Policy", "make_policy", "policy_names"]
__version__ = "0.1.0"
