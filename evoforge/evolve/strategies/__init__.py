"""Search strategies (`search.strategy` in the run file): ga (default), ga-async, cmaes, cmaes-async, random;
see `base.py`."""

from evoforge.evolve.strategies import cmaes, cmaes_async, ga, ga_async, random
from evoforge.evolve.strategies.base import STRATEGIES, Proposal, Result, SearchStrategy, make, register

__all__ = [
    "STRATEGIES",
    "Proposal",
    "Result",
    "SearchStrategy",
    "cmaes",
    "cmaes_async",
    "ga",
    "ga_async",
    "make",
    "random",
    "register",
]
