"""Generate the shipped SFT example data: examples/data/sft_chat.jsonl (+ sft_chat_val.jsonl).

A small assistant persona, "Pip", that answers in fixed, checkable house styles: unit
conversions with the factor shown, arithmetic worked step by step ending in ``Answer: N``,
sorting/reversing/counting tasks, capital cities in one sentence, packing lists of varying
length, and a few two- or three-turn follow-ups. A 135M instruct model does not know these
styles, so its loss on the assistant turns starts high and falls visibly within a few dozen
steps; lengths range from ~30 to ~700 tokens (a realistic spread for packing and batching).

Deterministic (seeded): ``python examples/make_sft_data.py`` rewrites the same files.
The held-out file uses a different seed, so it shares the styles but not the rows.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

SYSTEM = "You are Pip, a concise assistant. Follow the house style exactly."

UNITS = [
    ("km", "miles", 0.621371), ("miles", "km", 1.609344), ("kg", "pounds", 2.204623),
    ("pounds", "kg", 0.453592), ("litres", "US gallons", 0.264172), ("inches", "cm", 2.54),
    ("metres", "feet", 3.28084), ("feet", "metres", 0.3048), ("ounces", "grams", 28.3495),
]
CAPITALS = [
    ("France", "Paris"), ("Japan", "Tokyo"), ("Kenya", "Nairobi"), ("Peru", "Lima"),
    ("Canada", "Ottawa"), ("Norway", "Oslo"), ("Egypt", "Cairo"), ("Chile", "Santiago"),
    ("Vietnam", "Hanoi"), ("Portugal", "Lisbon"), ("Ghana", "Accra"), ("Poland", "Warsaw"),
    ("Turkey", "Ankara"), ("Australia", "Canberra"), ("Morocco", "Rabat"), ("Austria", "Vienna"),
]
WORDS = ["apple", "river", "candle", "orbit", "pepper", "window", "garden", "silver", "tunnel",
         "marble", "falcon", "lantern", "meadow", "copper", "harbor", "violet", "quartz", "timber"]
TRIPS = {
    "a beach weekend": ["sunscreen", "swimsuit", "towel", "sandals", "hat", "water bottle", "book",
                        "sunglasses", "snacks", "light jacket", "phone charger", "reusable bag"],
    "a winter hike": ["thermal layers", "waterproof boots", "gloves", "wool hat", "map", "headlamp",
                      "first-aid kit", "thermos", "energy bars", "trekking poles", "spare socks", "whistle"],
    "a business trip": ["laptop", "charger", "notebook", "business cards", "suit", "toiletries",
                        "passport", "travel adapter", "umbrella", "pen", "headphones", "medication"],
    "a camping night": ["tent", "sleeping bag", "camp stove", "matches", "lantern", "water filter",
                        "knife", "rope", "insect repellent", "cooler", "camp chair", "trash bags"],
}


def conversion(rng: random.Random) -> list[dict]:
    src, dst, factor = rng.choice(UNITS)
    value = rng.choice([rng.randint(1, 500), round(rng.uniform(0.5, 99.5), 1)])
    result = value * factor
    ask = rng.choice(["Convert {v} {s} to {d}.", "How many {d} is {v} {s}?", "{v} {s} in {d}, please."])
    answer = f"Conversion: {value} {src} x {factor} = {result:.2f} {dst}.\nAnswer: {result:.2f} {dst}"
    return [{"role": "user", "content": ask.format(v=value, s=src, d=dst)},
            {"role": "assistant", "content": answer}]


def arithmetic(rng: random.Random) -> list[dict]:
    terms = [rng.randint(2, 99) for _ in range(rng.randint(2, 6))]
    ops = [rng.choice("+-*") if i else "" for i in range(len(terms))]
    # evaluate strictly left to right, as the house style explains
    lines, total = [], terms[0]
    expression = str(terms[0])
    for op, term in zip(ops[1:], terms[1:]):
        before = total
        total = before + term if op == "+" else before - term if op == "-" else before * term
        lines.append(f"Step {len(lines) + 1}: {before} {op} {term} = {total}")
        expression += f" {op} {term}"
    ask = rng.choice(["Work out {e} from left to right.", "Compute {e}, left to right.",
                      "What is {e} if we go strictly left to right?"])
    answer = "\n".join(lines) + f"\nAnswer: {total}"
    return [{"role": "user", "content": ask.format(e=expression)}, {"role": "assistant", "content": answer}]


def word_task(rng: random.Random) -> list[dict]:
    words = rng.sample(WORDS, rng.randint(3, 9))
    kind = rng.choice(["sort", "reverse", "count"])
    listed = ", ".join(words)
    if kind == "sort":
        result = ", ".join(sorted(words))
        return [{"role": "user", "content": f"Sort these words alphabetically: {listed}"},
                {"role": "assistant", "content": f"Sorted ({len(words)} words): {result}"}]
    if kind == "reverse":
        result = ", ".join(reversed(words))
        return [{"role": "user", "content": f"Reverse the order of: {listed}"},
                {"role": "assistant", "content": f"Reversed ({len(words)} words): {result}"}]
    letter = rng.choice("aeiort")
    counts = [f"{w}: {w.count(letter)}" for w in words]
    total = sum(w.count(letter) for w in words)
    return [{"role": "user", "content": f"Count the letter '{letter}' in each word: {listed}"},
            {"role": "assistant", "content": "Counts of '" + letter + "':\n" + "\n".join(counts)
             + f"\nTotal: {total}"}]


def capital(rng: random.Random) -> list[dict]:
    country, city = rng.choice(CAPITALS)
    ask = rng.choice(["What is the capital of {c}?", "Capital of {c}?", "Tell me the capital city of {c}."])
    return [{"role": "user", "content": ask.format(c=country)},
            {"role": "assistant", "content": f"The capital of {country} is {city}."}]


def packing_list(rng: random.Random) -> list[dict]:
    trip = rng.choice(list(TRIPS))
    n = rng.randint(3, 12)
    items = rng.sample(TRIPS[trip], n)
    lines = [f"{k + 1}. {item.capitalize()} - pack it in the {'main bag' if k % 2 == 0 else 'day bag'}."
             for k, item in enumerate(items)]
    detail = rng.random() < 0.5
    if detail:
        lines = [line + f" Check it off the night before; item {k + 1} of {n}." for k, line in enumerate(lines)]
    return [{"role": "user", "content": f"Give me a packing list of {n} items for {trip}."
             + (" Add a reminder to each item." if detail else "")},
            {"role": "assistant", "content": f"Packing list for {trip} ({n} items):\n" + "\n".join(lines)
             + "\nHave a good trip!"}]


def follow_up(rng: random.Random) -> list[dict]:
    first = rng.choice([conversion, arithmetic, capital])(rng)
    messages = list(first)
    for _ in range(rng.randint(1, 2)):
        messages += rng.choice([conversion, arithmetic, word_task, capital])(rng)
    return messages


MAKERS = [(conversion, 3), (arithmetic, 3), (word_task, 2), (capital, 2), (packing_list, 2), (follow_up, 2)]


def make_rows(count: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    makers = [maker for maker, weight in MAKERS for _ in range(weight)]
    rows = []
    for _ in range(count):
        messages = rng.choice(makers)(rng)
        if rng.random() < 0.5:
            messages = [{"role": "system", "content": SYSTEM}] + messages
        rows.append({"messages": messages})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", default=str(Path(__file__).parent / "data"))
    parser.add_argument("--train", type=int, default=800)
    parser.add_argument("--val", type=int, default=32)
    args = parser.parse_args()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, count, seed in (("sft_chat.jsonl", args.train, 1234), ("sft_chat_val.jsonl", args.val, 98765)):
        with open(out / name, "w", encoding="utf-8") as handle:
            for row in make_rows(count, seed):
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        print(f"wrote {count} rows to {out / name}")


if __name__ == "__main__":
    main()
