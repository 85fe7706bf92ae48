"""The embedded task: GSM8K-style multi-step +/- word problems, generated deterministically from a seed.

    question: "Mia has 47 shells. She finds 8, loses 5, then buys 3. How many shells does Mia have now?"
    solution: "47+8=55\n55-5=50\n50+3=53\n#### 53"

The worked solutions can come from an imperfect teacher that forgets the borrow in a subtraction across a tens
boundary ("52-7=55" for 52-7=45) with probability `teacher_slip`, and carries its wrong value on to its final line.
The error is systematic: where slip > 0.5 the teacher's most likely digit is the wrong one, so imitation (greedy
decoding of a policy that learned the teacher) is capped near the teacher's accuracy, while an outcome reward
against the true answer can exceed it. The answer field is always the true one.

Splits are disjoint by construction: a problem belongs to the split its question text hashes to, so no
held-out question can appear in training whatever the seed or sizes.
"""
from __future__ import annotations

import hashlib
import random
from typing import NamedTuple

NAMES = ('Mia', 'Noah', 'Ava', 'Liam', 'Zoe', 'Omar', 'Ivy', 'Leo', 'Ana', 'Ben', 'Kai', 'Eva')
ITEMS = ('shells', 'apples', 'stickers', 'coins', 'marbles', 'cards', 'pens', 'stamps', 'beads', 'books')
GAIN_VERBS = ('finds', 'buys', 'gets', 'wins')
LOSS_VERBS = ('loses', 'eats', 'sells', 'gives away')
TEMPLATE_WORDS = ('has', 'then', 'How', 'many', 'now', 'gives', 'away')
SPLIT_BUCKETS = {'train': range(0, 80), 'val': range(80, 90), 'test': range(90, 100)}  # percent of hash space


class Example(NamedTuple):
  question: str
  solution: str  # step lines, then "#### N"
  answer: str  # N


def _split_of(question: str) -> str:
  bucket = int(hashlib.md5(question.encode()).hexdigest(), 16) % 100
  return next(name for name, r in SPLIT_BUCKETS.items() if bucket in r)


def make_problem(rng: random.Random, *, min_steps: int, max_steps: int, start_range: tuple[int, int],
                 change_range: tuple[int, int], teacher_slip: float = 0.0,
                 teacher_rng: random.Random | None = None) -> Example:
  """One problem. teacher_slip > 0 draws the teacher's borrow slips from `teacher_rng` (so the questions do not
  depend on the teacher)."""
  name, item = rng.choice(NAMES), rng.choice(ITEMS)
  start = value = rng.randint(*start_range)
  taught = start  # the teacher's running value: the true one until it slips
  phrases, lines = [], []
  for _ in range(rng.randint(min_steps, max_steps)):
    change = rng.randint(*change_range)
    gain = value - change < 0 or rng.random() < 0.5  # never go negative
    verb = rng.choice(GAIN_VERBS if gain else LOSS_VERBS)
    value = value + change if gain else value - change
    new = taught + change if gain else taught - change
    if not gain and taught % 10 < change and teacher_slip > 0 and teacher_rng.random() < teacher_slip:
      new += 10  # the borrow forgotten: the tens digit left as it was
    phrases.append(f'{verb} {change}')
    lines.append(f"{taught}{'+' if gain else '-'}{change}={new}")
    taught = new
  actions = ', '.join(phrases[:-1]) + f', then {phrases[-1]}' if len(phrases) > 1 else phrases[0]
  question = f'{name} has {start} {item}. {name} {actions}. How many {item} now?'
  return Example(question, '\n'.join(lines + [f'#### {taught}']), str(value))


def generate_split(split: str, size: int, *, seed: int, min_steps: int = 2, max_steps: int = 3,
                   start_range: tuple[int, int] = (10, 99), change_range: tuple[int, int] = (2, 9),
                   teacher_slip: float = 0.0) -> list[Example]:
  """`size` distinct problems of one split ('train', 'val' or 'test'), deterministic in (split, seed).

  teacher_slip: the probability that a solution forgets a borrow (module docstring); the questions and answers do
  not depend on it."""
  if split not in SPLIT_BUCKETS:
    raise ValueError(f'unknown split {split!r}; known: {sorted(SPLIT_BUCKETS)}')
  if size <= 0:
    raise ValueError(f'split size must be positive, got {size} for {split!r}')
  if not (1 <= min_steps <= max_steps):
    raise ValueError(f'need 1 <= min_steps <= max_steps, got {min_steps}, {max_steps}')
  if not 0.0 <= teacher_slip <= 1.0:
    raise ValueError(f'teacher_slip is a probability, got {teacher_slip}')
  rng, teacher_rng = random.Random(f'{seed}-{split}'), random.Random(f'{seed}-{split}-teacher')
  seen, examples = set(), []
  for _ in range(200 * size):  # bounded: a too-small problem space is an error, not a hang
    ex = make_problem(rng, min_steps=min_steps, max_steps=max_steps, start_range=tuple(start_range),
                      change_range=tuple(change_range), teacher_slip=teacher_slip, teacher_rng=teacher_rng)
    if ex.question not in seen and _split_of(ex.question) == split:
      seen.add(ex.question)
      examples.append(ex)
      if len(examples) == size:
        return examples
  raise ValueError(f'could not generate {size} distinct {split!r} problems; widen the task ranges')


def vocabulary() -> list[str]:
  """The task's words, each one token of the task tokenizer (numbers stay one token per digit)."""
  words = [*NAMES, *ITEMS, *TEMPLATE_WORDS, *GAIN_VERBS, *LOSS_VERBS]
  return sorted({w for phrase in words for w in phrase.split()})
