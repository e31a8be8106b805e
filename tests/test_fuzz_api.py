"""A fuzz run of the OpenAPI schema (schemathesis) against a served API: no 500s, no answer outside the schema.

The service runs with API keys required, so the fuzzer meets authentication
as well as every endpoint's validation. Two checks are left out, for reasons
that are the contract's, not bugs: ``positive_data_acceptance`` (page cursors
and ``Last-Event-ID`` are opaque: a made-up one is rightly a 400) and
``allow_header_conformance`` (Starlette's 405 lists the methods of the first
route matching the path, not of all of them).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.harness.stacks import ROOT, serve

pytestmark = [pytest.mark.service, pytest.mark.slow]


def test_fuzzing_the_schema_finds_no_server_error_and_no_schema_violation(tmp_path):
    env = {
        "NEURONSHAP_REQUIRE_API_KEYS": "true",
        "NEURONSHAP_MAX_MODEL_BYTES": "65536",
        "NEURONSHAP_MAX_DATA_BYTES": "65536",
    }
    key = subprocess.run(
        [sys.executable, "-m", "neuronshap", "keys", "create", "--tenant", "fuzz"],
        cwd=ROOT,
        env=os.environ | env | {"NEURONSHAP_DATA_DIR": str(tmp_path)},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    with serve(tmp_path, **env) as url:
        schema = httpx.get(f"{url}/openapi.json").json()
        methods = {"get", "put", "post", "delete", "patch", "head", "options"}
        operations = sum(1 for item in schema["paths"].values() for method in item if method in methods)
        result = subprocess.run(
            [
                str(Path(sys.executable).with_name("schemathesis")),
                "run",
                f"{url}/openapi.json",
                "--checks",
                "all",
                "--exclude-checks",
                "positive_data_acceptance,allow_header_conformance",
                "--max-examples",
                "15",
                "--seed",
                "1",
                "--header",
                f"Authorization: Bearer {key}",
                "--no-color",
            ],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=600,
        )
    assert result.returncode == 0, result.stdout[-6000:]
    assert f"{operations}/{operations}" in result.stdout  # every operation of the schema was exercised
