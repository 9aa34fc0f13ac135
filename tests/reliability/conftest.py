"""Hypothesis profiles for the reliability tests, and the per-run case counts printed at the end of the session.

``HYPOTHESIS_PROFILE=nightly`` runs far more examples and longer operation sequences than the default profile,
which keeps these tests under about a minute and a half on 2 CPU cores. The default profile is derandomized: CI
runs the same examples every time, so a failure there is never a fluke; the nightly profile explores new ones.
"""

from __future__ import annotations

import os
from collections import Counter, defaultdict

import pytest
import torch
from hypothesis import HealthCheck, settings

PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "reliability")

_COMMON = {
    "deadline": None,  # the first forward of a tiny transformers model takes a second; timing is not the property
    "database": None,  # no .hypothesis/ directory in the tree; failures print a reproduction blob instead
    "print_blob": True,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
}
settings.register_profile("reliability", max_examples=20, stateful_step_count=10, derandomize=True, **_COMMON)
settings.register_profile("nightly", max_examples=400, stateful_step_count=40, **_COMMON)
if PROFILE not in ("reliability", "nightly"):
    raise pytest.UsageError(f"HYPOTHESIS_PROFILE={PROFILE!r}; use 'reliability' (default) or 'nightly'.")
NIGHTLY_FACTOR = 20


def scaled(default: int) -> int:
    """A case count in the default profile (hypothesis examples, kill points, rounds): ``default``, 20× at night."""
    return default * NIGHTLY_FACTOR if PROFILE == "nightly" else default


def profile(max_examples: int, **overrides: object) -> settings:
    """The active profile's settings with ``max_examples`` of the default profile (scaled at night)."""
    return settings(settings.get_profile(PROFILE), max_examples=scaled(max_examples), **overrides)


@pytest.fixture(autouse=True)
def _one_thread() -> object:
    # Tiny models gain nothing from a second intra-op thread, and where another process holds a core the two
    # OpenMP threads wait on each other: a forward then takes ~100× longer (160 ms instead of 1.5 ms).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# What each test tried, by outcome: {"test_fuzz_config": Counter({"refused": 120, "accepted": 80}), ...}.
TALLY: defaultdict[str, Counter] = defaultdict(Counter)


def tally(test: str, outcome: str, count: int = 1) -> None:
    TALLY[test][outcome] += count


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not TALLY:
        return
    terminalreporter.section(f"reliability cases tried (hypothesis profile {PROFILE!r})")
    for test, outcomes in sorted(TALLY.items()):
        detail = ", ".join(f"{n} {what}" for what, n in sorted(outcomes.items()))
        terminalreporter.write_line(f"{test}: {sum(outcomes.values())} ({detail})")
