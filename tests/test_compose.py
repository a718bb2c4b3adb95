"""docker-compose.yml and the Dockerfile, tested without a Docker engine.

The compose file must parse, every service's command must be a real entry point
of this project, and the very same commands (with container paths and host
names swapped for local ones) must start here and answer their health checks.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from stack.procs import Service, free_port, wait_until
from tests.conftest import REPO

COMPOSE = REPO / "docker-compose.yml"
SCRIPTS = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
MODULE_OF_SCRIPT = {name: target.split(":")[0].split(".")[0] for name, target in SCRIPTS.items()}


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's ``${NAME:-default}`` / ``${NAME}`` substitution."""
    def sub(m: re.Match[str]) -> str:
        name, default = m.group(1), m.group(3) or ""
        return env.get(name) or default
    return re.sub(r"\$\{([A-Z0-9_]+)(:-([^}]*))?\}", sub, value)


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def to_local_argv(cmd: list[str]) -> list[str]:
    """A container command as a local command of this venv (console script -> python -m)."""
    cmd = [interpolate(c, {}) for c in cmd]
    if cmd[0] in MODULE_OF_SCRIPT:
        return [sys.executable, "-m", MODULE_OF_SCRIPT[cmd[0]], *cmd[1:]]
    assert cmd[0] == "python" and cmd[1] == "-m", f"not an entry point of this project: {cmd}"
    return [sys.executable, *cmd[1:]]


def service_env(svc: dict) -> dict[str, str]:
    env = {}
    for k, v in (svc.get("environment") or {}).items():
        env[k] = interpolate(str(v), {})
    return env


def default_services(compose: dict) -> dict[str, dict]:
    """The services `docker compose up` starts (those in no profile)."""
    return {n: s for n, s in compose["services"].items() if not s.get("profiles")}


def _web_status(port: int, path: str, token: str | None = None) -> int | None:
    """The HTTP status of GET ``path`` on the local web app, None when nothing answers."""
    import urllib.error
    import urllib.request

    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}",
                                 headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return None


def test_compose_shape(compose: dict) -> None:
    svcs = compose["services"]
    assert set(default_services(compose)) == {"models", "anti_sus", "gallery_bridge", "nomad", "web"}
    assert {n for n, s in svcs.items() if "scale" in (s.get("profiles") or [])} == {"broker", "anti_sus_worker"}
    for name in ("anti_sus", "gallery_bridge"):
        # Reachable only inside the compose network unless published on purpose.
        assert "ports" not in svcs[name], f"{name} must not be published by default"
        assert svcs[name]["healthcheck"]["test"][0] == "CMD"
        assert svcs[name]["restart"] == "unless-stopped"
    assert svcs["models"]["restart"] == "no"
    assert svcs["anti_sus"]["depends_on"]["models"]["condition"] == "service_completed_successfully"
    assert svcs["nomad"]["depends_on"]["anti_sus"]["condition"] == "service_healthy"
    assert set(compose["volumes"]) == {"models", "gallery", "state", "web"}
    # The web app: the one published port, on the host's loopback only, and never without a token.
    web = svcs["web"]
    assert web["ports"] == ["127.0.0.1:8780:8780"]
    assert web["environment"]["GALLERY_BRIDGE_WEB_TOKEN_FILE"] == "/web/token"
    assert web["environment"]["GALLERY_BRIDGE_WEB_CREATE_TOKEN"] == "1"
    from gallery_bridge.cli import build_parser as gallery_parser

    w = gallery_parser().parse_args(web["command"][1:])
    assert (w.command, w.bind, w.connect) == ("web", "0.0.0.0:8780", "tcp://gallery_bridge:7778")
    # Every console script named in the compose file is one this project installs.
    for name, svc in svcs.items():
        cmds = [svc["command"]] + ([svc["healthcheck"]["test"][1:]] if "healthcheck" in svc else [])
        for cmd in cmds:
            assert cmd[0] in SCRIPTS or cmd[:2] == ["python", "-m"], f"{name}: {cmd[0]} is not ours"


def test_each_threshold_has_one_owner_anti_sus(compose: dict) -> None:
    """The filter thresholds are set on anti_sus only, without a second default; nomad sends no override.

    A nomad override set from the same variable silently won over whatever anti_sus was told.
    """
    svcs = compose["services"]
    nomad_env = svcs["nomad"].get("environment") or {}
    assert not [k for k in nomad_env if "THRESHOLD" in k], "nomad must leave the thresholds to anti_sus"
    anti_env = svcs["anti_sus"]["environment"]
    for var in ("ANTI_SUS_GMM_THRESHOLD", "ANTI_SUS_WATERMARK_THRESHOLD"):
        assert var in anti_env
        # Empty unless the operator sets it: anti_sus's own default applies, not a copy of it here.
        assert interpolate(str(anti_env[var]), {}) == "", (var, anti_env[var])
    from nomad.cli import build_parser

    args = build_parser({}).parse_args(["once"])
    assert args.gmm_threshold is None and args.watermark_threshold is None


def test_documented_switches_are_in_compose(compose: dict) -> None:
    svcs = compose["services"]
    assert "NOMAD_CONTACT" in svcs["nomad"]["environment"]
    assert "GALLERY_BRIDGE_ALLOW_INSECURE_SCENERY" in svcs["gallery_bridge"]["environment"]
    readme = (REPO / "README.md").read_text()
    for name in ("NOMAD_CONTACT", "GALLERY_BRIDGE_ALLOW_INSECURE_SCENERY", "GMM_THRESHOLD"):
        assert name in readme, name


def test_docker_context_leaves_out_data_and_built_models() -> None:
    """var/models (and artifacts still in the old models/ folder) never end up inside an image."""
    ignored = (REPO / ".dockerignore").read_text().split()
    for pattern in ("var", ".venv", "state", "gallery", "models/**/*.onnx", "models/*.json"):
        assert pattern in ignored, pattern


def test_dockerfile_stages() -> None:
    text = (REPO / "Dockerfile").read_text()
    assert re.search(r"^FROM .* AS runtime$", text, re.M) and re.search(r"^FROM .* AS models$", text, re.M)
    runtime = text.split("AS runtime", 1)[1].split("FROM", 1)[0]
    assert "[models]" not in runtime and "torch" not in runtime, "the runtime image must not install torch"
    assert "USER miner" in runtime
    # Everything the images COPY exists.
    for src in re.findall(r"^COPY (\S+)", text, re.M):
        assert (REPO / src).exists(), src


@pytest.mark.skipif(shutil.which("docker") is None, reason="no docker client on this machine")
def test_docker_compose_config_when_plugin_present() -> None:
    probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip("docker compose plugin not installed (only the bare docker client)")
    out = subprocess.run(["docker", "compose", "-f", str(COMPOSE), "config", "--quiet"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


@pytest.mark.e2e  # starts every compose service as a real process: left out of `make test-fast`
def test_compose_commands_start_locally(compose: dict, tiny_models: Path, tmp_path: Path) -> None:
    """models (one-shot) -> anti_sus + gallery_bridge (health checks pass) -> nomad (runs, stops on SIGTERM)."""
    from stack.emulator import Emulator

    svcs = compose["services"]
    models = tmp_path / "models"
    shutil.copytree(tiny_models, models)
    gallery, state = tmp_path / "gallery", tmp_path / "state"
    gallery.mkdir()
    a_port, g_port = free_port(), free_port()

    def local(cmd: list[str]) -> list[str]:
        out = []
        for c in to_local_argv(cmd):
            c = re.sub(r"(^|:)/(models|gallery|state)\b", lambda m: m.group(1) + str(tmp_path / m.group(2)), c)
            c = c.replace("tcp://0.0.0.0:7777", f"tcp://127.0.0.1:{a_port}").replace("tcp://anti_sus:7777", f"tcp://127.0.0.1:{a_port}")
            c = c.replace("tcp://0.0.0.0:7778", f"tcp://127.0.0.1:{g_port}").replace("tcp://gallery_bridge:7778", f"tcp://127.0.0.1:{g_port}")
            c = c.replace("tcp://127.0.0.1:7777", f"tcp://127.0.0.1:{a_port}").replace("tcp://127.0.0.1:7778", f"tcp://127.0.0.1:{g_port}")
            out.append(c)
        return out

    # The one-shot models service: the directory is complete, so it only verifies (no internet needed).
    m = subprocess.run(local(svcs["models"]["command"]), env={**os.environ, **service_env(svcs["models"])},
                       capture_output=True, text=True, timeout=120)
    assert m.returncode == 0, m.stdout + m.stderr

    started: list[Service] = []
    try:
        for name in ("anti_sus", "gallery_bridge"):
            svc = Service(name, local(svcs[name]["command"]), tmp_path / f"{name}.log", env=service_env(svcs[name])).start()
            started.append(svc)
            health = local(svcs[name]["healthcheck"]["test"][1:])
            wait_until(lambda: subprocess.run(health, capture_output=True, timeout=30).returncode == 0 or not svc.running,
                       90, 0.5, f"{name} health check")
            assert svc.running, svc.tail()
        # The web app: bound to loopback here (tests never listen elsewhere); it still makes and asks for its token.
        w_port = free_port()
        web_cmd = [c.replace("0.0.0.0:8780", f"127.0.0.1:{w_port}") for c in local(svcs["web"]["command"])]
        web_env = {k: v.replace("/web/", f"{tmp_path}/web/") for k, v in service_env(svcs["web"]).items()}
        web = Service("web", web_cmd, tmp_path / "web.log", env=web_env).start()
        started.append(web)
        token_file = tmp_path / "web" / "token"
        wait_until(lambda: _web_status(w_port, "/healthz") == 200 or not web.running, 90, 0.5, "the web app")
        assert web.running, web.tail()
        assert _web_status(w_port, "/api/images") == 401
        assert _web_status(w_port, "/api/images", token_file.read_text().strip()) == 200
        with Emulator() as emu:
            argv = local(svcs["nomad"]["command"]) + ["--interval", "3600", *emu.nomad_args()]
            # nomad's endpoints come from the environment too (NOMAD_ANTI_SUS): container host names -> local ports.
            nomad_env = {k: v.replace("tcp://anti_sus:7777", f"tcp://127.0.0.1:{a_port}")
                         .replace("tcp://gallery_bridge:7778", f"tcp://127.0.0.1:{g_port}")
                         for k, v in service_env(svcs["nomad"]).items()}
            nomad = Service("nomad", argv, tmp_path / "nomad.log", env={**nomad_env, **emu.nomad_env()}).start()
            started.append(nomad)
            wait_until(lambda: "cycle:" in nomad.tail(200) or not nomad.running, 240, 1.0, "nomad's first cycle")
            assert nomad.running, nomad.tail()
            nomad.proc.send_signal(signal.SIGTERM)
            assert nomad.proc.wait(timeout=90) == 0, nomad.tail()
    finally:
        for svc in reversed(started):
            svc.stop()


# -- the `scale` profile: broker + N workers, nomad pointed at the broker by NOMAD_ANTI_SUS --------------

def parse_command(cmd: list[str]):
    """A compose command through this project's own parser (so every flag in it exists)."""
    cmd = [interpolate(c, {}) for c in cmd]
    if cmd[0] == "anti-sus":
        from anti_sus.cli import build_parser
        return build_parser().parse_args(cmd[1:])
    if cmd[0] == "nomad":
        from nomad.cli import build_parser as nomad_parser
        return nomad_parser({}).parse_args(cmd[1:])
    raise AssertionError(f"unexpected command {cmd}")


def test_scale_profile_shape(compose: dict) -> None:
    svcs = compose["services"]
    broker, worker, nomad = svcs["broker"], svcs["anti_sus_worker"], svcs["nomad"]
    # Scalable: `--scale anti_sus_worker=N` fails on a fixed container name or a host port.
    for name in ("broker", "anti_sus_worker"):
        assert "container_name" not in svcs[name] and "ports" not in svcs[name], name
    b = parse_command(broker["command"])
    w = parse_command(worker["command"])
    assert b.command == "broker" and w.command == "serve"
    assert b.frontend == ["tcp://0.0.0.0:7777"] and b.backend == ["tcp://0.0.0.0:7779"]
    assert w.connect == "tcp://broker:7779", "workers must connect to the broker's backend port"
    assert set(broker["expose"]) == {"7777", "7779"}
    assert worker["depends_on"]["broker"]["condition"] == "service_started"
    # `--scale anti_sus=0` must not leave nomad with a missing dependency.
    assert nomad["depends_on"]["anti_sus"] == {"condition": "service_healthy", "required": False}
    assert worker["depends_on"]["models"]["condition"] == "service_completed_successfully"
    assert "models:/models:ro" in worker["volumes"]
    # The broker's health check goes through a worker, on the broker's own frontend.
    assert broker["healthcheck"]["test"][1:3] == ["anti-sus", "ping"]
    # nomad: no --anti-sus on its command line (a flag would beat the variable), the single server by default,
    # the broker when NOMAD_ANTI_SUS says so.
    n = parse_command(nomad["command"])
    assert "--anti-sus" not in nomad["command"]
    env = nomad["environment"]
    assert interpolate(env["NOMAD_ANTI_SUS"], {}) == "tcp://anti_sus:7777"
    assert interpolate(env["NOMAD_ANTI_SUS"], {"NOMAD_ANTI_SUS": "tcp://broker:7777"}) == "tcp://broker:7777"
    from nomad.cli import build_parser as nomad_parser
    assert nomad_parser({"NOMAD_ANTI_SUS": interpolate(env["NOMAD_ANTI_SUS"], {})}).parse_args(
        nomad["command"][1:]).anti_sus == "tcp://anti_sus:7777"
    assert n.command == "run"
    # Worker CURVE keys and the backend's allow-list pass through, unset by default.
    for var in ("ANTI_SUS_CURVE_SERVER_KEY", "ANTI_SUS_CURVE_CLIENT_KEY"):
        assert interpolate(worker["environment"][var], {}) == ""
    for var in ("ANTI_SUS_BACKEND_CURVE_SECRET_KEY", "ANTI_SUS_BACKEND_CURVE_ALLOW"):
        assert interpolate(broker["environment"][var], {}) == ""
    assert "NOMAD_ANTI_SUS=tcp://broker:7777" in COMPOSE.read_text()  # the documented command line
    assert "--profile scale" in (REPO / "docs" / "scaling.md").read_text()


@pytest.mark.e2e  # a broker, two workers, gallery_bridge and nomad as real processes
def test_compose_scale_profile_starts_locally(compose: dict, tiny_models: Path, tmp_path: Path) -> None:
    """The scale profile's commands: both workers join the broker, its health check passes, nomad's cycle filters through it."""
    from stack.emulator import Emulator

    svcs = compose["services"]
    models = tmp_path / "models"
    shutil.copytree(tiny_models, models)
    (tmp_path / "gallery").mkdir()
    ports = {"7777": free_port(), "7778": free_port(), "7779": free_port()}

    def local(cmd: list[str]) -> list[str]:
        out = []
        for c in to_local_argv(cmd):
            c = re.sub(r"(^|:)/(models|gallery|state)\b", lambda m: m.group(1) + str(tmp_path / m.group(2)), c)
            c = re.sub(r"tcp://(0\.0\.0\.0|127\.0\.0\.1|broker|gallery_bridge|anti_sus):(777[789])",
                       lambda m: f"tcp://127.0.0.1:{ports[m.group(2)]}", c)
            out.append(c)
        return out

    started: list[Service] = []
    try:
        broker = Service("broker", local(svcs["broker"]["command"]), tmp_path / "broker.log", env=service_env(svcs["broker"])).start()
        started.append(broker)
        workers = []
        for k in range(2):  # what `--scale anti_sus_worker=2` starts: the same command twice
            w = Service(f"worker{k}", local(svcs["anti_sus_worker"]["command"]) + ["--threads", "1"], tmp_path / f"worker{k}.log",
                        env=service_env(svcs["anti_sus_worker"])).start()
            started.append(w)
            workers.append(w)
        wait_until(lambda: broker.tail(200).count("joined with capacity") >= 2 or not broker.running, 120, 0.5, "two workers join")
        assert broker.running and all(w.running for w in workers), broker.tail()
        health = local(svcs["broker"]["healthcheck"]["test"][1:])
        assert subprocess.run(health, capture_output=True, timeout=30).returncode == 0, broker.tail()
        gb = Service("gallery_bridge", local(svcs["gallery_bridge"]["command"]), tmp_path / "gb.log",
                     env=service_env(svcs["gallery_bridge"])).start()
        started.append(gb)
        gb_health = local(svcs["gallery_bridge"]["healthcheck"]["test"][1:])
        wait_until(lambda: subprocess.run(gb_health, capture_output=True, timeout=30).returncode == 0 or not gb.running,
                   90, 0.5, "gallery_bridge health check")
        nomad_env = {**service_env(svcs["nomad"]), "NOMAD_ANTI_SUS": f"tcp://127.0.0.1:{ports['7777']}"}
        with Emulator() as emu:
            argv = local(svcs["nomad"]["command"]) + ["--interval", "3600", *emu.nomad_args()]
            nomad = Service("nomad", argv, tmp_path / "nomad.log", env={**nomad_env, **emu.nomad_env()}).start()
            started.append(nomad)
            wait_until(lambda: "cycle:" in nomad.tail(200) or not nomad.running, 240, 1.0, "nomad's first cycle")
            assert nomad.running, nomad.tail()
            nomad.proc.send_signal(signal.SIGTERM)
            assert nomad.proc.wait(timeout=90) == 0, nomad.tail()
        served = sum(w.tail(500).count("filter id=") for w in workers)
        assert served >= 1, "no filter request went through the broker to a worker"
    finally:
        for svc in reversed(started):
            svc.stop()
