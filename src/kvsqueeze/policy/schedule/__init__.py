"""Layer schedules: how the mean per-head budget is split over a model's layers."""

from kvsqueeze.policy.schedule.base import LayerSchedule
from kvsqueeze.policy.schedule.flat import FlatSchedule
from kvsqueeze.policy.schedule.pyramid import PyramidSchedule

SCHEDULES: dict[str, type] = {"flat": FlatSchedule, "pyramid": PyramidSchedule}

__all__ = ["SCHEDULES", "FlatSchedule", "LayerSchedule", "PyramidSchedule"]
