r"""Final-answer extraction: the answer a text (a model completion or a gold solution) commits to.

Pure text functions, one reader per answer format; whether an extracted answer is right is decided in verifiers.py
(rewards) and registry.py (gsm8k_exact). None always means "no answer found".

Answer formats:
  '####'  GSM8K's answer line, '#### 1,080'. A mark is a run of four or more '#'; `mark_tails` splits a text at its
          marks and every '####' reader below looks at those tails:
            gsm8k_answer          gold solutions: the text after the last mark, stripped, commas removed.
            extract_final_answer  the gsm8k_exact reward: the number written right after the last mark that has
                                  one ('#### $18' and '#### eighteen' have none); strict on purpose.
            marked_number         the gsm8k verifier: the first number on the line after the last mark, read
                                  leniently ('#### $18.00' -> '18.00'); None when that line holds none.
  boxed   \boxed{...} / \fbox{...} with braces matched, or '\boxed X' (one token, up to a space, '$' or brace).
          `last_boxed` returns the last COMPLETE box: an unclosed box (a completion cut off at its length limit
          inside '\boxed{') is skipped, so an earlier complete box still counts. Treating the unclosed rest as the
          answer would score text the model never finished; returning None would discard an answer the model did
          commit to. On the shipped gold solutions the last box is always closed, so gold answers do not depend
          on this choice (tests/test_answers.py checks it).

Benchmark rules (the answer a completion commits to; the first rule that yields an answer wins):
  gsm8k  last '#### N' > last \boxed{N} > last 'the answer is N' (any case) > last number in the text.
  cmath  last \boxed{N} > last '答案是 N' / '答案：N' > last 'the answer is N' > last number in the text.
  math   last complete \boxed{...} / \boxed X / \fbox{...} > 'final answer is $X$' > 'the answer is X'; no
         last-number fallback (a stray number from the reasoning is no answer to a symbolic problem).
A marker rule takes the first number after the marker; a marker holding no number falls through to the next rule.
Numbers: thousands commas (1,000), signs (also U+2212), decimals, fractions (3/4, \frac{3}{4}), currency and units
($18, \$18, 18 dollars, \text{...}), percents (50%) and trailing punctuation ('18.') are read; `parse_number` gives
a number string's exact value.
"""
from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Sequence
from fractions import Fraction

# ---------------------------------------------------------------------------------------------------- numbers
_NUM = r'(?:(?<![\w.])-)?(?:\d{1,3}(?:,\d{3})+(?![\d,]\d)|\d+)(?:\.\d+)?|(?<![\w.])-?\.\d+'
_NUMBER = re.compile(rf'(?P<a>{_NUM})(?:\s*/\s*(?P<b>{_NUM}))?(?P<pct>\s*%)?')
_LATEX_FRAC = re.compile(r'\\[dtc]?frac\s*(?:\{\s*(-?[\d.,]+)\s*\}|(\d))\s*(?:\{\s*(-?[\d.,]+)\s*\}|(\d))')
_LATEX_WRAPPER = re.compile(r'\\(?:text|textbf|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}')


def _clean(text: str) -> str:
  """Rewrites LaTeX and Unicode number spellings into plain ones, so one regex finds every number."""
  text = unicodedata.normalize('NFKC', text).replace('\u2212', '-').replace('{,}', ',')
  text = _LATEX_FRAC.sub(lambda m: f'{m[1] or m[2]}/{m[3] or m[4]}', text)
  text = _LATEX_WRAPPER.sub(r' \1 ', text)
  for latex, plain in (('\\%', '%'), ('\\$', '$'), ('\\left', ''), ('\\right', ''), ('\\!', ''), ('\\,', ' ')):
    text = text.replace(latex, plain)
  # '$-5', '-$5' and '$ 5' are all amounts of money: drop the currency sign so the sign sits next to the digits.
  return re.sub(r'\$\s*', '', text)


def _strip(number: str) -> str:
  return re.sub(r'[\s,]', '', number)


def _format_match(m: re.Match) -> str:
  out = _strip(m['a']) if m['b'] is None else f"{_strip(m['a'])}/{_strip(m['b'])}"
  return out + ('%' if m['pct'] else '')


def first_number(text: str) -> str | None:
  """The first number in `text`, normalized: '\\$1,000.50' -> '1000.50', '\\frac{3}{4}' -> '3/4', '50 %' -> '50%'."""
  m = _NUMBER.search(_clean(text))
  return _format_match(m) if m else None


def last_number(text: str) -> str | None:
  """The last number in `text`, normalized as by first_number."""
  matches = list(_NUMBER.finditer(_clean(text)))
  return _format_match(matches[-1]) if matches else None


def parse_number(text: str) -> tuple[Fraction, bool] | None:
  """(exact value, written as a percent) of a number string such as '1,000', '-3.50', '3/4', '50%' or '\\$18'."""
  m = _NUMBER.search(_clean(text))
  if m is None:
    return None
  try:
    value = Fraction(_strip(m['a'])) / (1 if m['b'] is None else Fraction(_strip(m['b'])))
  except (ValueError, ZeroDivisionError):
    return None
  return value, bool(m['pct'])


# ---------------------------------------------------------------------------------------------------- '####'
# Four or more: in '##### 5' the mark is the whole run, so its tail is ' 5', not '# 5'.
_MARK = re.compile(r'#{4,}')
# gsm8k_exact's number: digits (commas allowed) with an optional decimal part, nothing else (no '$', '/', '%').
_PLAIN_NUMBER = re.compile(r'\s*(-?[\d,]*\.?\d+)')


def mark_tails(text: str) -> list[str]:
  """The text after each '####' mark up to the next mark, in order; [] when there is no mark."""
  return _MARK.split(text)[1:]


def gsm8k_answer(solution: str) -> str | None:
  """GSM8K gold answer: the text after the last '####', stripped, commas removed. '... #### 1,080' -> '1080'."""
  tails = mark_tails(solution)
  return tails[-1].strip().replace(',', '') if tails else None


def extract_final_answer(text: str) -> str | None:
  """The number right after the last '####' that is followed by one, commas removed: '#### 1,234' -> '1234'."""
  for tail in reversed(mark_tails(text)):
    if m := _PLAIN_NUMBER.match(tail):
      return m[1].replace(',', '')
  return None


def marked_number(text: str) -> str | None:
  """The first number (see first_number) on the line after the last '####'; None without a mark or a number."""
  tails = mark_tails(text)
  return first_number(tails[-1].lstrip().split('\n', 1)[0]) if tails else None


# ---------------------------------------------------------------------------------------------------- boxes
_BOXED = re.compile(r'\\(?:boxed|fbox)\s*(\{)|\\boxed\s+([^\s${}]+)')


def last_boxed(text: str) -> str | None:
  """Contents of the last complete \\boxed{...} / \\fbox{...} (braces matched, stripped) or \\boxed X.

  '$\\boxed{\\frac{1}{2}}$' -> '\\frac{1}{2}'; '$\\boxed 5$' -> '5'; an unclosed box is skipped (see the module
  docstring): '\\boxed{1} ... \\boxed{2' -> '1'; '\\boxed{2' -> None.
  """
  for m in reversed(list(_BOXED.finditer(text))):
    if m[1] is None:
      return m[2]
    depth, start = 0, m.end(1)
    for i in range(start - 1, len(text)):
      depth += {'{': 1, '}': -1}.get(text[i], 0)
      if depth == 0:
        return text[start:i].strip()
  return None


# ---------------------------------------------------------------------------------------------------- benchmarks
_ANSWER_IS = re.compile(r'answer\s+is\s*:?\s*([^\n]*)', re.IGNORECASE)
_ANSWER_ZH = re.compile(r'答案(?:是|为)?\s*[:：]?\s*([^\n]*)')


def _number_after_last(pattern: re.Pattern, text: str) -> str | None:
  matches = pattern.findall(text)
  return first_number(matches[-1]) if matches else None


def _number_in_boxed(text: str) -> str | None:
  boxed = last_boxed(text)
  return first_number(boxed) if boxed is not None else None


def _first_found(text: str, rules: Sequence[re.Pattern | Callable[[str], str | None]]) -> str | None:
  for rule in rules:
    found = _number_after_last(rule, text) if isinstance(rule, re.Pattern) else rule(text)
    if found is not None:
      return found
  return None


def extract_gsm8k_answer(text: str) -> str | None:
  """The final number of a GSM8K completion (rules in the module docstring), e.g. '18', '-3.5', '3/4', '50%'."""
  return _first_found(text, (marked_number, _number_in_boxed, _ANSWER_IS, last_number))


def extract_cmath_answer(text: str) -> str | None:
  """The final number of a CMATH completion (rules in the module docstring)."""
  return _first_found(text, (_number_in_boxed, _ANSWER_ZH, _ANSWER_IS, last_number))


def extract_math_answer(text: str) -> str | None:
  """The LaTeX answer of a MATH completion: the last \\boxed{}, else a 'final answer is $X$' / 'answer is X'."""
  if (boxed := last_boxed(text)) is not None:
    return boxed
  if (m := re.findall(r'final answer is \$(.+?)\$', text)):
    return m[-1].strip()
  if (m := _ANSWER_IS.findall(text)):
    # A sentence ends at '. ' or at the line's end; a decimal point is never followed by a space.
    answer = re.split(r'\.\s', m[-1] + ' ', maxsplit=1)[0].strip().strip('$').strip()
    return answer or None
  return None


# Keyed like verifiers.VERIFIERS.
EXTRACTORS_BY_VERIFIER: dict[str, Callable[[str], str | None]] = {
    'gsm8k': extract_gsm8k_answer, 'math': extract_math_answer, 'cmath': extract_cmath_answer}


def extract_answer(verifier_name: str, completion: str) -> str | None:
  """The answer a completion commits to, as the named verifier reads it (None: no answer); for maj@k voting."""
  if verifier_name not in EXTRACTORS_BY_VERIFIER:
    raise ValueError(f'unknown verifier {verifier_name!r}; known: {sorted(EXTRACTORS_BY_VERIFIER)}')
  return EXTRACTORS_BY_VERIFIER[verifier_name](completion)
