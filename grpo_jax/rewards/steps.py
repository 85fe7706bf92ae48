"""Step verifiers: per-step rewards for DeepSeekMath process supervision (section 4.1.3).

A step verifier maps (prompt text, the output's step texts in order, gold answer) to one reward per step, each in
[0, 1]. The steps are the output's text cut after each delimiter token (grpo_jax.rollout.steps), so an output with no
delimiter is a single step. Pick one by name from `STEP_VERIFIERS`; add one by adding an entry.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from fractions import Fraction

from grpo_jax.data.tasks import GAIN_VERBS, LOSS_VERBS

StepVerifier = Callable[[str, list[str], str], list[float]]

# `a op b = c`, the whole step. Signs are allowed on the numbers so '5-9=-4' parses (and is then judged).
_ARITHMETIC_LINE = re.compile(r'(-?\d+)\s*([+-])\s*(-?\d+)\s*=\s*(-?\d+)')
_FINAL_LINE = re.compile(r'#{4,}\s*(-?[\d,]*\.?\d+)')  # four or more '#', as grpo_jax.rewards.answers reads a mark
# Special-token text a caller may have decoded along with the step ('<eos>', '</s>', '<|im_end|>').
_TRAILING_SPECIALS = re.compile(r'(?:\s*<[^<>\s]+>)+\s*$')
# Longer numbers are malformed: int() refuses strings of over 4300 digits, and no task quantity is near that.
_MAX_DIGITS = 100
_QUESTION_START = re.compile(r'\bhas\s+\d+')
_QUESTION_END = re.compile(r'\bHow many\b')
_INTEGER = re.compile(r'\d+')
# The word right before a change quantity names its direction ('gives away 5': 'away').
_GAIN_WORDS = frozenset(v.split()[-1] for v in GAIN_VERBS)
_LOSS_WORDS = frozenset(v.split()[-1] for v in LOSS_VERBS)
_WORD_BEFORE = re.compile(r'([A-Za-z]+)\W*$')


def _clean_step(step: str) -> str:
  return _TRAILING_SPECIALS.sub('', step).strip()


def _question_quantities(prompt: str) -> tuple[int | None, list[tuple[int, str | None]]]:
  """(starting quantity, [(change quantity, '+' / '-' / None)] in order of appearance) of the task question.

  The question is the prompt's last span from 'has <number>' up to the next 'How many' (or the prompt's end), so
  few-shot examples before it and chat-template text around it (which may hold dates) are not read; a prompt with
  no 'has <number>' is read whole. The sign is '+' / '-' when the word right before the quantity is one of the
  task's gain / loss verbs, None otherwise.
  """
  starts = list(_QUESTION_START.finditer(prompt))
  begin = starts[-1].start() if starts else 0
  end = _QUESTION_END.search(prompt, begin)
  question = prompt[begin:end.start() if end else len(prompt)]
  numbers = list(_INTEGER.finditer(question))
  if not numbers:
    return None, []
  changes = []
  for m in numbers[1:]:
    word = _WORD_BEFORE.search(question[:m.start()])
    word = word[1] if word else ''
    changes.append((int(m[0]), '+' if word in _GAIN_WORDS else '-' if word in _LOSS_WORDS else None))
  return int(numbers[0][0]), changes


def _same_number(written: str, gold: str) -> bool:
  try:
    return Fraction(written.replace(',', '')) == Fraction(gold.strip().replace(',', ''))
  except (ValueError, ZeroDivisionError):
    return False


def arithmetic_steps(prompt: str, steps: list[str], answer: str) -> list[float]:
  """Per-step rewards for the embedded +/- task (grpo_jax.data.tasks), whose solutions read
  '47+8=55\\n55-5=50\\n50+3=53\\n#### 53'.

  Each step is first stripped of surrounding whitespace (the '\\n' delimiter included) and of trailing
  special-token text such as '<eos>'. Then, and nothing else scores:
    - An arithmetic step, the whole step matching `a op b = c` (integers, op '+' or '-', spaces around op and '='),
      earns 1.0 iff all of:
        1. c == a op b;
        2. a is the running value: the c of the previous arithmetic step, or for the first arithmetic step the
           question's starting quantity (its first number);
        3. b is the k-th change quantity of the question (the numbers after the starting quantity, in order of
           appearance), where this is the k-th arithmetic step; each arithmetic step, right or wrong, uses up one,
           so a typo in one line does not shift the quantities of the lines after it;
        4. op is '+' after a gain verb ('finds 8') and '-' after a loss verb ('eats 5', 'gives away 5'); when the
           word before the quantity is neither, any op passes.
      Condition 2 uses the value the output wrote, not the gold solution's: a step that carries an earlier mistake
      forward correctly still earns 1.0, so each step is rewarded for being a valid move from where it stands.
    - A final step, the whole step '#### N' (four or more '#'), earns 1.0 iff N equals `answer` numerically.
    - Any other step (prose, a malformed or partial line, a number of over 100 digits, an empty step) earns 0.0
      and leaves the running value and the change quantities untouched.
  See `_question_quantities` for how the question is found inside a formatted prompt.

  Returns:
    one reward per step, in order ([] for no steps).
  """
  value, changes = _question_quantities(prompt)
  used = 0
  rewards = []
  for step in steps:
    text = _clean_step(step)
    if m := _FINAL_LINE.fullmatch(text):
      rewards.append(float(_same_number(m[1], answer)))
    elif (m := _ARITHMETIC_LINE.fullmatch(text)) and all(len(g) <= _MAX_DIGITS for g in (m[1], m[3], m[4])):
      a, op, b, c = int(m[1]), m[2], int(m[3]), int(m[4])
      change, sign = changes[used] if used < len(changes) else (None, None)
      ok = (c == (a + b if op == '+' else a - b) and value is not None and a == value and b == change
            and sign in (None, op))
      rewards.append(float(ok))
      value, used = c, used + 1
    else:
      rewards.append(0.0)
  return rewards


STEP_VERIFIERS: dict[str, StepVerifier] = {'arithmetic': arithmetic_steps}


def get_step_verifier(name: str) -> StepVerifier:
  if name not in STEP_VERIFIERS:
    raise ValueError(f'unknown step verifier {name!r}; known: {sorted(STEP_VERIFIERS)}')
  return STEP_VERIFIERS[name]
