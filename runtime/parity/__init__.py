"""The cross-backend parity harness: does a deployment compute what the reference computes, and where not?

    from runtime import parity
    result = parity.compare("cpu", ["ascend-910b", "nvidia-h100"], emulate=True)
    result.passed; result.report["results"][0]["blame"]; result.write("parity-out")

`python -m runtime.parity --reference cpu --candidate ascend-910b --emulate --out DIR` does the same from the
shell. Modules: compare.py (runs, rows, verdicts, localisation, three-way, repeatability), harness.py (one
side's run), metrics.py, tolerances.py + tolerances.yaml, report.py + html.py + svg.py (the reports),
report.schema.json (the JSON report's schema).
"""

from .compare import DEFAULT_PROMPTS, ParityResult, compare, load_prompts
from .tolerances import Tolerances, load_tolerances

__all__ = ["DEFAULT_PROMPTS", "ParityResult", "Tolerances", "compare", "load_prompts", "load_tolerances"]
