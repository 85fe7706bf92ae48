"""benchmarks/accelerator.py (issue 4, item 5) runs end to end with its tiny preset, and its decode roofline
counts the bytes the formula says. The real numbers need an accelerator; see benchmarks/RESULTS.md."""
import json
import subprocess
import sys

from conftest import ROOT

from grpo_jax.models import flops
from grpo_jax.models.transformer import ModelConfig


def test_tiny_preset_runs_and_reports_both_phases():
  proc = subprocess.run([sys.executable, 'benchmarks/accelerator.py', '--preset', 'tiny'], cwd=ROOT,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  decode, train = result['decode'], result['train']
  assert decode['token_step_s'] > 0 and decode['decode_tokens_per_s'] == decode['batch'] / decode['token_step_s']
  assert train['loss_is_finite'] and train['step_s'] > 0

  # Every matmul weight once (bf16), plus bf16 K and V of 8 + i slots at step i = 1..8 for 16 rows, 2 layers.
  sys.path.insert(0, f'{ROOT}/benchmarks')
  from accelerator import MODELS
  cfg = ModelConfig(**MODELS['tiny'], param_dtype='bfloat16', dtype='bfloat16')
  kv = sum(2 * 2 * 2 * 16 * (8 + i) * 16 * 2 for i in range(1, 9)) / 8
  assert decode['roofline_bytes_per_step'] == flops.matmul_params(cfg) * 2 + kv
  # 3 x forward FLOPs of 16 rows of 16 tokens: 2 N_mm per token plus the causal attention term; with the shared
  # prompt, 2 prompts of 8 tokens, then 16 rows of 8 completion tokens after 8 cached keys.
  per_key = 4 * 2 * 4 * 16
  repeated = result['train_repeated_prompt']
  assert not repeated['shared_prompt'] and train['shared_prompt'] and repeated['loss_is_finite']
  assert repeated['model_flops'] == 3 * 16 * (2 * flops.matmul_params(cfg) * 16 + per_key * (16 * 17 // 2))
  shared = (2 * (2 * flops.matmul_params(cfg) * 8 + per_key * (8 * 9 // 2))
            + 16 * (2 * flops.matmul_params(cfg) * 8 + per_key * sum(range(9, 17))))
  assert train['model_flops'] == 3 * shared < repeated['model_flops']
  if result['device_spec'] is None:  # CPU: no peak or bandwidth, so no fractions are made up
    assert 'mfu' not in train and 'fraction_of_roofline' not in decode
