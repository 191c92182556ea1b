"""The comparison report: several initializations probed on one model, on one self-contained HTML page."""

from initscope.report.compare import CompareResult, compare, parse_methods

__all__ = ["CompareResult", "compare", "parse_methods"]
