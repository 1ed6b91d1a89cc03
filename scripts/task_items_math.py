"""Item generators of the math tasks (math_arith, math_gsm, math_multilingual) and `arith_key`, which makes
one bare-arithmetic question asked in any wording or language one item.

One module per domain (code, math, multilingual, structured data) keeps each domain's templates and sources
together; scripts/task_registry.py lists the tasks they feed.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator

from task_prompts import Doc, prompt_key, render_prompt

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
