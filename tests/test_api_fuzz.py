"""Property-based fuzzing of every API operation against its own OpenAPI document."""

from __future__ import annotations

from typing import Any

import schemathesis
from hypothesis import HealthCheck, settings

from repd.api.server import create_app

# The suite imports siblings as `tests.x` when the repo root is on sys.path (python -m
# pytest, or pythonpath = ["."]) and as plain `x` under pytest's default rootdir insertion.
try:
    from tests.test_api import FakeBackend
except ModuleNotFoundError:
    from test_api import FakeBackend  # type: ignore[no-redef,import-not-found,unused-ignore]

TOKEN = "fuzz-token-0123456789"

# The documents are loaded from the apps themselves, so the fuzz covers what is served.
plain = schemathesis.openapi.from_asgi("/v1/openapi.json", create_app(FakeBackend()))
with_token = schemathesis.openapi.from_asgi(
    "/v1/openapi.json",
    create_app(FakeBackend(), token=TOKEN),
    headers={"Authorization": f"Bearer {TOKEN}"},
)

FUZZ = settings(max_examples=50, deadline=None, suppress_health_check=list(HealthCheck))


@plain.parametrize()
@FUZZ
def test_every_operation_conforms(case: schemathesis.Case[Any]) -> None:
    """No 5xx for any input (the fake never fails), and every answer matches the schema."""
    response = case.call()
    assert response.status_code < 500, (response.status_code, response.text)
    case.validate_response(response)


@with_token.parametrize()
@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
def test_every_operation_conforms_behind_a_token(case: schemathesis.Case[Any]) -> None:
    """The TCP flavour: the right token gets the same contract, anything else gets 401."""
    right = f"Bearer {TOKEN}"
    # Negative cases are sent as generated: they may drop or mangle the header on purpose.
    negative = case.meta is not None and case.meta.generation.mode.is_negative
    headers = None if negative else {"Authorization": right}
    response = case.call(headers=headers)
    assert response.status_code < 500, (response.status_code, response.text)
    if response.request.headers.get("Authorization") == right:
        assert response.status_code != 401
    else:
        assert response.status_code == 401
    case.validate_response(response, headers=headers)
