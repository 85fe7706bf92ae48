"""Side-by-side: grpo_jax vs TRL on the identical GRPO workload, from the two scripts' JSON lines.

  python benchmarks/compare.py results.jsonl     (written by benchmarks/run.sh)

Rows are grouped by workload and completion length: the key column shows L for the baseline's workload (rows
without a 'workload' key), 'gsm8k/L' for the GSM8K-shaped one (benchmarks/gsm8k_workload.py) and 'gsm8k/smollm2/L'
for its real-model variant. Rows of one key that report different prompt token ids ('prompt_ids_sha256') did not
run the same workload: a line says so.
"""
import argparse
import json


def step_time(r):
  return r['step_time_median_clean_s'] or r['step_time_median_s']  # clean = no foreign CPU load during the step


def mean_of_runs(runs: list[dict]) -> dict:
  """One row for several runs of the same impl (TRL before and after ours): mean speeds, the highest RSS."""
  if len(runs) == 1:
    return runs[0]
  mean = lambda key: sum(key(r) for r in runs) / len(runs)  # noqa: E731
  return dict(runs[0], step_time_median_clean_s=mean(step_time), gen_tokens_per_s=mean(lambda r: r['gen_tokens_per_s']),
              gen_only_tokens_per_s=mean(lambda r: r['gen_only_tokens_per_s']),
              peak_rss_mb=max(r['peak_rss_mb'] for r in runs), clean_steps=min(r['clean_steps'] for r in runs),
              runs=[step_time(r) for r in runs])


def main(path: str) -> None:
  rows = [json.loads(line) for line in open(path) if line.strip()]
  runs = {}
  for r in rows:
    runs.setdefault((r.get('workload', ''), r['max_completion_length']), {}).setdefault(r['impl'], []).append(r)
  by_key = {key: {impl: mean_of_runs(rs) for impl, rs in impls.items()} for key, impls in runs.items()}
  label = {key: f'{key[0]}/{key[1]}' if key[0] else key[1] for key in by_key}
  width = max([4] + [len(str(x)) for x in label.values()])
  print(f"{'L':>{width}} {'impl':>26} {'step s':>8} {'tok/s':>8} {'gen-only tok/s':>15} {'RSS MB':>8} {'clean':>6}")
  for key, impls in sorted(by_key.items()):
    length = label[key]
    for name, r in impls.items():
      each = f"  (mean of runs: {', '.join(f'{t:.3f}' for t in r['runs'])} s)" if 'runs' in r else ''
      print(f"{length:>{width}} {name:>26} {step_time(r):>8.3f} {r['gen_tokens_per_s']:>8.0f} "
            f"{r['gen_only_tokens_per_s']:>15.0f} {r['peak_rss_mb']:>8.0f} {r['clean_steps']:>6}{each}")
    digests = {r['prompt_ids_sha256'] for rs in runs[key].values() for r in rs if 'prompt_ids_sha256' in r}
    if len(digests) > 1:
      print(f'{length:>{width}} WARNING: the runs saw different prompt token ids ({", ".join(sorted(digests))})')
    trl = impls.get('trl')
    for name, ours in impls.items():
      if trl is None or not name.startswith('grpo_jax'):
        continue
      print(f"{length:>{width}} {name:>26} / TRL: step speed-up x{step_time(trl) / step_time(ours):.2f}  "
            f"tok/s x{ours['gen_tokens_per_s'] / trl['gen_tokens_per_s']:.2f}  "
            f"gen-only x{ours['gen_only_tokens_per_s'] / trl['gen_only_tokens_per_s']:.2f}  "
            f"RSS x{ours['peak_rss_mb'] / trl['peak_rss_mb']:.2f} (ours / TRL)")


if __name__ == '__main__':
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('results', help='the JSON lines benchmarks/run.sh wrote (results.jsonl)')
  main(parser.parse_args().results)
