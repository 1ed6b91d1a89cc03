"""evoforge: evolve merges of language models, as an extension layer on mergekit and lm-eval-harness.

`from evoforge import EvoMergePipeline, EvolutionConfig, BaseModelConfig` is the Python API; the pipeline
(and with it torch, mergekit, lm-eval) is imported on first use so that `import evoforge` stays light.
"""

from typing import TYPE_CHECKING, Any

from evoforge.config import BaseModelConfig, EvolutionConfig

if TYPE_CHECKING:
    from evoforge.pipeline import BestCandidate, EvoMergePipeline

__all__ = ["BaseModelConfig", "BestCandidate", "EvoMergePipeline", "EvolutionConfig"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in ("EvoMergePipeline", "BestCandidate"):
        from evoforge import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'evoforge' has no attribute {name!r}")
