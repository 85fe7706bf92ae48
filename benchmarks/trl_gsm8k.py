#!/usr/bin/env python3
"""TRL's GRPOTrainer on the GSM8K-shaped workload (benchmarks/gsm8k_workload.py holds its WORKLOAD SPEC).

  benchmarks/.venv-trl/bin/python benchmarks/trl_gsm8k.py --steps 5 [--prompts-per-step 4]

../shared/bench/trl_grpo_baseline.py (or $BASELINE) is imported unmodified and its main() runs as it is, with
only the workload swapped in, so the model, tokenizer, reward, optimizer, loss settings, step timers, clean-step
guard and JSON keys are the baseline's own:
  - build_dataset: the workload's prompts in step order, and GRPOConfig gets shuffle_dataset=False, so TRL's
    RepeatSampler hands step k prompts k*P .. k*P + P-1, each repeated G times (groups contiguous), as ours does;
  - GRPOTrainer: a subclass whose _generate_single_turn gives model.generate a LogitsProcessor that suppresses
    EOS before each row's drawn length and forces it at that length (TRL 1.16 calls generate with only
    generation_config, so the processor goes in through the model's generate for the duration of the call), and
    checks that every completion came back with its drawn length;
  - argv: --max-completion-length 256 --num-generations 16 --prompts-per-step P.
The last stdout line is the baseline's JSON object plus the workload's keys (gsm8k_workload.summary: 'workload',
'prompt_tokens', 'completion_lengths') and 'padded_prompt_width' (TRL pads each step's prompts to its longest).

--model smollm2 (the workload spec's real-model variant; 'workload': 'gsm8k/smollm2'):
  benchmarks/.venv-trl/bin/python benchmarks/trl_gsm8k.py --model smollm2 --steps 3 [--gguf FILE]
the baseline's build_tokenizer / build_model load SmolLM2-135M-Instruct from its GGUF file (transformers'
gguf_file loading, fp32; the baseline saves it and TRL loads policy and reference from there, as always), the
dataset holds conversational prompts (TRL applies the chat template itself; each step's prompt ids are checked
against the workload's), the reward is the last number of the completion against the gold answer, lr 1e-6, and
gradient checkpointing is on (TRL's default). --max-completion-length below 256 cuts the forced lengths (smoke runs).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gsm8k_workload as workload  # noqa: E402

DEFAULT_BASELINE = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..', 'shared', 'bench',
                                'trl_grpo_baseline.py')


def load_baseline(path: str):
  """The baseline script as a module (its main() does not run on import)."""
  spec = importlib.util.spec_from_file_location('trl_grpo_baseline', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def force_lengths_processor(lengths: list[int], prompt_width: int, eos_id: int, stop_ids: tuple[int, ...] = ()):
  """A LogitsProcessor for one generate call over rows with these completion lengths (EOS included): before a
  row's length EOS (and every other id in `stop_ids`: TRL stops at any of them) is impossible, at it EOS is the
  only choice. prompt_width: the left-padded prompt width."""
  import torch
  from transformers import LogitsProcessor

  stops = sorted({eos_id, *stop_ids})

  class ForceLengths(LogitsProcessor):
    def __call__(self, input_ids, scores):  # input_ids [b, prompt_width + made], scores [b, v]
      position = input_ids.shape[1] - prompt_width + 1  # 1-based position of the token chosen now
      want = torch.as_tensor(lengths, device=scores.device)
      before = (position < want).nonzero()[:, 0]
      scores[before[:, None], torch.as_tensor(stops, device=scores.device)] = -float('inf')
      at = position == want
      scores[at] = -float('inf')
      scores[at, eos_id] = 0.0
      return scores

  return ForceLengths()


def patch_trl(trl, lengths: list[list[int]], record: dict, expected: list[list[int]] | None = None,
              **config: object) -> None:
  """trl.GRPOConfig with shuffle_dataset=False (and `config` over the baseline's settings) and trl.GRPOTrainer
  forcing step k's rows to lengths[k]; what each generate call saw goes into record ('prompt_tokens' per prompt,
  'padded_prompt_width' and 'lengths' per step). expected: the workload's prompt ids, step k's at [k*P, (k+1)*P);
  each generate call's prompts must be these (TRL tokenized them itself)."""
  from transformers import LogitsProcessorList

  config_cls, trainer_cls = trl.GRPOConfig, trl.GRPOTrainer

  def grpo_config(**kwargs):
    return config_cls(**{**kwargs, **config}, shuffle_dataset=False)

  class ForcedLengthGRPOTrainer(trainer_cls):
    def _generate_single_turn(self, prompt_ids, *args, **kwargs):
      step = len(record['lengths'])
      want = lengths[step]
      if len(prompt_ids) != len(want):
        raise ValueError(f'generate got {len(prompt_ids)} rows, the workload has {len(want)} per step')
      if expected is not None:
        group = [list(p) for p in prompt_ids[::self.num_generations]]
        if group != expected[step * len(group):(step + 1) * len(group)]:
          raise AssertionError(f"step {step}: TRL's prompt ids differ from the workload's")
      width = max(len(p) for p in prompt_ids)
      processor = LogitsProcessorList([force_lengths_processor(want, width, self._tokenizer.eos_token_id,
                                                               tuple(self.eos_token_ids))])
      model = self.accelerator.unwrap_model(self.model_wrapped)  # what TRL's generate context yields on one CPU
      generate = model.generate
      model.generate = lambda *a, **kw: generate(*a, logits_processor=processor, **kw)
      try:
        completion_ids, logprobs = super()._generate_single_turn(prompt_ids, *args, **kwargs)
      finally:
        del model.generate  # the instance attribute: the class's generate shows through again
      got = [len(c) for c in completion_ids]
      if got != want:
        raise AssertionError(f'step {step}: completion lengths {got} differ from the forced {want}')
      record['prompt_tokens'] += [len(p) for p in prompt_ids[::self.num_generations]]
      record['padded_prompt_width'].append(width)
      record['lengths'].append(got)
      record['eos_ids'] = self.eos_token_ids
      return completion_ids, logprobs

  trl.GRPOConfig, trl.GRPOTrainer = grpo_config, ForcedLengthGRPOTrainer


_NUMBER = re.compile(r'-?\d[\d,]*(?:\.\d+)?')


def last_number_reward(completions, answer, **kwargs):
  """1.0 if the completion's last number equals the gold answer, else 0.0 (completions are lists of messages for
  conversational prompts). It stands in for grpo_jax's gsm8k verifier: a reward changes no shape of the step."""
  out = []
  for completion, gold in zip(completions, answer, strict=True):
    text = completion[-1]['content'] if isinstance(completion, list) else completion
    found = _NUMBER.findall(text)
    out.append(float(bool(found) and found[-1].replace(',', '') == gold))
  return out


def use_smollm2(baseline, path: str, dims: dict):
  """The baseline's build_tokenizer / build_model / reward swapped for SmolLM2 from its GGUF file (transformers'
  gguf_file loading dequantizes it; fp32). The model's config goes into `dims` for the JSON's 'model' key.
  Returns the tokenizer."""
  import torch
  from transformers import AutoModelForCausalLM, AutoTokenizer

  folder, name = os.path.split(os.path.abspath(path))
  tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, padding_side='left')

  def build_model(vocab_size, tok):
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # transformers marks a model read from a GGUF file as 'gguf'-quantized, though its weights are plain fp32 now,
    # and refuses to save it; the baseline saves it for TRL to load the policy and reference from.
    model.hf_quantizer = None
    if hasattr(model.config, 'quantization_config'):
      del model.config.quantization_config
    c = model.config
    dims.update(arch=type(model).__name__, source=name, vocab_size=c.vocab_size, hidden_size=c.hidden_size,
                intermediate_size=c.intermediate_size, num_hidden_layers=c.num_hidden_layers,
                num_attention_heads=c.num_attention_heads, num_key_value_heads=c.num_key_value_heads,
                tie_word_embeddings=c.tie_word_embeddings)
    return model

  baseline.build_tokenizer, baseline.build_model = (lambda: tokenizer), build_model
  baseline.reward_first_number = last_number_reward
  return tokenizer


def main() -> int:
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--steps', type=int, default=5)
  ap.add_argument('--prompts-per-step', type=int, default=workload.PROMPTS_PER_STEP)
  ap.add_argument('--num-generations', type=int, default=None, help=f'{workload.G}; smollm2: {workload.SMOLLM2_G}')
  ap.add_argument('--threads', type=int, default=2)
  ap.add_argument('--max-completion-length', type=int, default=workload.MAX_COMPLETION,
                  help=f'the budget: {workload.MAX_COMPLETION} (the longest forced length) or more; smollm2: less '
                       'cuts the forced lengths to it (smoke runs)')
  ap.add_argument('--model', choices=('character', 'smollm2'), default='character',
                  help="character: the baseline's random character-level model; smollm2: SmolLM2-135M-Instruct")
  ap.add_argument('--gguf', default='', help=f'smollm2: the {workload.SMOLLM2_FILE} file (default: found in the '
                                             f'installed {workload.SMOLLM2_PACKAGE} package)')
  ap.add_argument('--seed', type=int, default=0, help="the workload's prompts and lengths (not the model's init)")
  ap.add_argument('--verbose', action='store_true', help="TRL's per-step logs (to stderr)")
  args = ap.parse_args()
  smollm2 = args.model == 'smollm2'
  baseline = load_baseline(os.environ.get('BASELINE') or DEFAULT_BASELINE)
  P = args.prompts_per_step
  G = args.num_generations or (workload.SMOLLM2_G if smollm2 else workload.G)
  lengths = workload.completion_lengths(args.steps, P * G, seed=args.seed)
  dims, expected, tokenizer = {}, [], None
  if smollm2:
    lengths = workload.capped_lengths(lengths, args.max_completion_length)
    tokenizer = use_smollm2(baseline, workload.smollm2_path(args.gguf), dims)

  def build_dataset(n: int, seed: int = 0):
    from datasets import Dataset

    if smollm2:  # conversational prompts: TRL applies the chat template, as a user's run does
      rows = workload.chat_prompts(tokenizer, -(-n // P), P, seed=args.seed)
      expected[:] = [ids for ids, _, _ in rows[:args.steps * P]]  # the prompts the checked generate calls get
      return Dataset.from_dict({'prompt': [[{'role': 'user', 'content': q}] for _, q, _ in rows],
                                'answer': [a for _, _, a in rows]})
    rows = workload.prompts(-(-n // P), P, seed=args.seed)  # step order; TRL reads the first steps * P
    return Dataset.from_dict({'prompt': [q for q, _ in rows], 'answer': [a for _, a in rows]})

  import trl

  record = {'prompt_tokens': [], 'padded_prompt_width': [], 'lengths': []}
  patch_trl(trl, lengths, record, expected if smollm2 else None,
            **({'learning_rate': workload.SMOLLM2_LR} if smollm2 else {}))
  baseline.build_dataset = build_dataset
  sys.argv = [baseline.__file__, '--steps', str(args.steps), '--max-completion-length', str(args.max_completion_length),
              '--num-generations', str(G), '--prompts-per-step', str(P), '--threads', str(args.threads),
              *(['--gradient-checkpointing'] if smollm2 else []),  # TRL's default; the baseline turns it off
              *(['--verbose'] if args.verbose else [])]
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    rc = baseline.main()
  lines = out.getvalue().strip().splitlines()
  print('\n'.join(lines[:-1]), file=sys.stderr)
  if rc or not lines:
    return rc or 1
  result = json.loads(lines[-1])
  result.update(workload.summary(record['prompt_tokens'], record['lengths'],
                                 workload.SMOLLM2_WORKLOAD if smollm2 else 'gsm8k'),
                padded_prompt_width=record['padded_prompt_width'], seed=args.seed)
  if smollm2:
    result.update(prompt_ids_sha256=workload.prompt_ids_digest(expected), eos_token_ids=list(record['eos_ids']),
                  model={**dims, 'n_params': result['model']['n_params'], 'dtype': 'float32'})
  print(json.dumps(result))
  return 0


if __name__ == '__main__':
  sys.exit(main())
