"""Circuit tasks generated from templates inside the package: IOI, greater-than and subject-verb
agreement (SVA), the three the Group-SAE paper discovers circuits on (after Marks et al. 2024).

Each task is a list of prompts whose answer is the very next token, and a metric per prompt
computed from the logits at the last position:
- IOI (Wang et al. 2022): "When Mary and John went to the store, John gave a drink to" ->
  logit(" Mary") - logit(" John").
- SVA (Marks et al. 2024, with an attractor noun of the other number between subject and verb):
  "The keys near the cabinet" -> logit(" are") - logit(" is").
- greater-than (Hanna et al. 2023): "The war lasted from the year 1732 to the year 17" -> the
  probability of the continuations that make the year larger minus that of those that make it
  smaller. The original compares two-digit year tokens; SmolLM2 (like Llama) splits numbers into
  single digits, so the next token is the tens digit only. There the metric is P(tens > 3) -
  P(tens < 3) for 1732: a tens digit equal to the start year's leaves the answer undecided and is
  counted on neither side. Tokenizers with two-digit tokens get the original metric.

Prompts are drawn with a fixed seed, and only words that are one token (after a space) in the
model's tokenizer are used, so every answer is a single token: `answer_ids` are the ids the prompt
tokens are followed by when the answer text is appended (checked, not assumed). Prompts are grouped
by token length so a batch needs no padding.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ghsae.config import TASKS
from ghsae.errors import ConfigError

NAMES = (
    "Mary John Tom James Anna Paul Mark Sarah Lisa David Michael Emma Kate Peter Alice Bob Jack Lucy George "
    "Linda Daniel Laura Steve Helen Frank Chris Rachel Susan Robert Tim Kevin Amy Brian Jessica Eric Emily Sam "
    "Jane Adam Alex Ben Dan Joe Max Nick Ryan Sophie Victoria William"
).split()
IOI_TEMPLATES = (
    "When {A} and {B} went to the store, {B} gave a drink to",
    "When {A} and {B} went to the park, {B} gave a ball to",
    "After {A} and {B} had lunch at the cafe, {B} handed the bill to",
    "Then, {A} and {B} were working at the office. {B} decided to give a report to",
    "While {A} and {B} were at the party, {B} passed a note to",
    "Friends {A} and {B} found a book at the library. {B} lent the book to",
)
# (singular, plural): both must be one token each for a pair to be used
NOUNS = (
    ("key", "keys"),
    ("author", "authors"),
    ("dog", "dogs"),
    ("teacher", "teachers"),
    ("car", "cars"),
    ("doctor", "doctors"),
    ("girl", "girls"),
    ("boy", "boys"),
    ("house", "houses"),
    ("student", "students"),
    ("friend", "friends"),
    ("book", "books"),
    ("farmer", "farmers"),
    ("player", "players"),
    ("cat", "cats"),
    ("bird", "birds"),
    ("tree", "trees"),
    ("manager", "managers"),
)
SVA_TEMPLATES = ("The {s} near the {d}", "The {s} behind the {d}", "The {s} that the {d} liked", "The {s} of the {d}")
VERBS = ((" is", " are"), (" was", " were"), (" has", " have"))
YEAR_NOUNS = "war expedition project contract drought reign festival strike".split()
YEAR_TEMPLATE = "The {noun} lasted from the year {century}{yy:02d} to the year {century}"


@dataclass(frozen=True)
class TaskPrompts:
    """One task's prompts and what the metric reads off the last position's logits.

    ioi / sva: metric = logit(good[i]) - logit(bad[i]).
    greater-than: metric = sum of P(candidates[j]) with sign[i, j] = +1 minus those with -1.
    """

    task: str
    prompts: list[str]
    ids: list[list[int]]  # each prompt's token ids (BOS first when the tokenizer adds one)
    good: list[int]  # ioi / sva: the correct answer's token id per prompt
    bad: list[int]  # ioi / sva: the wrong answer's token id per prompt
    candidates: list[int]  # greater-than: the answer token ids compared
    signs: list[list[int]]  # greater-than: per prompt, +1 / -1 / 0 per candidate
    adaptation: str  # how the metric reads the tokenizer, in words

    def __len__(self) -> int:
        return len(self.prompts)

    def metric(self, last_logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Per-prompt metric [B] from the last position's logits [B, V] of prompts `index` [B]."""
        if self.task == "greater-than":
            probs = torch.softmax(last_logits.float(), dim=-1)[:, self.candidates]
            sign = torch.tensor(self.signs, dtype=probs.dtype, device=probs.device)[index.to(probs.device)]
            return (probs * sign).sum(-1)
        idx = index.cpu().tolist()
        good = torch.tensor([self.good[i] for i in idx], device=last_logits.device)
        bad = torch.tensor([self.bad[i] for i in idx], device=last_logits.device)
        rows = torch.arange(len(idx), device=last_logits.device)
        return last_logits[rows, good].float() - last_logits[rows, bad].float()

    def batches(self, size: int) -> list[torch.Tensor]:
        """Indices of prompts, grouped by token length (no padding), at most `size` per batch."""
        by_len: dict[int, list[int]] = {}
        for i, ids in enumerate(self.ids):
            by_len.setdefault(len(ids), []).append(i)
        out = []
        for length in sorted(by_len):
            idx = by_len[length]
            out += [torch.tensor(idx[s : s + size]) for s in range(0, len(idx), size)]
        return out


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text)["input_ids"])


def single_token(tokenizer, prefix: str, answer: str) -> int | None:
    """The id that follows prefix's tokens when `answer` is appended, if it is exactly one known token."""
    a, b = _encode(tokenizer, prefix), _encode(tokenizer, prefix + answer)
    if len(b) == len(a) + 1 and b[: len(a)] == a and b[-1] != getattr(tokenizer, "unk_token_id", None):
        return b[-1]
    return None


def _one_token_words(tokenizer, words: Sequence[str]) -> list[str]:
    return [w for w in words if single_token(tokenizer, "The", " " + w) is not None]


def ioi(tokenizer, n: int, seed: int) -> TaskPrompts:
    rng = random.Random(seed)
    names = _one_token_words(tokenizer, NAMES)
    if len(names) < 2:
        raise ConfigError(f"the IOI task needs two one-token names; this tokenizer splits all but {names}")
    prompts: list[str] = []
    ids: list[list[int]] = []
    good: list[int] = []
    bad: list[int] = []
    while len(prompts) < n:
        a, b = rng.sample(names, 2)
        text = rng.choice(IOI_TEMPLATES).format(A=a, B=b)
        g, w = single_token(tokenizer, text, " " + a), single_token(tokenizer, text, " " + b)
        if g is None or w is None:
            continue  # a name that is one token after "The" but not here: draw another
        prompts.append(text)
        ids.append(_encode(tokenizer, text))
        good.append(g)
        bad.append(w)
    return TaskPrompts("ioi", prompts, ids, good, bad, [], [], "logit difference of the two names")


def sva(tokenizer, n: int, seed: int) -> TaskPrompts:
    rng = random.Random(seed)
    nouns = [p for p in NOUNS if all(single_token(tokenizer, "The", " " + w) is not None for w in p)]
    if len(nouns) < 2:
        raise ConfigError("the SVA task needs one-token singular and plural nouns; this tokenizer has too few")
    prompts: list[str] = []
    ids: list[list[int]] = []
    good: list[int] = []
    bad: list[int] = []
    while len(prompts) < n:
        (s1, s2), (d1, d2) = rng.sample(nouns, 2)
        plural = rng.random() < 0.5
        subj, dist = (s2, d1) if plural else (s1, d2)  # the attractor always has the other number
        text = rng.choice(SVA_TEMPLATES).format(s=subj, d=dist)
        sing_verb, plur_verb = rng.choice(VERBS)
        ts, tp = single_token(tokenizer, text, sing_verb), single_token(tokenizer, text, plur_verb)
        if ts is None or tp is None:
            continue
        prompts.append(text)
        ids.append(_encode(tokenizer, text))
        good.append(tp if plural else ts)
        bad.append(ts if plural else tp)
    return TaskPrompts("sva", prompts, ids, good, bad, [], [], "logit difference of the verb's two numbers")


def greater_than(tokenizer, n: int, seed: int) -> TaskPrompts:
    """Digit-by-digit tokenizers get the tens digit; two-digit-token ones the original 00-99 tokens."""
    rng = random.Random(seed)
    probe = YEAR_TEMPLATE.format(noun="war", century=17, yy=32)
    digits = [single_token(tokenizer, probe, str(d)) for d in range(10)]
    pairs = [single_token(tokenizer, probe, f"{y:02d}") for y in range(100)]
    if all(t is not None for t in digits):
        mode, cands = "digits", digits
    elif all(t is not None for t in pairs):
        mode, cands = "pairs", pairs
    else:
        raise ConfigError(
            "the greater-than task needs either one token per digit or one per two-digit number after "
            "'... to the year 17'; this tokenizer has neither"
        )
    prompts: list[str] = []
    ids: list[list[int]] = []
    signs: list[list[int]] = []
    while len(prompts) < n:
        century = rng.choice((12, 13, 14, 15, 16, 17, 18))
        yy = rng.randint(12, 88) if mode == "digits" else rng.randint(2, 97)  # both sides non-empty
        text = YEAR_TEMPLATE.format(noun=rng.choice(YEAR_NOUNS), century=century, yy=yy)
        if any(single_token(tokenizer, text, str(d)) != cands[d] for d in (0, 9)) and mode == "digits":
            continue  # the digit tokens depend on what precedes them: keep only prompts where they do not
        ref = yy // 10 if mode == "digits" else yy
        prompts.append(text)
        ids.append(_encode(tokenizer, text))
        signs.append([(c > ref) - (c < ref) for c in range(len(cands))])
    how = (
        "digit-by-digit tokenizer: P(tens digit > start year's) - P(tens digit < start year's); equal is undecided"
        if mode == "digits"
        else "two-digit tokens: P(yy > start) - P(yy < start) (Hanna et al. 2023)"
    )
    return TaskPrompts("greater-than", prompts, ids, [], [], [int(c) for c in cands if c is not None], signs, how)


GENERATORS = {"ioi": ioi, "greater-than": greater_than, "sva": sva}


def parse_tasks(text: str | Sequence[str]) -> list[str]:
    """'ioi,sva' or a list -> checked task names (empty string or list: none)."""
    names = [t.strip() for t in text.split(",")] if isinstance(text, str) else list(text)
    names = [t for t in names if t]
    unknown = [t for t in names if t not in GENERATORS]
    if unknown:
        raise ConfigError(f"--tasks names {', '.join(unknown)}; expected some of {', '.join(TASKS)}")
    return names


def make_task(name: str, tokenizer, n: int, seed: int) -> TaskPrompts:
    return GENERATORS[name](tokenizer, n, seed)
