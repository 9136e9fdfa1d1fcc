"""Numbers a test wants in the run's output (errors against references, bf16 drift, ...).

`record(name, value)` inside a test; conftest attaches them to the test's report, so they survive
pytest-xdist workers, and prints them all in a "measurements" section at the end of the run.
"""

_PENDING: list[tuple[str, str]] = []


def record(name: str, value) -> None:
  text = f'{value:.3e}' if isinstance(value, float) else str(value)
  _PENDING.append((name, text))


def drain() -> list[tuple[str, str]]:
  out = list(_PENDING)
  _PENDING.clear()
  return out
