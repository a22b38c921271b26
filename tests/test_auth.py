"""The API key check the HTTP and gRPC front ends share (service/auth.py)."""

import pytest

from segserve.service.auth import bearer_token, token_matches


@pytest.mark.parametrize(
    "header, token",
    [
        ("Bearer k3y", "k3y"),
        ("bearer k3y", "k3y"),  # an auth scheme's case is free (RFC 9110 11.1)
        ("BEARER k3y", "k3y"),
        ("Basic k3y", None),
        ("Bearer", None),
        ("Bearer ", None),
        ("k3y", None),
        ("", None),
        (None, None),
    ],
)
def test_only_a_bearer_header_gives_a_token(header, token):
    assert bearer_token(header) == token


def test_a_token_matches_only_a_key_it_equals():
    assert token_matches("k3y", "k3y")
    assert token_matches("tok", "k3y", "tok")  # the API key or the metrics token
    assert not token_matches("k3y", None, "K3Y")  # keys are case-sensitive; None never matches
    assert not token_matches(None, "k3y")
    assert not token_matches("k3y ", "k3y")
