"""Search strategies (`search.strategy` in the run file): ga (default), ga-async, cmaes, random; see `base.py`."""

from evoforge.evolve.strategies import cmaes, ga, ga_async, random
from evoforge.evolve.strategies.base import STRATEGIES, Proposal, Result, SearchStrategy, make, register

__all__ = [
    "STRATEGIES",
    "Proposal",
    "Result",
    "SearchStrategy",
    "cmaes",
    "ga",
    "ga_async",
    "make",
    "random",
    "register",
]
