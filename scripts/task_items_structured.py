"""Item generators of the structured-data tasks: Faker person records as JSON, YAML or CSV text, to read a
field of (structured_lookup) or convert to JSON (structured_json).

One module per domain (code, math, multilingual, structured data) keeps each domain's templates and sources
together; scripts/task_registry.py lists the tasks they feed.
"""

from __future__ import annotations

import csv
import io
import json
import random
from collections.abc import Iterator
from typing import TYPE_CHECKING

import yaml
from task_prompts import Doc

if TYPE_CHECKING:
    from faker import Faker


def _faker(rng: random.Random) -> Faker:
    from faker import Faker

    fake = Faker("en_US")
    fake.seed_instance(rng.randrange(2**31))
    return fake


_FIELDS = ("age", "city", "company", "email", "id", "job", "name")
_SHORT_FIELDS = ("age", "city", "email", "id", "name")


def _record(fake: Faker, rng: random.Random, keys: list[str]) -> dict[str, object]:
    """A person record with one-line values for `keys`, in that order."""
    full = {
        "name": fake.name(),
        "age": rng.randint(18, 90),
        "city": fake.city(),
        "email": fake.email(),
        "job": fake.job(),
        "company": fake.company(),
        "id": rng.randint(1000, 9999),
    }
    return {k: full[k] for k in keys}


def _csv_text(rows: list[dict[str, object]]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue().rstrip("\n")


def _render(records: list[dict[str, object]], fmt: str, inline: bool) -> str:
    """Records as JSON, YAML or CSV text that parses back to the same values (checked)."""
    if fmt == "json":
        value = records[0] if len(records) == 1 else records
        text = json.dumps(value, ensure_ascii=False, indent=None if inline else 2)
        assert json.loads(text) == value
    elif fmt == "yaml":
        value = records[0] if len(records) == 1 else records
        style = {"default_flow_style": True, "width": 10**6} if inline else {"default_flow_style": False}
        text = yaml.safe_dump(value, sort_keys=False, allow_unicode=True, **style).strip()
        assert yaml.safe_load(text) == value
    else:
        text = _csv_text(records)
        parsed = list(csv.DictReader(io.StringIO(text)))
        assert [{k: str(v) for k, v in r.items()} for r in records] == parsed
        if inline:
            header, *rows = text.split("\n")
            text = f"header `{header}` and row `{rows[0]}`"
    return text


def structured_lookup(rng: random.Random) -> Iterator[Doc]:
    """Read one field of a one-line JSON, YAML or CSV record of 3-4 short fields (JSON half the time)."""
    fake = _faker(rng)
    while True:
        record = _record(fake, rng, rng.sample(_SHORT_FIELDS, rng.randint(3, 4)))
        fmt = rng.choice(["json", "json", "yaml", "csv"])
        key = rng.choice(sorted(record))
        kind = {"json": "JSON record", "yaml": "YAML record", "csv": "CSV data with"}[fmt]
        question = f"Given the {kind} {_render([record], fmt, inline=True)}, what is the {key}?"
        yield {"question": question, "answer": str(record[key]), "format": fmt}


def structured_json(rng: random.Random) -> Iterator[Doc]:
    """Turn a multi-line JSON/YAML/CSV record or 3-row table into a one-line JSON object with named keys."""
    fake = _faker(rng)
    while True:
        fmt = rng.choice(["json", "yaml", "csv"])
        if rng.random() < 0.5:
            record = _record(fake, rng, rng.sample(_FIELDS, rng.randint(4, 5)))
            chosen = rng.sample(list(record), 2)
            data = _render([record], fmt, inline=False)
            expected = {k: record[k] for k in chosen}
            ask = (
                f"Convert this {fmt.upper()} record into a JSON object with only the keys {_quoted(chosen)}."
            )
        else:
            keys = ["name", *rng.sample([f for f in _FIELDS if f != "name"], 3)]
            records = [_record(fake, rng, keys) for _ in range(3)]
            target = rng.choice(records)
            chosen = rng.sample(keys[1:], 2)
            data = _render(records, fmt, inline=False)
            expected = {k: target[k] for k in chosen}
            ask = (
                f"In this {fmt.upper()} data, find the entry whose name is {target['name']} and give a JSON "
                f"object with only its keys {_quoted(chosen)}."
            )
        question = f"{ask} Write the JSON on one line.\n{data}"
        yield {"question": question, "answer": json.dumps(expected, ensure_ascii=False), "format": fmt}


def _quoted(keys: list[str]) -> str:
    return " and ".join(f'"{k}"' for k in keys)
