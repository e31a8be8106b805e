"""The schema describes what a client must send, and ``/docs`` renders with no network."""

from __future__ import annotations

import re

from fastapi.testclient import TestClient

from app.core.config import Settings
from app.jobs.spec import EstimatorSpec, JobSpec, MetricSpec, PlayersSpec
from neuronshap.server import create_server_app


def client(tmp_path) -> TestClient:
    return TestClient(create_server_app(Settings(data_dir=tmp_path)))  # no lifespan: no job runs here


def test_the_spec_form_field_is_described_by_the_job_spec_schema(tmp_path):
    schema = client(tmp_path).get("/openapi.json").json()
    body = schema["components"]["schemas"]["Body_submit_job_v1_jobs_post"]["properties"]["spec"]
    assert body["contentMediaType"] == "application/json"
    assert body["contentSchema"] == {"$ref": "#/components/schemas/JobSpec"}
    components = schema["components"]["schemas"]
    for model in (JobSpec, MetricSpec, PlayersSpec, EstimatorSpec):
        described = components[model.__name__]["properties"]
        for name, field in model.model_fields.items():
            key = field.alias or name
            assert key in described, (model.__name__, key)
            if field.description:
                assert described[key]["description"] == field.description
    assert components["JobOut"]["properties"]["spec"]["$ref"].endswith("/JobSpec")


def test_docs_page_loads_only_assets_this_service_serves(tmp_path):
    http = client(tmp_path)
    page = http.get("/docs")
    assert page.status_code == 200
    sources = re.findall(r'(?:src|href)=["\']([^"\']+)', page.text)
    assert sources and all(s.startswith("/") for s in sources), sources
    for source in sources:
        asset = http.get(source)
        assert asset.status_code == 200 and len(asset.content) > 100, source
    assert http.get("/redoc").status_code == 404  # ReDoc would come from a CDN: not offered
