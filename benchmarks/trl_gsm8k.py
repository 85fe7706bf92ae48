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
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import os
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


def force_lengths_processor(lengths: list[int], prompt_width: int, eos_id: int):
  """A LogitsProcessor for one generate call over rows with these completion lengths (EOS included): before a
  row's length EOS is impossible, at it EOS is the only choice. prompt_width: the left-padded prompt width."""
  import torch
  from transformers import LogitsProcessor

  class ForceLengths(LogitsProcessor):
    def __call__(self, input_ids, scores):  # input_ids [b, prompt_width + made], scores [b, v]
      position = input_ids.shape[1] - prompt_width + 1  # 1-based position of the token chosen now
      want = torch.as_tensor(lengths, device=scores.device)
      scores[position < want, eos_id] = -float('inf')
      at = position == want
      scores[at] = -float('inf')
      scores[at, eos_id] = 0.0
      return scores

  return ForceLengths()


def patch_trl(trl, lengths: list[list[int]], record: dict) -> None:
  """trl.GRPOConfig with shuffle_dataset=False and trl.GRPOTrainer forcing step k's rows to lengths[k]; what each
  generate call saw goes into record ('prompt_tokens' per prompt, 'padded_prompt_width' and 'lengths' per step)."""
  from transformers import LogitsProcessorList

  config_cls, trainer_cls = trl.GRPOConfig, trl.GRPOTrainer

  def grpo_config(**kwargs):
    return config_cls(**kwargs, shuffle_dataset=False)

  class ForcedLengthGRPOTrainer(trainer_cls):
    def _generate_single_turn(self, prompt_ids, *args, **kwargs):
      step = len(record['lengths'])
      want = lengths[step]
      if len(prompt_ids) != len(want):
        raise ValueError(f'generate got {len(prompt_ids)} rows, the workload has {len(want)} per step')
      width = max(len(p) for p in prompt_ids)
      processor = LogitsProcessorList([force_lengths_processor(want, width, self._tokenizer.eos_token_id)])
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
      return completion_ids, logprobs

  trl.GRPOConfig, trl.GRPOTrainer = grpo_config, ForcedLengthGRPOTrainer


def main() -> int:
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--steps', type=int, default=5)
  ap.add_argument('--prompts-per-step', type=int, default=workload.PROMPTS_PER_STEP)
  ap.add_argument('--num-generations', type=int, default=workload.G)
  ap.add_argument('--threads', type=int, default=2)
  ap.add_argument('--max-completion-length', type=int, default=workload.MAX_COMPLETION,
                  help=f'the budget: {workload.MAX_COMPLETION} (the longest forced length) or more')
  ap.add_argument('--seed', type=int, default=0, help="the workload's prompts and lengths (not the model's init)")
  ap.add_argument('--verbose', action='store_true', help="TRL's per-step logs (to stderr)")
  args = ap.parse_args()
  baseline = load_baseline(os.environ.get('BASELINE') or DEFAULT_BASELINE)
  P, G = args.prompts_per_step, args.num_generations
  lengths = workload.completion_lengths(args.steps, P * G, seed=args.seed)

  def build_dataset(n: int, seed: int = 0):
    from datasets import Dataset

    rows = workload.prompts(-(-n // P), P, seed=args.seed)  # step order; TRL reads the first steps * P
    return Dataset.from_dict({'prompt': [q for q, _ in rows], 'answer': [a for _, a in rows]})

  import trl

  record = {'prompt_tokens': [], 'padded_prompt_width': [], 'lengths': []}
  patch_trl(trl, lengths, record)
  baseline.build_dataset = build_dataset
  sys.argv = [baseline.__file__, '--steps', str(args.steps), '--max-completion-length', str(args.max_completion_length),
              '--num-generations', str(G), '--prompts-per-step', str(P), '--threads', str(args.threads),
              *(['--verbose'] if args.verbose else [])]
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    rc = baseline.main()
  lines = out.getvalue().strip().splitlines()
  print('\n'.join(lines[:-1]), file=sys.stderr)
  if rc or not lines:
    return rc or 1
  result = json.loads(lines[-1])
  result.update(workload.summary(record['prompt_tokens'], record['lengths']),
                padded_prompt_width=record['padded_prompt_width'], seed=args.seed)
  print(json.dumps(result))
  return 0


if __name__ == '__main__':
  sys.exit(main())
