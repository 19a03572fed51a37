"""autoplan.search: the strategy space and the ILP and DP solvers that pick a Plan.

`autoplan.search(...)` is both this package and the function that searches: the package's
module is callable (search_plan), so `autoplan.search("llama3-8b", cluster=..., global_batch=...)`
returns a Plan while `autoplan.search.ilp` stays importable.
"""

import sys
import types

from autoplan.search.front import no_plan_message, search_plan, search_workload, trainer_plan
from autoplan.search.report import describe, result_json, search_tables
from autoplan.search.search import Searcher, SearchOptions, SearchResult
from autoplan.search.space import divisors, parse_fix

__all__ = ["search_plan", "search_workload", "no_plan_message", "Searcher", "SearchOptions",
           "SearchResult", "describe", "result_json", "search_tables", "divisors", "parse_fix",
           "trainer_plan"]


class _CallableModule(types.ModuleType):
    def __call__(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN204
        return search_plan(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
