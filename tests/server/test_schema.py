"""schemathesis against the server's own OpenAPI schema: generated requests to every route, valid and
not, are answered with a success or a 4xx — never a 5xx — on a server with small limits (so each
accepted generation is quick). The number of cases tried is printed at the end of the run."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable

from sdlab.server.service import Limits
from tests.hostile import count
from tests.server.conftest import start

LIMITS = Limits(max_pixels=64 * 64, max_steps=3, max_batch=2)
PER_ROUTE = settings(max_examples=12, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def running(models_dir):
    server = start(models_dir, limits=LIMITS, queue=4)
    yield server
    server.stop()


def test_no_request_makes_a_server_error(running):
    schema = schemathesis.openapi.from_url(f"http://127.0.0.1:{running.port}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 20  # every route of both APIs

    for operation in operations:
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):  # valid, then not
            @PER_ROUTE
            @given(case=operation.as_strategy(generation_mode=mode))
            def route(case):
                count(f"schemathesis: {mode.value} requests")
                response = case.call(timeout=60)
                assert response.status_code < 500, (case.method, case.path, response.status_code, response.text[:300])

            try:
                route()
            except Unsatisfiable:  # a route that takes nothing has no invalid request to make
                assert mode is schemathesis.GenerationMode.NEGATIVE
