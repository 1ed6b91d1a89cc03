"""Item generators of the multilingual tasks: number words (num2words) and CLDR terms (babel), with
`numbers_key` (one number-word question in any wording) and `is_echo` (items a model answers by copying).

One module per domain (code, math, multilingual, structured data) keeps each domain's templates and sources
together; scripts/task_registry.py lists the tasks they feed.
"""

from __future__ import annotations

import random
import re
import unicodedata
from collections.abc import Iterator

from task_prompts import Doc, render_prompt, tasklib

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
