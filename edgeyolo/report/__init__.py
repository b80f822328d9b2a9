"""The optimisation report: every (model x target x image size) side by side by accuracy, speed and memory."""

from .pareto import pareto_front
from .runner import ReportConfig, run_report

__all__ = ["ReportConfig", "pareto_front", "run_report"]
