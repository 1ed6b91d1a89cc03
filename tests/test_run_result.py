"""What `evoforge run` prints when it ends: the best against the best base model and against the best seed
on held-out data, so a user sees at once whether the search added anything the seeds did not give."""

from __future__ import annotations

from evoforge.cli.run_cmds import result_lines
from evoforge.evaluate.stats import Interval
from evoforge.pipeline import BestCandidate


def _best(**changes: object) -> BestCandidate:
    values = {
        "id": "g019-c7-b900f06a",
        "label": "slerp-ties-dfs",
        "genome_hash": "b900f06aec83",
        "generation": 19,
        "overall_fitness": 0.8078,
        "heldout_fitness": 0.7700,
        "domain_scores": {},
        "heldout_domain_scores": {},
        "model_path": "runs/q/confirmed_best_model",
        "recipe_path": "runs/q/candidates/gen_19/g019-c7-b900f06a.yaml",
        "best_base_model": "structured",
        "best_base_fitness": 0.7547,
        "best_base_heldout": 0.7242,
        "heldout_gain_interval": (0.030, 0.066),
        "best_seed": "g000-c5-50376b56",
        "seed_gain": Interval(estimate=-0.0012, se=0.006, low=-0.0129, high=0.0108),
    }
    return BestCandidate(**{**values, **changes})


def test_the_best_seed_comparison_says_whether_the_search_gained_beyond_the_noise() -> None:
    lines = result_lines(_best(), "validation")
    assert lines[0].startswith("best g019-c7-b900f06a (slerp-ties-dfs): fitness 0.8078 (+7.0% vs structured)")
    assert "held-out gain +0.0458 in [+0.0300, +0.0660] (95%, paired over items)" in lines[0]
    assert lines[1] == (
        "vs best seed g000-c5-50376b56 on held-out: -0.0012 in [-0.0129, +0.0108] (95%, paired over items), "
        "within the noise: no gain over the seeds shown"
    )
    assert lines[2:] == ["model: runs/q/confirmed_best_model", f"recipe: {_best().recipe_path}"]
    real = _best(seed_gain=Interval(estimate=0.02, se=0.005, low=0.01, high=0.03))
    assert result_lines(real, "validation")[1].endswith("(95%, paired over items), beyond the noise")


def test_a_best_that_is_a_seed_or_lacks_held_out_items_is_said_so() -> None:
    seed = result_lines(_best(best_is_seed=True, seed_gain=None), "validation")
    assert seed[1] == "the best is the fittest seed: no gain over the seeds"
    bare = result_lines(
        _best(heldout_fitness=None, heldout_gain_interval=None, seed_gain=None, model_path=None), "validation"
    )
    assert bare[0].endswith("held-out nan") and bare[1] == "model: not written"
