"""Side-by-side: grpo_jax vs TRL on the identical GRPO workload, from the two scripts' JSON lines.

  python benchmarks/compare.py results.jsonl     (written by benchmarks/run.sh)
"""
import json
import sys


def step_time(r):
  return r['step_time_median_clean_s'] or r['step_time_median_s']  # clean = no foreign CPU load during the step


def main(path: str) -> None:
  rows = [json.loads(line) for line in open(path) if line.strip()]
  by_key = {}
  for r in rows:
    by_key.setdefault(r['max_completion_length'], {})[r['impl']] = r
  print(f"{'L':>4} {'impl':>26} {'step s':>8} {'tok/s':>8} {'gen-only tok/s':>15} {'RSS MB':>8} {'clean':>6}")
  for length, impls in sorted(by_key.items()):
    for name, r in impls.items():
      print(f"{length:>4} {name:>26} {step_time(r):>8.3f} {r['gen_tokens_per_s']:>8.0f} "
            f"{r['gen_only_tokens_per_s']:>15.0f} {r['peak_rss_mb']:>8.0f} {r['clean_steps']:>6}")
    trl = impls.get('trl')
    for name, ours in impls.items():
      if trl is None or not name.startswith('grpo_jax'):
        continue
      print(f"{length:>4} {name:>26} / TRL: step speed-up x{step_time(trl) / step_time(ours):.2f}  "
            f"tok/s x{ours['gen_tokens_per_s'] / trl['gen_tokens_per_s']:.2f}  "
            f"gen-only x{ours['gen_only_tokens_per_s'] / trl['gen_only_tokens_per_s']:.2f}  "
            f"RSS x{ours['peak_rss_mb'] / trl['peak_rss_mb']:.2f} (ours / TRL)")


if __name__ == '__main__':
  main(sys.argv[1])
