"""Scoring of structured_json: the completion must contain a JSON object with exactly the gold keys and values."""

from __future__ import annotations

import json


def first_json_object(text: str) -> dict | None:
    """The first JSON object that parses in `text` (models often add words around it), or None."""
    decoder = json.JSONDecoder()
    start = text.find("{")
    while start != -1:
        try:
            value, _ = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            start = text.find("{", start + 1)
            continue
        if isinstance(value, dict):
            return value
        start = text.find("{", start + 1)
    return None


def score_json(doc: dict, results: list[str]) -> dict[str, float]:
    """lm-eval `process_results`: same keys, and each value equal as text (CSV gives no types: 54 == "54")."""
    found = first_json_object(results[0])
    gold = json.loads(doc["answer"])
    ok = found is not None and {k: str(v) for k, v in found.items()} == {k: str(v) for k, v in gold.items()}
    return {"json_match": float(ok)}
