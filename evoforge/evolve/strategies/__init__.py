"""Search strategies (`search.strategy` in the run file): ga (default), cmaes, random; see `base.py`."""

from evoforge.evolve.strategies import cmaes, ga, random
from evoforge.evolve.strategies.base import STRATEGIES, Proposal, Result, SearchStrategy, make, register

__all__ = ["STRATEGIES", "Proposal", "Result", "SearchStrategy", "cmaes", "ga", "make", "random", "register"]
