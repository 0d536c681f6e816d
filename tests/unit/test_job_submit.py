"""Which job-server answers `steerray ... --address` retries, and for how long (no Ray needed)."""

from __future__ import annotations

import pytest

from steerray.runtime import SUBMIT_RETRY_S, retry_delays, retryable_submit_error

# What Ray 2.60's JobSubmissionClient raises (dashboard_sdk._raise_error) for the head's HTTP 500.
NO_AGENT = "Request failed with status code 500: No available agent to submit job, please try again later.."


def test_a_head_without_its_agent_yet_is_retried():
    assert retryable_submit_error(RuntimeError(NO_AGENT))


@pytest.mark.parametrize(
    "err",
    [
        RuntimeError("Request failed with status code 400: Invalid runtime_env"),
        RuntimeError("Request failed with status code 401: Missing authentication token"),
        ConnectionError("No available agent to submit job"),  # not what the SDK raises for a 500
        ValueError(NO_AGENT),
    ],
)
def test_other_failures_are_reported_at_once(err):
    assert not retryable_submit_error(err)


def test_the_waits_double_up_to_a_cap_and_fit_the_budget_exactly():
    assert retry_delays(60.0) == [1.0, 2.0, 4.0, *[5.0] * 10, 3.0]
    assert sum(retry_delays(SUBMIT_RETRY_S)) == SUBMIT_RETRY_S
    assert retry_delays(2.5) == [1.0, 1.5]
    assert retry_delays(0.0) == []
