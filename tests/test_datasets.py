"""grpo_jax.data.datasets: tfds builders give back exactly the source JSONL, in file order; bad input fails clearly."""
import json
import os

import pytest

from grpo_jax.data import datasets
from grpo_jax.data.datasets import MathExample, load_examples, load_jsonl
from grpo_jax.rewards.answers import gsm8k_answer, last_boxed

DATA = datasets.DATA_DIR


def _jsonl(path, records):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(''.join(json.dumps(r, ensure_ascii=False) + '\n' for r in records), encoding='utf-8')
  return path


def _plain(path):
  return [json.loads(line) for line in open(path, encoding='utf-8')]


@pytest.fixture(scope='module')
def shared_tfds_dir(tmp_path_factory):
  """One tfds dir for the shipped datasets, so gsm8k is prepared once for both splits (about 1 s)."""
  return str(tmp_path_factory.mktemp('tfds'))


@pytest.mark.parametrize('name, split, count', [('gsm8k', 'test', 1319), ('gsm8k', 'train', 7473),
                                                ('math500', 'test', 500), ('cmath', 'test', 600)])
def test_shipped_dataset_is_the_jsonl_in_file_order(shared_tfds_dir, name, split, count):
  rows = _plain(DATA / name / f'{split}.jsonl')
  if name == 'gsm8k':
    expected = [MathExample(r['question'], r['answer'].split('####')[-1].strip().replace(',', ''), r['answer'])
                for r in rows]
  elif name == 'math500':
    expected = [MathExample(r['problem'], r['answer'], r['solution']) for r in rows]
  else:
    expected = [MathExample(r['question'], r['answer']) for r in rows]
  got = load_examples(name, split, tfds_dir=shared_tfds_dir)
  assert len(got) == count == len(expected)
  assert got == expected  # array_record stores them shuffled; `index` puts them back
  assert load_examples(name, split, tfds_dir=shared_tfds_dir, limit=5) == expected[:5]


def test_answer_extraction():
  assert gsm8k_answer('3 + 4 = <<3+4=7>>7\n#### 1,080') == '1080'
  assert gsm8k_answer('no final answer') is None
  assert last_boxed(r'So $x = \boxed{\frac{1}{2}}$.') == r'\frac{1}{2}'  # nested braces
  assert last_boxed(r'\boxed{1} then \boxed{\{a, b\}}') == r'\{a, b\}'  # the last box wins
  assert last_boxed(r'$\boxed 5$') == '5'
  assert last_boxed(r'\fbox{7}') == '7'
  assert last_boxed(r'\boxed{1') is None and last_boxed('no box') is None


def test_gsm8k_from_user_dir_strips_commas(tmp_path):
  src = tmp_path / 'src'
  _jsonl(src / 'test.jsonl', [{'question': 'q1', 'answer': 'a\n#### 1,234'}, {'question': 'q2', 'answer': '#### -5'}])
  got = load_examples('gsm8k', 'test', source_dir=str(src), tfds_dir=str(tmp_path / 'tfds'))
  assert got == [MathExample('q1', '1234', 'a\n#### 1,234'), MathExample('q2', '-5', '#### -5')]
  with pytest.raises(FileNotFoundError, match='train.jsonl'):  # only test was given
    load_examples('gsm8k', 'train', source_dir=str(src), tfds_dir=str(tmp_path / 'tfds'))


def _hendrycks(path, problem, boxed):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps({'problem': problem, 'level': 'Level 1', 'type': 'Algebra',
                              'solution': f'Work. $\\boxed{{{boxed}}}$'}))


def test_math_hendrycks_layout(tmp_path):
  src = tmp_path / 'MATH'
  # Written out of order: files are read by (subject, file number), so 10.json comes after 2.json.
  _hendrycks(src / 'train' / 'geometry' / '1.json', 'g1', '\\pi')
  _hendrycks(src / 'train' / 'algebra' / '10.json', 'a10', '\\frac{1}{2}')
  _hendrycks(src / 'train' / 'algebra' / '2.json', 'a2', '2')
  _hendrycks(src / 'test' / 'algebra' / '1.json', 't1', '-1')
  tfds_dir = str(tmp_path / 'tfds')
  train = load_examples('math', 'train', source_dir=str(src), tfds_dir=tfds_dir)
  assert [(e.question, e.answer) for e in train] == [('a2', '2'), ('a10', '\\frac{1}{2}'), ('g1', '\\pi')]
  assert train[1].solution == 'Work. $\\boxed{\\frac{1}{2}}$'
  assert load_examples('math', 'test', source_dir=str(src), tfds_dir=tfds_dir) == [
      MathExample('t1', '-1', 'Work. $\\boxed{-1}$')]


def test_math_jsonl_layout_and_missing_data(tmp_path):
  src = tmp_path / 'math_jsonl'
  _jsonl(src / 'test.jsonl', [{'problem': 'p1', 'solution': 's \\boxed{3}', 'answer': '3.0'},
                              {'problem': 'p2', 'solution': 's \\boxed{x^{2}}'}])  # no answer: take the box
  got = load_examples('math', 'test', source_dir=str(src), tfds_dir=str(tmp_path / 'tfds'))
  assert got == [MathExample('p1', '3.0', 's \\boxed{3}'), MathExample('p2', 'x^{2}', 's \\boxed{x^{2}}')]
  with pytest.raises(FileNotFoundError, match='hendrycks/math') as e:  # train was not given: say where to put it
    load_examples('math', 'train', source_dir=str(src), tfds_dir=str(tmp_path / 'tfds'))
  assert str(src / 'train.jsonl') in str(e.value)


def test_changed_source_is_prepared_again(tmp_path):
  src, tfds_dir = tmp_path / 'src', str(tmp_path / 'tfds')
  _jsonl(src / 'test.jsonl', [{'question': 'q', 'answer': '1'}])
  assert load_examples('cmath', 'test', source_dir=str(src), tfds_dir=tfds_dir)[0].answer == '1'
  _jsonl(src / 'test.jsonl', [{'question': 'q', 'answer': '2'}, {'question': 'r', 'answer': '3'}])
  assert load_examples('cmath', 'test', source_dir=str(src), tfds_dir=tfds_dir) == [
      MathExample('q', '2'), MathExample('r', '3')]
  assert len(os.listdir(os.path.join(tfds_dir, 'cmath'))) == 2  # one config per source hash


def test_load_jsonl_custom_fields(tmp_path):
  path = _jsonl(tmp_path / 'x.jsonl', [{'q': 'one', 'a': 1, 'sol': 'because'}, {'q': 'two', 'a': '2', 'sol': ''}])
  assert load_jsonl(path, question_field='q', answer_field='a') == [MathExample('one', '1'), MathExample('two', '2')]
  assert load_jsonl(path, question_field='q', answer_field='a', solution_field='sol', limit=1) == [
      MathExample('one', '1', 'because')]
  path = _jsonl(tmp_path / 'y.jsonl', [{'q': 'g', 'full': 'x\n#### 2,000', 'sol': 'short'}])
  assert load_jsonl(path, question_field='q', answer_field='full', answer_from_solution='gsm8k') == [
      MathExample('g', '2000', 'x\n#### 2,000')]  # the full text becomes the solution
  assert load_jsonl(path, question_field='q', answer_field='full', solution_field='sol',
                    answer_from_solution='gsm8k') == [MathExample('g', '2000', 'short')]
  with pytest.raises(ValueError, match=r'y.jsonl:1: no boxed final answer'):
    load_jsonl(path, question_field='q', answer_field='full', answer_from_solution='boxed')
  path = _jsonl(tmp_path / 'z.jsonl', [{'q': 'b', 'full': '$\\boxed{5}$'}])
  assert load_jsonl(path, question_field='q', answer_field='full', answer_from_solution='boxed') == [
      MathExample('b', '5', '$\\boxed{5}$')]
  with pytest.raises(ValueError, match='one of'):
    load_jsonl(path, question_field='q', answer_field='full', answer_from_solution='last_number')


def test_bad_input_errors(tmp_path):
  src, tfds_dir = tmp_path / 'src', str(tmp_path / 'tfds')
  good = json.dumps({'question': 'q', 'answer': '1'})
  src.mkdir()
  (src / 'test.jsonl').write_text(f'{good}\n{good}\n{{"question": "q", "answer": \n')
  with pytest.raises(ValueError, match=r'test.jsonl:3: broken JSON'):
    load_examples('cmath', 'test', source_dir=str(src), tfds_dir=tfds_dir)
  assert not os.path.exists(os.path.join(tfds_dir, 'cmath'))  # failed before tfds wrote anything
  (tmp_path / 'x.jsonl').write_text(f'{good}\n\n{{oops\n')  # the blank line 2 still counts
  with pytest.raises(ValueError, match=r'x.jsonl:3: broken JSON'):
    load_jsonl(tmp_path / 'x.jsonl', question_field='question', answer_field='answer')

  _jsonl(src / 'test.jsonl', [{'question': 'q', 'answer': '1'}, {'question': 'q'}])
  with pytest.raises(ValueError, match=r"test.jsonl:2: record has no field 'answer'"):
    load_examples('cmath', 'test', source_dir=str(src), tfds_dir=tfds_dir)
  (src / 'test.jsonl').write_text('\n')
  with pytest.raises(ValueError, match='is empty'):
    load_examples('cmath', 'test', source_dir=str(src), tfds_dir=tfds_dir)
  with pytest.raises(FileNotFoundError, match='nowhere/test.jsonl'):
    load_examples('math500', 'test', source_dir=str(tmp_path / 'nowhere'), tfds_dir=tfds_dir)
  with pytest.raises(FileNotFoundError, match='nope.jsonl'):
    load_jsonl(tmp_path / 'nope.jsonl', question_field='q', answer_field='a')
  with pytest.raises(ValueError, match=r"unknown dataset 'gsm9k'.*'cmath', 'gsm8k', 'math', 'math500'"):
    load_examples('gsm9k', 'test', tfds_dir=tfds_dir)
  with pytest.raises(ValueError, match=r"unknown split 'train' of math500; known: \['test'\]"):
    load_examples('math500', 'train', tfds_dir=tfds_dir)


def test_tfds_dir_from_env(tmp_path, monkeypatch):
  monkeypatch.setenv('GRPO_JAX_TFDS_DIR', str(tmp_path / 'env_tfds'))
  assert datasets.tfds_data_dir() == str(tmp_path / 'env_tfds')
  assert datasets.tfds_data_dir('/explicit') == '/explicit'  # the argument wins
  src = _jsonl(tmp_path / 'src' / 'test.jsonl', [{'question': 'q', 'answer': '1'}]).parent
  load_examples('cmath', 'test', source_dir=str(src))
  assert os.listdir(tmp_path / 'env_tfds' / 'cmath')
  monkeypatch.delenv('GRPO_JAX_TFDS_DIR')
  assert datasets.tfds_data_dir() == os.path.expanduser('~/.cache/grpo_jax/tensorflow_datasets')
