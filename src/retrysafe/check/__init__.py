"""``retrysafe check``: point it at a live endpoint, in any language, and learn rule by rule
of the contract whether retries against it are safe.

:mod:`.plan` holds the checks as data, :mod:`.runner` sends their requests, :mod:`.report`
prints and writes the results, :mod:`.cli` is the subcommand. Only the runner needs httpx.
"""

from .plan import CHECKS, Check, Outcome, Plan, Result, Target, make_plan

__all__ = ["CHECKS", "Check", "Outcome", "Plan", "Result", "Target", "make_plan"]
