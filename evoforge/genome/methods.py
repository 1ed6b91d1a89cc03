"""A gene's methods, one registry per gene: each method is one typed entry, found by name, citing its paper.

In the style of mergekit's `@merge_method(name=..., reference_url=...)`, except that a second entry under a
name already taken is refused (mergekit's registry silently replaces the first). Registration order is the
order of the seeds' method triples, and every registered method is one a mutation can flip to.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar


@dataclass(frozen=True)
class Method:
    """What every gene's method declares: its name in a genome, what it is in mergekit, and its paper."""

    name: str
    """The gene's value in a genome and its part of a seed label, e.g. `dare`."""
    mergekit: tuple[str, ...]
    """mergekit `merge_method`s it renders to (the first) and is parsed back from (any)."""
    reference_url: str


M = TypeVar("M", bound=Method)

FLIP_SHARE = 0.25
"""A mutation flips a gene's method with probability FLIP_SHARE × mutation_rate: another method changes the
whole merge, so it is the rarest edit."""


class Registry(Generic[M]):
    """One gene's methods by name, in registration order."""

    def __init__(self, gene: str) -> None:
        self.gene = gene
        self.entries: dict[str, M] = {}

    def register(self, method: M) -> M:
        """Add a method; a name already registered is an error, not a silent replacement."""
        if method.name in self.entries:
            raise ValueError(
                f"{self.gene} method {method.name!r} is already registered "
                f"({self.entries[method.name].reference_url}); pick another name"
            )
        self.entries[method.name] = method
        return method

    def __getitem__(self, name: str) -> M:
        try:
            return self.entries[name]
        except KeyError:
            raise ValueError(f"{name!r} is not a {self.gene} method; registered: {self.listing()}") from None

    def __iter__(self) -> Iterator[M]:
        return iter(self.entries.values())

    def names(self) -> tuple[str, ...]:
        return tuple(self.entries)

    def listing(self, names: Sequence[str] | None = None) -> str:
        """`a, b or c`: the registered names (or the given ones) for an error message."""
        items = list(self.entries if names is None else names)
        return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " or " + items[-1]

    def require(self, name: str) -> str:
        """`name` when registered, else ValueError (a gene's `method` validator)."""
        return self[name].name

    def from_mergekit(self, merge_method: object) -> M | None:
        """The first registered method a mergekit `merge_method` parses back to."""
        return next((m for m in self if merge_method in m.mergekit), None)

    def mergekit_names(self) -> list[str]:
        """Every mergekit method the gene's methods render to, once each, in registration order."""
        return list(dict.fromkeys(name for m in self for name in m.mergekit))

    def flip(self, method: str, rng: random.Random, rate: float) -> str:
        """With probability FLIP_SHARE × `rate` (the mutation rate) another method: the other one of two (one
        draw in all), or a uniform choice among the others of three or more."""
        flipped = rng.random() < FLIP_SHARE * rate
        others = [name for name in self.entries if name != method]
        if not flipped or not others:
            return method
        return others[0] if len(others) == 1 else rng.choice(others)


def vote(values: Sequence[str], order: Sequence[int]) -> str:
    """Majority vote; a tie goes to the fittest parent's value (`order`: parents, fittest first)."""
    counts = Counter(values)
    best = max(counts.values())
    return next(values[k] for k in order if counts[values[k]] == best)
