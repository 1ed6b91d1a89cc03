"""Merge execution: recipes to model folders through mergekit, and the pre-merge compatibility check."""

from evoforge.errors import ModelNotAvailableError
from evoforge.merge.compat import check_compatibility, resolve_model
from evoforge.merge.disk import merge_options, merge_recipe, validate_recipe

__all__ = [
    "ModelNotAvailableError",
    "check_compatibility",
    "merge_options",
    "merge_recipe",
    "resolve_model",
    "validate_recipe",
]
