"""A small, deterministic instruction dataset generated from templates.

Records use the Alpaca field layout (``instruction``, ``input``, ``output``) and come from
eleven task families, each with a consistent answer format, so a small model can learn the
patterns from about a hundred rows. All text is written for this project; nothing is copied.

    from loraplace.data.embedded import records
    rows = records(120)             # same rows on every call; records(240)[:120] == rows
    rows[0]["instruction"], rows[0]["input"], rows[0]["output"]
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable
from random import Random

NAME = "loraplace-embedded-v1"

Example = tuple[str, str, str]  # (instruction, input, output)

PEOPLE = ("Mira", "Tomas", "Aiko", "Dev", "Lena", "Omar", "Priya", "Jonah", "Sofia", "Kwame")
ITEMS = ("apple", "marble", "sticker", "pencil", "card", "shell", "stamp", "cookie", "coin")
WORDS = (
    "garden", "window", "planet", "silver", "rocket", "basket", "forest", "candle", "bridge",
    "pepper", "island", "lantern", "meadow", "tiger", "violin", "harbor", "pebble", "orange",
    "winter", "button", "castle", "jungle", "mirror", "needle", "rabbit", "saddle", "tunnel",
)  # fmt: skip
POSITIVE = ("delightful", "wonderful", "excellent", "cheerful", "brilliant", "lovely")
NEGATIVE = ("awful", "dreadful", "disappointing", "boring", "terrible", "gloomy")
SUBJECTS = ("The concert", "Our hotel room", "The new phone", "This book", "The lunch", "The trip")
GLOSSARY = {
    "gradient": "A gradient is the direction and rate in which a quantity changes fastest.",
    "overfitting": "Overfitting is when a model fits its training data so closely that it does worse on new data.",
    "tokenizer": "A tokenizer is a tool that splits text into the small units a language model reads.",
    "learning rate": "The learning rate is the step size an optimiser uses to update a model's weights.",
    "batch": "A batch is a group of examples processed together in one training step.",
    "epoch": "An epoch is one full pass of training over every example in a dataset.",
    "checkpoint": "A checkpoint is a saved copy of a model's weights at some point during training.",
    "adapter": "An adapter is a small set of extra weights added to a frozen model to learn a new task.",
    "perplexity": "Perplexity measures how surprised a language model is by a text; lower is better.",
    "embedding": "An embedding is a list of numbers that stands for a word, so similar words lie close.",
    "loss": "The loss is a number that measures how far a model's predictions are from the targets.",
    "validation set": "A validation set is data held back from training to check how a model generalises.",
    "quantisation": "Quantisation stores numbers with fewer bits to make a model smaller and faster.",
    "attention": "Attention lets each token weigh how much to draw on every other token.",
}
WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
SYLLABLES = ("vel", "tor", "an", "mar", "is", "ko", "ra", "len", "dun", "ess", "ol", "bri")
RIVERS = ("Osk", "Marren", "Tilde", "Vash", "Elwe", "Brann")
CRAFTS = ("glassblowing", "spice markets", "clock making", "tall bridges", "kite festivals")
JOBS = ("baker", "engineer", "teacher", "carpenter", "nurse", "painter", "pilot")
HOBBIES = ("chess", "hiking", "pottery", "birdwatching", "gardening", "astronomy")
JSON_FIELDS = {
    "colour": ("blue", "green", "amber", "grey"),
    "owner": PEOPLE,
    "city": ("Oslo", "Lima", "Accra", "Hanoi", "Quito"),
    "status": ("open", "closed", "pending"),
    "shape": ("round", "square", "oval"),
    "size": tuple(range(1, 50)),
    "count": tuple(range(0, 100)),
    "price": tuple(range(1, 500)),
}
CONVERSIONS: dict[str, tuple[str, str, str, Callable[[int], float]]] = {
    "km": ("miles", "miles = km × 0.621371", "{v} × 0.621371", lambda v: v * 0.621371),
    "miles": ("km", "km = miles × 1.609344", "{v} × 1.609344", lambda v: v * 1.609344),
    "°C": ("°F", "F = C × 9/5 + 32", "{v} × 9/5 + 32", lambda v: v * 9 / 5 + 32),
    "°F": ("°C", "C = (F - 32) × 5/9", "({v} - 32) × 5/9", lambda v: (v - 32) * 5 / 9),
}


def arithmetic(rng: Random) -> Example:
    name, item = rng.choice(PEOPLE), rng.choice(ITEMS)
    if rng.random() < 0.5:
        a, b = rng.randint(5, 60), rng.randint(2, 40)
        c = rng.randint(1, a + b - 1)
        question = (
            f"{name} has {a} {item}s, gets {b} more, and then gives away {c}. "
            f"How many {item}s does {name} have now?"
        )
        answer = f"{a} + {b} = {a + b}, and {a + b} - {c} = {a + b - c}. The answer is {a + b - c}."
    else:
        boxes, each = rng.randint(2, 12), rng.randint(2, 15)
        question = f"{name} fills {boxes} bags with {each} {item}s each. How many {item}s is that?"
        answer = f"{boxes} × {each} = {boxes * each}. The answer is {boxes * each}."
    return "Solve this word problem and show your working. " + question, "", answer


def sorting(rng: Random) -> Example:
    if rng.random() < 0.5:
        items = rng.sample(WORDS, rng.randint(3, 6))
        return (
            "Sort these words alphabetically.",
            ", ".join(items),
            "Sorted alphabetically: " + ", ".join(sorted(items)) + ".",
        )
    nums = rng.sample(range(1, 200), rng.randint(3, 7))
    desc = rng.random() < 0.5
    order = "largest to smallest" if desc else "smallest to largest"
    result = ", ".join(str(x) for x in sorted(nums, reverse=desc))
    return f"Sort these numbers from {order}.", ", ".join(map(str, nums)), f"Sorted: {result}."


def units(rng: Random) -> Example:
    unit = rng.choice(tuple(CONVERSIONS))
    target, formula, worked, convert = CONVERSIONS[unit]
    value = rng.randint(-30, 212) if "°" in unit else rng.randint(1, 300)
    result = f"{convert(value):.1f}"
    steps = worked.format(v=value)
    answer = f"Use {formula}: {steps} ≈ {result}. So {value} {unit} is about {result} {target}."
    if rng.random() < 0.5:
        return f"Convert {value} {unit} to {target}.", "", answer
    return f"Convert this value to {target}.", f"{value} {unit}", answer


def word_transform(rng: Random) -> Example:
    word = rng.choice(WORDS)
    ask, result = rng.choice(
        (("Reverse the letters of the word '{}'.", word[::-1]),
         ("Write the word '{}' in capital letters.", word.upper()),
         ("Capitalise the first letter of the word '{}'.", word.capitalize()))
    )  # fmt: skip
    return ask.format(word), "", f"'{word}' becomes '{result}'."


def count_letters(rng: Random) -> Example:
    word = rng.choice(WORDS)
    if rng.random() < 0.5:
        vowels = [ch for ch in word if ch in "aeiou"]
        answer = f"The word '{word}' has {len(vowels)} vowels: {', '.join(vowels)}."
        return "Count the vowels in this word.", word, answer
    letter = rng.choice(word + "aeist")
    n = word.count(letter)
    times = "time" if n == 1 else "times"
    question = f"How many times does the letter '{letter}' appear in '{word}'?"
    return question, "", f"The letter '{letter}' appears {n} {times} in '{word}'."


def sentiment(rng: Random) -> Example:
    positive = rng.random() < 0.5
    adjective = rng.choice(POSITIVE if positive else NEGATIVE)
    opener = rng.choice(("", "Honestly, ", "I think ", "To be fair, "))
    subject = rng.choice(SUBJECTS)
    subject = subject[0].lower() + subject[1:] if opener else subject
    sentence = f"{opener}{subject} was {rng.choice(('', 'really ', 'quite '))}{adjective}."
    label, tone = ("Positive", "a favourable") if positive else ("Negative", "an unfavourable")
    answer = f"{label}. The word '{adjective}' signals {tone} opinion."
    return "Classify the sentiment of this sentence as positive or negative.", sentence, answer


def definition(rng: Random) -> Example:
    term = rng.choice(sorted(GLOSSARY))
    ask = rng.choice(
        ("Define '{}' in one sentence.", "What does '{}' mean?", "Explain '{}' briefly.")
    )
    return ask.format(term), "", GLOSSARY[term]


def facts_to_sentence(rng: Random) -> Example:
    name = "".join(rng.sample(SYLLABLES, rng.randint(2, 3))).capitalize()
    if rng.random() < 0.5:
        people, river, craft = rng.randint(2, 900) * 1000, rng.choice(RIVERS), rng.choice(CRAFTS)
        facts = (
            f"name: {name}\ntype: city\npopulation: {people:,}\nriver: {river}\nknown for: {craft}"
        )
        answer = f"{name} is a city of {people:,} people on the {river} river, known for {craft}."
    else:
        job, hobby, town = rng.choice(JOBS), rng.choice(HOBBIES), rng.choice(RIVERS) + "ford"
        age = rng.randint(19, 80)
        facts = f"name: {name}\nage: {age}\njob: {job}\nhometown: {town}\nhobby: {hobby}"
        article = "an" if str(age).startswith("8") else "a"  # "an eighty-..."
        answer = f"{name} is {article} {age}-year-old {job} from {town} who enjoys {hobby}."
    return "Turn these facts into one sentence.", facts, answer


def dates(rng: Random) -> Example:
    if rng.random() < 0.5:
        start, k = rng.randrange(7), rng.randint(1, 60)
        end = WEEKDAYS[(start + k) % 7]
        question = f"What day of the week is it {k} days after a {WEEKDAYS[start]}?"
        answer = f"{k} days is {k // 7} weeks and {k % 7} days, so it is a {end}."
        return question, "", answer
    day = dt.date(2024, 1, 1) + dt.timedelta(days=rng.randrange(730))
    k = rng.randint(1, 90)
    end = day + dt.timedelta(days=k)
    question = f"What is the date {k} days after {day.isoformat()}?"
    return question, "", f"Adding {k} days to {day.isoformat()} gives {end.isoformat()} ({end:%A})."


def compare(rng: Random) -> Example:
    if rng.random() < 0.5:
        a, b = rng.sample(range(10, 1000), 2)
        sa, sb = str(a), str(b)
    else:
        a, b = (round(rng.uniform(0, 10), rng.choice((1, 2))) for _ in range(2))
        a, b = (a, b) if a != b else (a, round(b + 0.1, 2))
        sa, sb = f"{a:g}", f"{b:g}"
    big, small = (sa, sb) if a > b else (sb, sa)
    answer = f"{big} is larger than {small}, because {big} - {small} = {abs(a - b):g} > 0."
    if rng.random() < 0.5:
        return f"Which is larger, {sa} or {sb}?", "", answer
    return "Which of these two numbers is larger?", f"{sa} and {sb}", answer


def json_format(rng: Random) -> Example:
    pairs = {
        key: rng.choice(JSON_FIELDS[key])
        for key in rng.sample(tuple(JSON_FIELDS), rng.randint(2, 4))
    }
    text = "; ".join(f"{key} = {value}" for key, value in pairs.items())
    return "Format these key/value pairs as a JSON object.", text, json.dumps(pairs)


FAMILIES: tuple[Callable[[Random], Example], ...] = (
    arithmetic, sorting, units, word_transform, count_letters, sentiment,
    definition, facts_to_sentence, dates, compare, json_format,
)  # fmt: skip


def tagged_records(n: int = 240, seed: int = 0) -> list[tuple[str, dict[str, str]]]:
    """(family name, record) pairs; drawn one at a time from one stream, duplicates skipped."""
    rng, seen, out = Random(seed), set(), []
    for _ in range(100 * n + 100):
        if len(out) >= n:
            break
        family = rng.choice(FAMILIES)
        example = family(rng)
        if example not in seen:
            seen.add(example)
            instruction, input_, output = example
            out.append(
                (family.__name__, {"instruction": instruction, "input": input_, "output": output})
            )
    if len(out) < n:
        raise ValueError(f"could only generate {len(out)} distinct records, asked for {n}")
    return out


def records(n: int = 240, seed: int = 0) -> list[dict[str, str]]:
    """``n`` distinct instruction/input/output records; ``records(n)[:k] == records(k)``."""
    return [record for _, record in tagged_records(n, seed)]
