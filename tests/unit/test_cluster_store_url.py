"""cluster_store.redact_url: a Redis password never reaches a log line or an error message."""

from __future__ import annotations

import pytest

from mvllm.router.cluster_store import redact_url


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        ("redis://:s3cret@redis:6379/0", "redis://:***@redis:6379/0"),
        ("rediss://app:s3cret@db.example/2", "rediss://app:***@db.example/2"),
        ("redis://user@host:1/0", "redis://user@host:1/0"),
        ("redis://:pw@[::1]:6379/0", "redis://:***@[::1]:6379/0"),
    ],
)
def test_password_is_masked(url: str, shown: str) -> None:
    assert redact_url(url) == shown
    assert "s3cret" not in redact_url(url)
