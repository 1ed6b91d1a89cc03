"""evoforge: evolve merges of language models, as an extension layer on mergekit and lm-eval-harness."""

from evoforge.config import BaseModelConfig, EvolutionConfig

__all__ = ["BaseModelConfig", "EvolutionConfig"]
__version__ = "0.1.0"
