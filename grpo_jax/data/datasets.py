"""Math word-problem datasets as tensorflow-datasets builders, plus a plain JSONL loader for anything else.

  examples = load_examples('gsm8k', 'test')                          # list[MathExample], file order
  examples = load_examples('math', 'train', source_dir='~/MATH')     # Hendrycks MATH, not shipped
  examples = load_jsonl('x.jsonl', question_field='q', answer_field='a')

Builders read `<source_dir>/<split>.jsonl` (default: the JSONL shipped under the project's data/, see data/README.md)
and write array_record files under a tfds data dir: `tfds_dir=`, else $GRPO_JAX_TFDS_DIR, else
~/.cache/grpo_jax/tensorflow_datasets. The builder config is named after a hash of the source files, so an edited
source is prepared afresh into a new directory instead of serving stale records. array_record stores records in
shuffled order, so every record carries its position in the source (`index`) and `load_examples` sorts by it.
Only the array_record writer and `as_data_source` are used: TensorFlow is not needed.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from grpo_jax.rewards.answers import gsm8k_answer, last_boxed

DATA_DIR = Path(__file__).resolve().parents[2] / 'data'  # the project's shipped JSONL
DEFAULT_TFDS_DIR = '~/.cache/grpo_jax/tensorflow_datasets'


@dataclasses.dataclass(frozen=True)
class MathExample:
  """One problem.

  Fields:
    question: the problem statement shown to the model.
    answer: the gold final answer string the reward compares against (e.g. '1080', '\\frac{1}{2}').
    solution: the full reference solution, '' when the dataset has none (CMATH).
  """
  question: str
  answer: str
  solution: str = ''


# --- final-answer extraction (the readers live in grpo_jax/rewards/answers.py) ---

# answer_from_solution names for load_jsonl.
EXTRACTORS: dict[str, Callable[[str], str | None]] = {'gsm8k': gsm8k_answer, 'boxed': last_boxed}


# --- reading sources (all validation happens here, before tfds writes anything) ---

def read_jsonl(path: Path) -> list[tuple[int, dict]]:
  """(1-based line number, record) for every non-blank line; ValueError naming file and line on bad input."""
  if not path.is_file():
    raise FileNotFoundError(f'{path} not found')
  rows = []
  with path.open(encoding='utf-8') as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():  # tolerate blank lines, e.g. a trailing newline
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f'{path}:{lineno}: broken JSON ({e.msg}, column {e.colno})') from None
      if not isinstance(record, dict):
        raise ValueError(f'{path}:{lineno}: expected a JSON object, got {type(record).__name__}')
      rows.append((lineno, record))
  if not rows:
    raise ValueError(f'{path} is empty: no JSON records')
  return rows


def _field(record: dict, name: str, where: str) -> str:
  if name not in record:
    raise ValueError(f'{where}: record has no field {name!r} (it has {sorted(record)})')
  value = record[name]
  if value is None:  # a JSON null: present, so "no field" (listing it among the fields) would contradict itself
    raise ValueError(f'{where}: field {name!r} is null')
  return value if isinstance(value, str) else str(value)  # numeric answers (e.g. 18) become '18'


def _gsm8k_example(record: dict, where: str) -> MathExample:
  solution = _field(record, 'answer', where)  # GSM8K's 'answer' is the worked solution ending in '#### <number>'
  answer = gsm8k_answer(solution)
  if answer is None:
    raise ValueError(f"{where}: field 'answer' has no '#### <final answer>'")
  return MathExample(_field(record, 'question', where), answer, solution)


def _math_example(record: dict, where: str) -> MathExample:
  """MATH / MATH500 record: problem, solution and (optional in Hendrycks' files) answer; else the last box."""
  solution = _field(record, 'solution', where)
  answer = _field(record, 'answer', where) if record.get('answer') is not None else last_boxed(solution)
  if answer is None:
    state = "field 'answer' is null" if 'answer' in record else "no field 'answer'"  # optional: null = absent
    raise ValueError(f"{where}: {state} and no \\boxed{{}} in the solution")
  return MathExample(_field(record, 'problem', where), answer, solution)


def _cmath_example(record: dict, where: str) -> MathExample:
  return MathExample(_field(record, 'question', where), _field(record, 'answer', where))


def _content_hash(files: list[tuple[str, Path]]) -> str:
  """Short hash of (name, content) pairs: the builder config name, so edited sources never hit a stale cache."""
  h = hashlib.sha256()
  for name, path in files:
    h.update(name.encode() + b'\0' + hashlib.sha256(path.read_bytes()).digest())
  return h.hexdigest()[:12]


@contextlib.contextmanager
def _quiet_absl() -> Iterator[None]:
  """Hide tfds' warnings about our custom (hash-named) config and its not-yet-written folder: both are expected.

  Errors still raise; the source files were validated before tfds runs.
  """
  logger = logging.getLogger('absl')
  level = logger.level
  logger.setLevel(logging.ERROR)
  try:
    yield
  finally:
    logger.setLevel(level)


# --- builders ---

class _MathBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Records {index: int64, question, answer, solution: text} from `<source_dir>/<split>.jsonl`.

  Subclasses set the splits, the default source and the record parser. Bump VERSION when parsing changes:
  the config hash covers the source files, not this code.
  """
  VERSION = tfds.core.Version('1.0.0')
  SPLITS: tuple[str, ...] = ('test',)
  DEFAULT_SOURCE: Path = DATA_DIR
  HOMEPAGE = ''
  LICENSE = ''
  parse: Callable[[dict, str], MathExample] = staticmethod(_cmath_example)
  # tfds looks for a checksums file next to the builder's module through `importlib_resources`, which is not
  # installed (and nothing is downloaded): without a code path it skips the lookup.
  code_path = None

  def __init__(self, *, source_dir: str | os.PathLike | None = None, data_dir: str | None = None):
    self.source_dir = Path(source_dir or self.DEFAULT_SOURCE).expanduser().resolve()
    # Splits whose source exists; the others stay unprepared and asking for them raises.
    self.split_files = {s: fs for s in self.SPLITS if (fs := self.find_files(s))}
    named = [(str(p.relative_to(self.source_dir)), p) for fs in self.split_files.values() for p in fs]
    config = tfds.core.BuilderConfig(name=f'src-{_content_hash(named)}', description=f'from {self.source_dir}')
    self._examples: dict[str, list[MathExample]] = {}
    super().__init__(data_dir=data_dir, config=config, file_format='array_record')

  def find_files(self, split: str) -> list[Path]:
    path = self.source_dir / f'{split}.jsonl'
    return [path] if path.is_file() else []

  def missing_message(self, split: str) -> str:
    return (f'{self.name} {split}: source file {self.source_dir / f"{split}.jsonl"} not found; pass source_dir= '
            f'a directory holding {split}.jsonl')

  def read_split(self, split: str) -> list[MathExample]:
    (path,) = self.split_files[split]
    return [self.parse(record, f'{path}:{lineno}') for lineno, record in read_jsonl(path)]

  def examples(self, split: str) -> list[MathExample]:
    """Parsed source of one split in file order (memoized: validated first, then generated from)."""
    if split not in self._examples:
      self._examples[split] = self.read_split(split)
    return self._examples[split]

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self, description=(self.__doc__ or '').split('\n')[0], homepage=self.HOMEPAGE, license=self.LICENSE,
        features=tfds.features.FeaturesDict({'index': np.int64, 'question': tfds.features.Text(),
                                             'answer': tfds.features.Text(), 'solution': tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    del dl_manager  # sources are local files, nothing to download
    return {split: self._generate_examples(split) for split in self.split_files}

  def _generate_examples(self, split: str):
    for i, example in enumerate(self.examples(split)):
      yield i, {'index': i, **dataclasses.asdict(example)}


class Gsm8k(_MathBuilder, skip_registration=True):
  """GSM8K (Cobbe et al. 2021): grade-school word problems; answer = the number after ####."""
  name = 'gsm8k'
  SPLITS = ('train', 'test')
  DEFAULT_SOURCE = DATA_DIR / 'gsm8k'
  HOMEPAGE = 'https://github.com/openai/grade-school-math'
  LICENSE = 'MIT'
  parse = staticmethod(_gsm8k_example)


class Math500(_MathBuilder, skip_registration=True):
  """MATH500: the 500-problem MATH test subset of Lightman et al. 2023 (openai/prm800k)."""
  name = 'math500'
  DEFAULT_SOURCE = DATA_DIR / 'math500'
  HOMEPAGE = 'https://github.com/openai/prm800k'
  LICENSE = 'MIT'
  parse = staticmethod(_math_example)


class Cmath(_MathBuilder, skip_registration=True):
  """CMATH (Wei et al. 2023): Chinese elementary-school math word problems; answer only, no solution."""
  name = 'cmath'
  DEFAULT_SOURCE = DATA_DIR / 'cmath'
  HOMEPAGE = 'https://github.com/XiaoMi/cmath'
  LICENSE = 'CC BY 4.0'


class Math(_MathBuilder, skip_registration=True):
  """MATH (Hendrycks et al. 2021), not shipped: `<dir>/<split>.jsonl` or the original `<dir>/<split>/<subject>/*.json`.

  Hendrycks' files have problem/level/type/solution; the answer is the last \\boxed{} of the solution. JSON files
  are read in (subject, natural file number) order, which defines `index`.
  """
  name = 'math'
  SPLITS = ('train', 'test')
  DEFAULT_SOURCE = DATA_DIR / 'math'
  HOMEPAGE = 'https://github.com/hendrycks/math'
  LICENSE = 'MIT'
  parse = staticmethod(_math_example)

  def find_files(self, split: str) -> list[Path]:
    jsonl = super().find_files(split)  # a JSONL export wins over the directory layout when both are there
    natural = lambda p: (p.parent.name, len(p.stem), p.stem)  # '2.json' before '10.json'
    return jsonl or sorted((self.source_dir / split).glob('*/*.json'), key=natural)

  def missing_message(self, split: str) -> str:
    return (f'math {split}: found neither {self.source_dir / f"{split}.jsonl"} (fields problem, solution, answer) '
            f'nor Hendrycks MATH files {self.source_dir / split}/<subject>/<n>.json. Download MATH '
            f'(https://github.com/hendrycks/math) and extract it so that {DATA_DIR / "math" / split}/algebra/1.json '
            'exists, or pass source_dir= the extracted MATH directory.')

  def read_split(self, split: str) -> list[MathExample]:
    files = self.split_files[split]
    if files[0].suffix == '.jsonl':
      return super().read_split(split)
    out = []
    for path in files:
      try:
        record = json.loads(path.read_text(encoding='utf-8'))
      except json.JSONDecodeError as e:
        raise ValueError(f'{path}:{e.lineno}: broken JSON ({e.msg}, column {e.colno})') from None
      if not isinstance(record, dict):
        raise ValueError(f'{path}: expected a JSON object, got {type(record).__name__}')
      out.append(self.parse(record, str(path)))
    return out


DATASETS: dict[str, type[_MathBuilder]] = {'gsm8k': Gsm8k, 'math500': Math500, 'math': Math, 'cmath': Cmath}


def tfds_data_dir(tfds_dir: str | None = None) -> str:
  """Where prepared datasets live: the argument, else $GRPO_JAX_TFDS_DIR, else ~/.cache/grpo_jax/tensorflow_datasets."""
  return os.path.expanduser(tfds_dir or os.environ.get('GRPO_JAX_TFDS_DIR') or DEFAULT_TFDS_DIR)


def load_examples(name: str, split: str, *, source_dir: str | None = None, tfds_dir: str | None = None,
                  limit: int | None = None) -> list[MathExample]:
  """The examples of one split in source-file order, preparing the tfds dataset on first use (local, no network).

  Args:
    name: a key of DATASETS ('gsm8k', 'math500', 'math', 'cmath').
    split: one of the builder's SPLITS.
    source_dir: directory with `<split>.jsonl` (or MATH's layout); default: the dataset's folder under data/.
    tfds_dir: tfds data dir for the prepared array_record files (see `tfds_data_dir`).
    limit: keep only the first `limit` examples.
  Returns:
    [n] MathExample, n = min(limit, split size), deterministic.
  """
  if name not in DATASETS:
    raise ValueError(f'unknown dataset {name!r}; known: {sorted(DATASETS)} (or use load_jsonl for another JSONL)')
  cls = DATASETS[name]
  if split not in cls.SPLITS:
    raise ValueError(f'unknown split {split!r} of {name}; known: {list(cls.SPLITS)}')
  if limit is not None and limit < 0:
    raise ValueError(f'limit must be >= 0 or None, got {limit}')
  with _quiet_absl():
    builder = cls(source_dir=source_dir, data_dir=tfds_data_dir(tfds_dir))
    if split not in builder.split_files:
      raise FileNotFoundError(builder.missing_message(split))
    if not builder.is_prepared():
      for s in builder.split_files:  # parse every source first: bad input fails before tfds writes anything
        builder.examples(s)
      builder.download_and_prepare()
  source = builder.as_data_source(split=split)
  records = sorted(source.__getitems__(range(len(source))), key=lambda r: int(r['index']))
  text = lambda value: value.decode('utf-8')  # tfds Text comes back as bytes
  return [MathExample(text(r['question']), text(r['answer']), text(r['solution'])) for r in records[:limit]]


def load_jsonl(path: str | os.PathLike, *, question_field: str, answer_field: str, solution_field: str | None = None,
               answer_from_solution: str | None = None, limit: int | None = None) -> list[MathExample]:
  """Any JSONL of problems, no tfds. Records in file order; blank lines are skipped.

  Args:
    path: the JSONL file.
    question_field / answer_field / solution_field: field names; no solution_field gives solution ''.
    answer_from_solution: None (answer_field is the final answer), or 'gsm8k' / 'boxed' when answer_field holds a
      full solution: the answer is then the text after '####' / the last \\boxed{}, and the full text becomes
      the solution unless solution_field is given.
    limit: keep only the first `limit` records (the whole file is still validated).
  Returns:
    [n] MathExample.
  """
  if answer_from_solution is not None and answer_from_solution not in EXTRACTORS:
    raise ValueError(f'answer_from_solution must be None or one of {sorted(EXTRACTORS)}, got {answer_from_solution!r}')
  path = Path(path).expanduser()
  out = []
  for lineno, record in read_jsonl(path):
    where = f'{path}:{lineno}'
    question, answer = _field(record, question_field, where), _field(record, answer_field, where)
    solution = _field(record, solution_field, where) if solution_field else ''
    if answer_from_solution is not None:
      extracted = EXTRACTORS[answer_from_solution](answer)
      if extracted is None:
        raise ValueError(f'{where}: no {answer_from_solution} final answer in field {answer_field!r}')
      answer, solution = extracted, (solution if solution_field else answer)
    out.append(MathExample(question, answer, solution))
  return out[:limit]
