"""Measuring: prefill and decode speed per policy, peak memory, memory bandwidth."""
