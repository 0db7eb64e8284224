import math
import random

import pytest

from triage.policy import (BATCH_TOP_K, STREAM_THRESHOLD, batch_policy, flag_count, flag_threshold, flag_top_k,
                           study_risks)


def random_risks(n: int, seed: int) -> dict[str, float]:
    rng = random.Random(seed)
    return {f"1.2.3.{i}": rng.random() for i in range(n)}


@pytest.mark.parametrize("n", [0, 1, 19, 20, 21, 100, 999, 1000])
def test_top_k_flags_exactly_ceil_of_rate(n):
    flags = flag_top_k(random_risks(n, n), 0.05)
    assert len(flags.flagged) == math.ceil(0.05 * n - 1e-9)
    assert flags.policy == BATCH_TOP_K


def test_flag_count_is_robust_to_float_error():
    assert flag_count(0.05, 20) == 1  # 0.05 * 20 = 1.0000000000000002 in floats
    assert flag_count(0.05, 21) == 2
    assert flag_count(0.1, 30) == 3
    assert flag_count(1.0, 7) == 7


@pytest.mark.parametrize("seed", range(5))
def test_top_k_is_monotone_in_risk(seed):
    risks = random_risks(200, seed)
    flags = flag_top_k(risks, 0.05)
    lowest_flagged = min(risks[u] for u in flags.flagged)
    highest_unflagged = max(risks[u] for u in risks if u not in flags.flagged)
    assert lowest_flagged >= highest_unflagged
    assert flags.threshold == lowest_flagged
    # Raising an unflagged study above the threshold puts it in the flagged set.
    promoted = next(u for u in risks if u not in flags.flagged)
    assert promoted in flag_top_k({**risks, promoted: 1.5}, 0.05).flagged


def test_ties_are_broken_by_uid_whatever_the_input_order():
    risks = {f"1.2.{i}": 0.7 for i in range(40)}
    forward = flag_top_k(risks, 0.05).flagged
    backward = flag_top_k(dict(reversed(list(risks.items()))), 0.05).flagged
    assert forward == backward == {"1.2.0", "1.2.1"}


def test_stream_mode_flags_at_or_above_threshold():
    flags = flag_threshold({"a": 0.2, "b": 0.5, "c": 0.9}, 0.5)
    assert flags.flagged == {"b", "c"} and flags.policy == STREAM_THRESHOLD


def test_study_risk_is_max_over_images():
    assert study_risks([("s1", 0.2), ("s1", 0.8), ("s2", 0.5)]) == {"s1": 0.8, "s2": 0.5}


@pytest.mark.parametrize("rate", [0, -0.1, 1.5])
def test_bad_flag_rate_is_refused_with_a_hint(rate):
    with pytest.raises(ValueError, match="riskiest 5%"):
        flag_top_k({"a": 0.1}, rate)


def test_min_risk_keeps_only_the_top_k_studies_that_reach_it():
    risks = {"a": 0.9, "b": 0.6, "c": 0.4, "d": 0.1}
    assert flag_top_k(risks, 0.5, min_risk=0.5).flagged == {"a", "b"}  # top 2, both >= 0.5
    partly = flag_top_k(risks, 0.75, min_risk=0.5)  # top 3, of which c is below the floor
    assert partly.flagged == {"a", "b"} and partly.threshold == 0.5 and partly.policy == batch_policy(0.5)
    assert flag_top_k(risks, 0.5, min_risk=0.3).threshold == 0.6  # the k-th risk is higher than the floor


def test_min_risk_lets_a_batch_of_tiny_risks_flag_nothing_and_says_so():
    flags = flag_top_k({"a": 0.002, "b": 0.001}, 0.05, min_risk=0.2)
    assert flags.flagged == frozenset() and flags.threshold == 0.2 and flags.policy == "batch_top_k min_risk=0.2"
    default = flag_top_k({"a": 0.002, "b": 0.001}, 0.05)  # without a floor the batch flags its riskiest
    assert default.flagged == {"a"} and default.policy == BATCH_TOP_K == batch_policy(0.0)


@pytest.mark.parametrize("min_risk", [-0.1, 1.5, float("nan")])
def test_bad_min_risk_is_refused_with_a_hint(min_risk):
    with pytest.raises(ValueError, match=r"min risk .* must be in \[0, 1\]"):
        flag_top_k({"a": 0.1}, 0.05, min_risk=min_risk)
