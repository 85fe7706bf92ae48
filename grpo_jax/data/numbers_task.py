"""An embedded NON-verifiable task: GRPO with a learned reward model where no rule checks an answer.

    question: "Write 4 numbers from 12 to 87."
    solution: "31 64 18 77"          (SFT: distinct integers in the range, each one's parity a fair coin)
    answer:   "4 12 87"              (count lo hi: what the hidden scorer needs; there is no gold output)

Nothing in the prompt says which lists are better. A hidden scorer prefers even numbers: a well-formed completion scores
(number of even integers) / count, anything else 0. It stands in for a human rater: use it only to label comparison
pairs for the reward model and to evaluate (`win_rate`), never as GRPO's reward, or the task is verifiable again.
The SFT solutions are parity-neutral (expected score 0.5 on every prompt), so any preference the policy shows after RL
came from the reward model.

Splits. A question is a function of its (count, lo, hi) triple and there are only
(max_count - min_count + 1) * |lo_range| * |hi_range| of them (3 * 31 * 40 = 3720 by default), so questions repeat by
design: each example is an independent draw of one of its split's triples with a fresh solution, and `size` may exceed
the number of distinct questions. What is held out is the triple: a triple belongs to the split its question text
hashes to (tasks._split_of, the arithmetic task's rule), so no test or val prompt text ever occurs in training. The
held-out prompts interpolate between training ones (e.g. (4, 12, 87) in test, (4, 12, 86) in train): evaluation
measures whether a learned preference generalises to unseen prompts, not memorisation of answers.
"""
from __future__ import annotations

import random
import re

import numpy as np

from grpo_jax.data.tasks import SPLIT_BUCKETS, Example, _split_of

TEMPLATE = 'Write {count} numbers from {lo} to {hi}.'
TEMPLATE_WORDS = ('Write', 'numbers', 'from', 'to')
LO_RANGE, HI_RANGE = (10, 40), (60, 99)  # inclusive bounds of the range's low and high ends
# Canonical decimal integers (no sign, no leading zeros) joined by single spaces: the SFT format, and the only one
# the scorer accepts, so "010" or "12  14" cannot pass as a well-formed list.
_WELL_FORMED = re.compile(r'(?:0|[1-9][0-9]*)(?: (?:0|[1-9][0-9]*))*')  # [0-9], not \d: no Unicode digits


def make_answer(count: int, lo: int, hi: int) -> str:
  return f'{count} {lo} {hi}'


def parse_answer(answer: str) -> tuple[int, int, int]:
  """(count, lo, hi) from an Example's answer; a malformed answer is a data bug, so it raises."""
  parts = answer.split()
  if len(parts) != 3 or not all(re.fullmatch('[0-9]+', p) for p in parts):
    raise ValueError(f'a numbers-task answer is "count lo hi", got {answer!r}')
  count, lo, hi = map(int, parts)
  return count, lo, hi


def _triples(min_count: int, max_count: int, lo_range: tuple[int, int], hi_range: tuple[int, int]
             ) -> list[tuple[int, int, int]]:
  return [(c, lo, hi) for c in range(min_count, max_count + 1) for lo in range(lo_range[0], lo_range[1] + 1)
          for hi in range(hi_range[0], hi_range[1] + 1)]


def _solution(rng: random.Random, count: int, lo: int, hi: int) -> str:
  # Parity first, then a value of that parity: sampling the range directly would lean odd on ranges like 11..99
  # (45 odd, 44 even), and the SFT policy must have no preference for the reward model to be the only source of one.
  chosen: list[int] = []
  for _ in range(count):
    parity = rng.randrange(2)
    chosen.append(rng.choice([n for n in range(lo + (lo % 2 != parity), hi + 1, 2) if n not in chosen]))
  return ' '.join(map(str, chosen))


def generate_split(split: str, size: int, *, seed: int, min_count: int = 3, max_count: int = 5,
                   lo_range: tuple[int, int] = LO_RANGE, hi_range: tuple[int, int] = HI_RANGE) -> list[Example]:
  """`size` examples of one split ('train', 'val' or 'test'), deterministic in (split, seed) and the ranges.

  Questions may repeat within a split (see the module docstring); the (count, lo, hi) triples of different splits
  never overlap, whatever the seed or sizes.
  """
  if split not in SPLIT_BUCKETS:
    raise ValueError(f'unknown split {split!r}; known: {sorted(SPLIT_BUCKETS)}')
  if size <= 0:
    raise ValueError(f'split size must be positive, got {size} for {split!r}')
  if not (1 <= min_count <= max_count):
    raise ValueError(f'need 1 <= min_count <= max_count, got {min_count}, {max_count}')
  if not (0 <= lo_range[0] <= lo_range[1] < hi_range[0] <= hi_range[1]):
    raise ValueError(f'need 0 <= lo_range <= hi_range, in order, got {lo_range}, {hi_range}')
  narrowest = hi_range[0] - lo_range[1] + 1
  if max_count > narrowest // 2:  # a solution may be all one parity, and its numbers are distinct
    raise ValueError(f'max_count {max_count} exceeds the {narrowest // 2} numbers of one parity in the narrowest '
                     f'range {lo_range[1]}..{hi_range[0]}')
  triples = [t for t in _triples(min_count, max_count, lo_range, hi_range)
             if _split_of(TEMPLATE.format(count=t[0], lo=t[1], hi=t[2])) == split]
  if not triples:
    raise ValueError(f'no (count, lo, hi) triple hashes to {split!r}; widen the task ranges')
  rng = random.Random(f'numbers-{seed}-{split}')
  examples = []
  for _ in range(size):
    count, lo, hi = rng.choice(triples)
    examples.append(Example(TEMPLATE.format(count=count, lo=lo, hi=hi), _solution(rng, count, lo, hi),
                            make_answer(count, lo, hi)))
  return examples


def vocabulary() -> list[str]:
  """The task's words, each one token of the task tokenizer (numbers stay one token per digit)."""
  return sorted(TEMPLATE_WORDS)


def _score_one(completion: str, count: int, lo: int, hi: int) -> float:
  text = completion.strip()
  if not _WELL_FORMED.fullmatch(text):
    return 0.0
  numbers = [int(t) for t in text.split(' ')]
  if len(numbers) != count or len(set(numbers)) != count or not all(lo <= n <= hi for n in numbers):
    return 0.0
  return sum(n % 2 == 0 for n in numbers) / count


def hidden_score(completions: list[str], answers: list[str]) -> np.ndarray:
  """The hidden rater (a RewardFn): (even integers) / count for a well-formed completion, else 0.

  Well-formed: after stripping surrounding whitespace, exactly `count` distinct canonical integers, each in [lo, hi],
  joined by single spaces and nothing else. Distinct, as the SFT data's are: without it a greedy policy that repeats
  one even number ('44 44 44 44', what 150 SFT steps decoded greedily) would score 1 without any preference learned.
  """
  if len(completions) != len(answers):
    raise ValueError(f'{len(completions)} completions but {len(answers)} answers')
  pairs = zip(completions, answers, strict=True)
  return np.array([_score_one(c, *parse_answer(a)) for c, a in pairs], np.float32)


def win_rate(scores_a: np.ndarray, scores_b: np.ndarray) -> float:
  """Fraction of prompts where a's score beats b's, ties counting half ([n] scores of two policies, same prompts)."""
  a, b = np.asarray(scores_a, np.float64), np.asarray(scores_b, np.float64)
  if a.ndim != 1 or a.shape != b.shape or a.size == 0:
    raise ValueError(f'need two non-empty [n] score arrays of the same length, got shapes {a.shape}, {b.shape}')
  return float(np.mean((a > b) + 0.5 * (a == b)))
