"""Adapter analysis: spectra, energy, effective and stable rank, intruder dimensions, overlap between adapters.

report = lk.analyze("out/adapter", base="smollm2-135m")
print(report.summary()); report.save("out/adapter/analysis")   # analysis.json + PNG plots
"""

from lorakit.analysis.report import AnalysisReport, ModuleReport
from lorakit.analysis.run import analyze

__all__ = ["AnalysisReport", "ModuleReport", "analyze"]
