"""The study report: one self-contained HTML file built from plain data (no torch, optuna, mlflow).

write_report(ReportInputs(...), "reports/digits.html")
"""

from workbench.report.inputs import ModelSection, ReportInputs, TrialRow
from workbench.report.render import render_report, write_report

__all__ = ["ModelSection", "ReportInputs", "TrialRow", "render_report", "write_report"]
