"""The demo task: tiny chat requests whose answers a program can judge.

Two request kinds, each answered in a fixed polite style
(``OPENING`` ... ``CLOSING``):

* arithmetic -- ``"What is 3 + 4?"`` -> ``"Sure! 3 + 4 = 7. Have a nice day."``
  (``a + b`` or ``a - b`` with operands 0-9 and ``a >= b`` for subtraction,
  so results lie in 0..18);
* listing -- ``"Name 3 fruits."`` ->
  ``"Sure! Here are 3 fruits: apple, pear, plum. Have a nice day."``
  (counts 1-5; for 1 the answer reads ``"Here is 1 fruit: apple."``).

:func:`gold_judge` scores any response in [0, 1] so that every pipeline stage
can be measured, and :func:`write_data_samples` writes the deterministic
corpus, SFT, preference, PPO-prompt and evaluation files under ``data_samples/``.
Regenerate them with ``python -m rlhf.demo_task data_samples``.
Standard library only.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

OPENING = "Sure!"
CLOSING = "Have a nice day."
MAX_WORDS = 25
DATA_FILES = ("corpus.txt", "sft.jsonl", "sft_prompt_completion.jsonl",
              "preferences.jsonl", "ppo_prompts.jsonl", "eval.jsonl")

# category plural -> (singular, members); members are single distinct words.
CATEGORIES: dict[str, tuple[str, tuple[str, ...]]] = {
    "fruits": ("fruit", ("apple", "pear", "plum", "grape", "lemon", "mango", "peach", "cherry", "banana")),
    "colors": ("color", ("red", "blue", "green", "yellow", "pink", "black", "white", "brown", "purple")),
    "animals": ("animal", ("cat", "dog", "cow", "horse", "sheep", "goat", "pig", "duck", "lion")),
    "tools": ("tool", ("hammer", "saw", "drill", "wrench", "shovel", "rake", "axe", "chisel", "ladder")),
    "vegetables": ("vegetable", ("carrot", "potato", "onion", "pea", "bean", "corn", "leek", "beet", "cabbage")),
    "drinks": ("drink", ("water", "milk", "tea", "coffee", "juice", "soda", "cocoa", "lemonade", "cider")),
}
ITEM_CATEGORY = {item: cat for cat, (_, items) in CATEGORIES.items() for item in items}
ARITH_TEMPLATES = ("What is {a} {op} {b}?", "Compute {a} {op} {b}.", "Please calculate {a} {op} {b}.")
LIST_TEMPLATES = ("Name {n} {noun}.", "List {n} {noun}.", "Give me {n} {noun}.", "Can you name {n} {noun}?")
RUDE_WORDS = ("ugh", "whatever", "obviously", "duh", "boring")
ALLOWED_WORDS = frozenset(
    "sure here are is have a nice day".split()
    + [w for cat, (sing, _) in CATEGORIES.items() for w in (cat, sing)] + list(ITEM_CATEGORY))
_ALLOWED_CHARS = re.compile(r"[A-Za-z0-9 .,!?:+=\-]*")


@dataclass(frozen=True)
class Request:
    """A parsed user request: ``kind`` is ``"arithmetic"`` or ``"listing"``."""

    kind: str
    a: int = 0
    op: str = "+"
    b: int = 0
    count: int = 0
    category: str = ""

    @property
    def result(self) -> int:
        """The correct result of an arithmetic request."""
        return self.a + self.b if self.op == "+" else self.a - self.b

    @property
    def noun(self) -> str:
        """Category noun agreeing with ``count`` (``fruit`` / ``fruits``)."""
        return CATEGORIES[self.category][0] if self.count == 1 else self.category


def parse_request(prompt: str) -> Request | None:
    """Parse a question (``"What is 3 + 4?"``, ``"Name 3 fruits."``); None if unknown."""
    m = re.search(r"(\d{1,6})\s*([+-])\s*(\d{1,6})", prompt)
    if m:
        return Request("arithmetic", a=int(m.group(1)), op=m.group(2), b=int(m.group(3)))
    for m in re.finditer(r"(\d{1,6})\s+([A-Za-z]+)", prompt):
        word = m.group(2).lower()
        for cat, (sing, _) in CATEGORIES.items():
            if word in (cat, sing):
                return Request("listing", count=int(m.group(1)), category=cat)
    return None


def question(req: Request, template: int = 0) -> str:
    """Render ``req`` with the ``template``-th phrasing of its kind."""
    if req.kind == "arithmetic":
        return ARITH_TEMPLATES[template].format(a=req.a, op=req.op, b=req.b)
    return LIST_TEMPLATES[template].format(n=req.count, noun=req.noun)


def answer_body(req: Request, items: Sequence[str] | None = None, result: int | None = None) -> str:
    """The core sentence, e.g. ``"3 + 4 = 7."`` or ``"Here are 2 fruits: apple, pear."``."""
    if req.kind == "arithmetic":
        return f"{req.a} {req.op} {req.b} = {req.result if result is None else result}."
    verb = "is" if req.count == 1 else "are"
    return f"Here {verb} {req.count} {req.noun}: {', '.join(items or ())}."


def ideal_answer(req: Request, rng: random.Random) -> str:
    """A perfect (score 1.0) answer; listing items are drawn with ``rng``."""
    items = rng.sample(CATEGORIES[req.category][1], req.count) if req.kind == "listing" else None
    return f"{OPENING} {answer_body(req, items)} {CLOSING}"


def _is_correct(req: Request, text: str) -> bool:
    if req.kind == "arithmetic":
        rest = re.sub(rf"(?<!\d){req.a}\s*{re.escape(req.op)}\s*{req.b}(?!\d)", " ", text)
        numbers = re.findall(r"-?\d+", rest)
        return bool(numbers) and all(int(n) == req.result for n in numbers)
    listed = [w for w in re.findall(r"[a-z]+", text.lower()) if w in ITEM_CATEGORY]
    return (len(listed) == req.count and len(set(listed)) == len(listed)
            and all(ITEM_CATEGORY[w] == req.category for w in listed))


def _is_clean(text: str) -> bool:
    words = re.findall(r"[a-z]+", text.lower())
    sentences = [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s]
    return (bool(text.strip()) and len(text.split()) <= MAX_WORDS
            and _ALLOWED_CHARS.fullmatch(text) is not None
            and all(w in ALLOWED_WORDS for w in words)  # excludes RUDE_WORDS and junk
            and len(set(words)) == len(words) and len(set(sentences)) == len(sentences))


JUDGE_WEIGHTS = {"correct": 0.5, "opening": 0.2, "closing": 0.2, "clean": 0.1}


def judge_parts(prompt: str, response: str) -> dict[str, bool]:
    """Which rubric items of :func:`gold_judge` a response earns (all False for an unknown prompt)."""
    try:
        req = parse_request(prompt)
        if req is None:
            return dict.fromkeys(JUDGE_WEIGHTS, False)
        text = response.strip()
        return {"correct": _is_correct(req, text), "opening": text.startswith(OPENING),
                "closing": text.endswith(CLOSING), "clean": _is_clean(text)}  # fmt: skip
    except Exception:  # the judge must never raise on garbage input
        return dict.fromkeys(JUDGE_WEIGHTS, False)


def judge_one(prompt: str, response: str) -> float:
    """Score one response; see :func:`gold_judge` for the rubric."""
    parts = judge_parts(prompt, response)
    return round(sum(JUDGE_WEIGHTS[name] for name, earned in parts.items() if earned), 4)


def gold_judge(prompts: list[str], responses: list[str]) -> list[float]:
    """Score each (user question, assistant response) pair in [0, 1].

    Rubric (points add up; unknown prompts score 0):

    * 0.5 correct -- arithmetic: once the restated ``a op b`` is removed, the
      response contains at least one number and every number equals the result;
      listing: the response mentions exactly ``count`` known item words, all
      distinct and all from the requested category;
    * 0.2 polite opening -- the stripped response starts with ``"Sure!"``;
    * 0.2 polite closing -- it ends with ``"Have a nice day."`` (a truncated
      answer loses this);
    * 0.1 clean -- non-empty, at most 25 words, only task words (no rude words
      such as "Ugh"/"Whatever", no junk), plain characters, no repeated word
      and no repeated sentence.

    The ideal ``"Sure! 3 + 4 = 7. Have a nice day."`` scores 1.0.
    """
    return [judge_one(p, r) for p, r in zip(prompts, responses, strict=True)]


def user_text(prompt_messages: str | Sequence[dict]) -> str:
    """Content of the last user message of a conversation (a string is returned as is)."""
    if isinstance(prompt_messages, str):
        return prompt_messages
    for message in reversed(list(prompt_messages)):
        if message.get("role") == "user":
            return str(message.get("content", ""))
    return ""


# --------------------------------------------------------------------------- flawed answers
def _wrong(req: Request, rng: random.Random) -> str:
    """Polite but incorrect: wrong result, wrong count or a foreign item."""
    if req.kind == "arithmetic":
        result = req.result + rng.choice((-2, -1, 1, 2))
        return f"{OPENING} {answer_body(req, result=result)} {CLOSING}"
    items = rng.sample(CATEGORIES[req.category][1], req.count + 1)
    if rng.random() < 0.5 and req.count > 1:
        items = items[:-2]  # one too few
    elif rng.random() < 0.5:
        other = rng.choice([c for c in CATEGORIES if c != req.category])
        items = items[:-2] + [rng.choice(CATEGORIES[other][1])]
    return f"{OPENING} {answer_body(req, items)} {CLOSING}"


def _repeated(req: Request, rng: random.Random) -> str:
    """Repetition: a repeated list item or a repeated sentence."""
    if req.kind == "listing" and req.count > 1 and rng.random() < 0.7:
        items = rng.sample(CATEGORIES[req.category][1], req.count)
        items[-1] = items[0]
        return f"{OPENING} {answer_body(req, items)} {CLOSING}"
    body = ideal_answer(req, rng)[len(OPENING) + 1:-len(CLOSING) - 1]
    return f"{OPENING} {body} {body} {CLOSING}"


def _rude(req: Request, rng: random.Random) -> str:
    """Curt or rude tone, e.g. ``"Ugh. 7."``."""
    rude = rng.choice(RUDE_WORDS).capitalize() + "."
    if req.kind == "arithmetic" and rng.random() < 0.5:
        return f"{rude} {req.result}."
    body = ideal_answer(req, rng)[len(OPENING) + 1:-len(CLOSING) - 1]
    return f"{rude} {body}" + (f" {CLOSING}" if rng.random() < 0.3 else "")


def _no_closing(req: Request, rng: random.Random) -> str:
    return ideal_answer(req, rng)[:-len(CLOSING) - 1]


def _no_opening(req: Request, rng: random.Random) -> str:
    return ideal_answer(req, rng)[len(OPENING) + 1:]


def _truncated(req: Request, rng: random.Random) -> str:
    text = ideal_answer(req, rng)
    return text[:rng.randint(len(OPENING) + 2, len(text) - 2)].rstrip()


def _extra(req: Request, rng: random.Random) -> str:
    """Correct, but rambles on after the closing."""
    return ideal_answer(req, rng) + rng.choice((" " + CLOSING, " Sure!", " Here are"))


FLAWS: dict[str, Callable[[Request, random.Random], str]] = {
    "wrong": _wrong, "repeated": _repeated, "rude": _rude, "no_closing": _no_closing,
    "no_opening": _no_opening, "truncated": _truncated, "extra": _extra}
SFT_FLAWS = ("wrong", "wrong", "repeated", "rude", "no_closing", "no_opening")
MILD_FLAWS = ("no_closing", "no_opening", "extra")


# --------------------------------------------------------------------------- data files
def all_requests() -> list[Request]:
    """Every request of the task, in a fixed order."""
    reqs = [Request("arithmetic", a=a, op=op, b=b)
            for op in "+-" for a in range(10) for b in range(10) if op == "+" or a >= b]
    return reqs + [Request("listing", count=n, category=c) for c in CATEGORIES for n in range(1, 6)]


_REQUESTS = all_requests()
_ARITH_REQUESTS = [r for r in _REQUESTS if r.kind == "arithmetic"]
_LIST_REQUESTS = [r for r in _REQUESTS if r.kind == "listing"]
ARITH_SHARE, LIST_SHARE = 0.5, 0.2
"""Shares of the pretraining corpus's lines that state an arithmetic fact and a listing."""


def _split(rng: random.Random) -> tuple[list[tuple[str, Request]], list[tuple[str, Request]]]:
    """(train, eval) question lists; eval holds one phrasing of 98 sums and of every listing."""
    n_arith = sum(r.kind == "arithmetic" for r in _REQUESTS)  # arithmetic requests come first
    held = set(rng.sample(range(n_arith), 98)) | set(range(n_arith, len(_REQUESTS)))
    train, evals = [], []
    for i, req in enumerate(_REQUESTS):
        n_templates = len(ARITH_TEMPLATES if req.kind == "arithmetic" else LIST_TEMPLATES)
        held_t = rng.randrange(n_templates) if i in held else -1
        for t in range(n_templates):
            (evals if t == held_t else train).append((question(req, t), req))
    rng.shuffle(evals)
    return train, evals


def _sample(pools: dict[str, list[tuple[str, Request]]], rng: random.Random) -> tuple[str, Request]:
    """Draw a training question from the per-kind pools; 60% arithmetic, 40% listing."""
    return rng.choice(pools["arithmetic" if rng.random() < 0.6 else "listing"])


def _with_article(noun: str) -> str:
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def _corpus_line(rng: random.Random) -> str:
    """One line of plain pretraining prose (no chat markers).

    Half the lines state an arithmetic fact and a fifth a correct listing, so that the small model
    learns the facts the reward model must later judge; the rest is varied prose.
    """
    kind = rng.random()
    if kind < ARITH_SHARE:
        req = rng.choice(_ARITH_REQUESTS)
        body = answer_body(req)
        return rng.choice((body, f"{question(req, rng.randrange(len(ARITH_TEMPLATES)))} {body}"))
    if kind < ARITH_SHARE + LIST_SHARE:
        req = rng.choice(_LIST_REQUESTS)
        body = answer_body(req, rng.sample(CATEGORIES[req.category][1], req.count))
        return rng.choice((body, f"{question(req, rng.randrange(len(LIST_TEMPLATES)))} {body}"))
    cat = rng.choice(list(CATEGORIES))
    item = rng.choice(CATEGORIES[cat][1])
    a, b = rng.randrange(10), rng.randrange(10)
    article = "" if cat in ("colors", "drinks") else _with_article(item)[:-len(item)]
    lines = [
        f"{a} plus {b} is {a + b}.", f"{max(a, b)} minus {min(a, b)} is {max(a, b) - min(a, b)}.",
        f"The sum of {a} and {b} is {a + b}.", f"{article}{item} is {_with_article(CATEGORIES[cat][0])}.".capitalize(),
        f"{item.capitalize()} is one of the {cat}.",
        f"Here are some {cat}: {', '.join(rng.sample(CATEGORIES[cat][1], rng.randint(2, 4)))}.",
        f"{OPENING} I can help with that. {CLOSING}", f"Thank you. {CLOSING}", CLOSING,
        f"The {rng.choice(CATEGORIES['animals'][1])} {rng.choice(('likes', 'sees', 'eats', 'wants'))} "
        f"the {rng.choice(CATEGORIES['colors'][1])} {rng.choice(CATEGORIES['fruits'][1])}.",
    ]
    return rng.choice(lines)


def _dump(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8", newline="\n")


def write_data_samples(out_dir: str | Path, seed: int = 0) -> dict[str, Path]:
    """Write every file of :data:`DATA_FILES` into ``out_dir``; byte-identical for a given seed."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {name: out / name for name in DATA_FILES}
    rng = random.Random(seed)
    train, evals = _split(rng)
    pools = {kind: [qr for qr in train if qr[1].kind == kind] for kind in ("arithmetic", "listing")}
    user = lambda q: [{"role": "user", "content": q}]  # noqa: E731
    bot = lambda a: [{"role": "assistant", "content": a}]  # noqa: E731

    corpus = [_corpus_line(rng) for _ in range(14000)]
    paths["corpus.txt"].write_text("\n".join(corpus) + "\n", encoding="utf-8", newline="\n")

    def sft_row() -> tuple[str, str]:
        q, req = _sample(pools, rng)
        flawed = rng.random() < 0.3
        return q, FLAWS[rng.choice(SFT_FLAWS)](req, rng) if flawed else ideal_answer(req, rng)

    _dump(paths["sft.jsonl"], [{"messages": user(q) + bot(a)} for q, a in (sft_row() for _ in range(3000))])
    _dump(paths["sft_prompt_completion.jsonl"],
          [{"prompt": user(q), "completion": bot(a)} for q, a in (sft_row() for _ in range(200))])

    prefs = []
    while len(prefs) < 3000:
        q, req = _sample(pools, rng)
        mild = rng.random() < 0.25
        chosen = FLAWS[rng.choice(MILD_FLAWS)](req, rng) if mild else ideal_answer(req, rng)
        rejected = FLAWS[rng.choice(list(FLAWS))](req, rng)
        if judge_one(q, chosen) > judge_one(q, rejected):
            prefs.append({"prompt": user(q), "chosen": bot(chosen), "rejected": bot(rejected)})
    assert all(judge_one(user_text(p["prompt"]), p["chosen"][0]["content"])
               > judge_one(user_text(p["prompt"]), p["rejected"][0]["content"]) for p in prefs)
    _dump(paths["preferences.jsonl"], prefs)

    _dump(paths["ppo_prompts.jsonl"], [{"prompt": user(_sample(pools, rng)[0])} for _ in range(1000)])
    _dump(paths["eval.jsonl"], [{"prompt": user(q), "reference": ideal_answer(req, rng)} for q, req in evals])
    return paths


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: ``python -m rlhf.demo_task [out_dir] [--seed N]``."""
    parser = argparse.ArgumentParser(description="Write the demo task's data samples.")
    parser.add_argument("out_dir", nargs="?", default="data_samples")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name, path in write_data_samples(args.out_dir, args.seed).items():
        print(f"{name}: {path.stat().st_size} bytes")


if __name__ == "__main__":
    main()
