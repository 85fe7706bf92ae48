"""This process's resident host memory, and how much the machine has: what the trainer checks its memory plan
against on CPU, and what benchmarks/memory_phases.py measures each phase of a GRPO step by (Linux /proc)."""
from __future__ import annotations

import os
import resource


def _status_kib(field: str) -> int | None:
  try:
    with open('/proc/self/status') as f:
      for line in f:
        if line.startswith(field + ':'):
          return int(line.split()[1])
  except OSError:
    pass
  return None


def peak_rss_bytes() -> int:
  """The process's peak resident memory since it started or since the last reset_peak_rss()."""
  hwm = _status_kib('VmHWM')
  return 1024 * (hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def rss_bytes() -> int:
  """The process's resident memory now."""
  return 1024 * (_status_kib('VmRSS') or 0)


def reset_peak_rss() -> bool:
  """Restart the peak (VmHWM) from the current resident size, so the next peak_rss_bytes() is one phase's; False
  where the kernel does not allow it (then the peak runs on from the start)."""
  try:
    with open('/proc/self/clear_refs', 'w') as f:
      f.write('5')
    return True
  except OSError:
    return False


def _cgroup_limit() -> int | None:
  for path in ('/sys/fs/cgroup/memory.max', '/sys/fs/cgroup/memory/memory.limit_in_bytes'):
    try:
      with open(path) as f:
        text = f.read().strip()
    except OSError:
      continue
    if text.isdigit() and int(text) < 1 << 60:
      return int(text)
  return None


def host_memory_bytes() -> int | None:
  """Memory this process may grow into: the machine's total RAM, or the container's cgroup limit when lower."""
  try:
    total = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
  except (ValueError, OSError):
    total = None
  limit = _cgroup_limit()
  return min(x for x in (total, limit) if x is not None) if (total or limit) else None
