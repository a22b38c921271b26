"""The API description: valid OpenAPI 3.1, saying what the routes really take and answer,
with the bearer scheme where this server's settings need a key; and a bounded property-based
fuzz (schemathesis) of a real server against it."""

from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from openapi_spec_validator import validate
from schemathesis import GenerationMode
from schemathesis.checks import positive_data_acceptance

from helpers import image_bytes, in_process, run_server
from segserve.service.web.openapi import ErrorBody, ModelListing, Ready, SegmentResult

KEY = "fuzz-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


def test_the_description_is_valid_and_states_the_key_only_where_needed(tiny_repository):
    with in_process(tiny_repository, api_key=KEY) as app:
        spec = app.get("/openapi.json", headers=AUTH).json()
    validate(spec)
    assert spec["components"]["securitySchemes"]["apiKey"]["scheme"] == "bearer"
    paths = spec["paths"]
    assert paths["/segment"]["post"]["security"] == [{"apiKey": []}]
    assert paths["/v2/models/{name}/infer"]["post"]["security"] == [{"apiKey": []}]
    assert paths["/metrics"]["get"]["security"] == [{"metricsKey": []}]
    for probe in ("/healthz", "/readyz", "/v2/health/live", "/v2/health/ready"):
        assert "security" not in paths[probe]["get"], probe

    with in_process(tiny_repository, public_metrics=True) as app:  # no key at all
        open_spec = app.get("/openapi.json").json()
    validate(open_spec)
    assert "securitySchemes" not in open_spec.get("components", {})
    assert all("security" not in op for ops in open_spec["paths"].values() for op in ops.values())


def test_segment_documents_its_image_body_every_format_and_every_error(tiny_repository):
    with in_process(tiny_repository) as app:
        op = app.get("/openapi.json").json()["paths"]["/segment"]["post"]
    body = op["requestBody"]["content"]
    assert body["multipart/form-data"]["schema"]["properties"]["image"]["format"] == "binary"
    assert {"image/jpeg", "image/png", "application/octet-stream"} <= set(body)
    ok = op["responses"]["200"]["content"]
    assert ok["image/png"]["schema"]["format"] == "binary"
    assert ok["application/json"]["schema"]["$ref"] == "#/components/schemas/SegmentResult"
    for status in ("400", "401", "404", "408", "413", "415", "422", "503", "504"):
        schema = op["responses"][status]["content"]["application/json"]["schema"]
        assert schema["$ref"] == "#/components/schemas/ErrorBody", status


def test_metrics_and_the_palette_are_documented_as_what_they_are(tiny_repository):
    with in_process(tiny_repository) as app:
        paths = app.get("/openapi.json").json()["paths"]
    assert list(paths["/metrics"]["get"]["responses"]["200"]["content"]) == ["text/plain"]
    palette = paths["/models/{name}/palette.png"]["get"]["responses"]["200"]["content"]
    assert list(palette) == ["image/png"]
    infer = paths["/v2/models/{name}/infer"]["post"]["requestBody"]["content"]
    assert {"application/json", "application/octet-stream"} == set(infer)


def test_real_answers_are_what_the_models_describe(tiny_repository):
    with in_process(tiny_repository) as app:
        png = image_bytes(40, 56)
        for query in ("format=json&masks=all", "format=json&masks=1&mask_encoding=rle"):
            r = app.post(f"/segment?{query}", content=png, headers={"Content-Type": "image/png"})
            assert r.status_code == 200
            answer = r.json()
            assert set(answer) <= set(SegmentResult.model_fields)
            result = SegmentResult.model_validate(answer)
            assert (result.width, result.height) == (56, 40) and result.masks
        error = app.post("/segment", content=b"GIF89a-not-really")
        assert error.status_code in (400, 415)
        assert set(error.json()) == set(ErrorBody.model_fields)
        ModelListing.model_validate(app.get("/models").json())
        Ready.model_validate(app.get("/readyz").json())


def _leaves_the_route(case) -> bool:
    """A negative case can put a non-string (a list, a number) in a path parameter; the
    generator then writes its repr into the URL unescaped, and a '?' or '#' in it moves the
    request to another route (a 405 or 404 there is right, not a gap in the description)."""
    values = (case.path_parameters or {}).values()
    return any(not isinstance(value, str) or set(value) & set("?#/") for value in values)


@pytest.fixture(scope="module")
def fuzzed_server(tiny_repository, tmp_path_factory):
    with run_server(tiny_repository, tmp_path_factory.mktemp("fuzz"), api_key=KEY) as server:
        yield server


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_fuzzing_a_live_server_finds_no_5xx_and_no_answer_outside_the_description(
    fuzzed_server, mode
):
    """Every documented operation, with cases that fit the description (positive) and cases
    that break it (negative: those must be refused with a documented 4xx). Bounded: a few
    cases per operation, the same ones every run (derandomized), so a failure reproduces.
    (Run through hypothesis directly: schemathesis' pytest plugin does not load on pytest 9.)"""
    schema = schemathesis.openapi.from_url(fuzzed_server.url + "/openapi.json", headers=AUTH)
    failures: dict[str, str] = {}
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 15

    for operation in operations:

        @given(case=operation.as_strategy(generation_mode=GenerationMode(mode)))
        @settings(
            max_examples=8,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def check(case):
            if _leaves_the_route(case):
                return
            # Not positive_data_acceptance: a schema cannot say "a decodable image", so bytes
            # that fit `format: binary` are rightly a 400; every other check runs.
            case.call_and_validate(headers=AUTH, excluded_checks=[positive_data_acceptance])

        try:
            check()
        except Unsatisfiable:
            assert mode == "negative"  # no parameters or body to break (GET /healthz ...)
        except Exception as exc:  # noqa: BLE001 - collected, reported together below
            failures[operation.label] = str(exc)[:2000]
    # and the server is still there
    assert httpx.get(fuzzed_server.url + "/healthz", timeout=5).status_code == 200
    assert not failures, "\n\n".join(f"{k}:\n{v}" for k, v in failures.items())
