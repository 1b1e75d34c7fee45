"""deploy/ checked statically (no Docker engine here): what the files say agrees with the code."""

from __future__ import annotations

import configparser
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from service.app import create_app
from service.cli import main
from service.redis_url import check as check_redis_url
from service.server import RESERVED_FILES
from service.settings import Settings
from tests.conftest import make_settings

DEPLOY = Path(__file__).parent.parent / "deploy"
SETTINGS = {name.upper() for name in Settings.model_fields}
REQUIRED_SECRETS = {"SALLA_WEBHOOK_SECRET", "SALLA_CLIENT_ID", "SALLA_CLIENT_SECRET"}


def k8s_docs() -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def assert_cli_command(args: list[str]) -> None:
    """The command exists in `salla-rewards` and its options parse."""
    name, *rest = args
    command = main.commands.get(name)  # type: ignore[attr-defined]
    assert command is not None, f"no such command: {name}"
    command.make_context(name, list(rest))


def routes() -> set[str]:
    return {route.path for route in create_app(make_settings(), "redis://unused").routes}


class TestDockerfile:
    """Multi-stage, small base, non-root, one image for both commands."""

    text = (DEPLOY / "Dockerfile").read_text()

    def test_multi_stage_and_non_root(self) -> None:
        assert len(re.findall(r"^FROM ", self.text, re.M)) >= 2
        user = re.findall(r"^USER (\S+)", self.text, re.M)
        assert user and user[-1].split(":")[0] not in ("root", "0")
        assert "-slim" in self.text

    def test_entrypoint_and_default_command(self) -> None:
        assert 'ENTRYPOINT ["salla-rewards"]' in self.text
        cmd = re.search(r"^CMD (\[.*\])", self.text, re.M)
        assert cmd is not None
        assert_cli_command(yaml.safe_load(cmd.group(1)))

    def test_installs_from_the_runtime_lock(self) -> None:
        assert "requirements.runtime.lock" in self.text
        assert (DEPLOY.parent / "requirements.runtime.lock").exists()
        for env in re.findall(r"^\s+(\w+)=", self.text, re.M):
            assert env in SETTINGS | {"PATH", "PYTHONUNBUFFERED"}, env


class TestCompose:
    """Redis with AOF, web and worker, required secrets fail fast."""

    doc = yaml.safe_load((DEPLOY / "compose.yaml").read_text())

    def test_services(self) -> None:
        services = self.doc["services"]
        assert set(services) == {"redis", "web", "worker"}
        assert "--appendonly" in " ".join(services["redis"]["command"])
        assert services["redis"]["healthcheck"]["test"]

    def test_required_secrets_and_known_settings(self) -> None:
        for name in ("web", "worker"):
            env = self.doc["services"][name]["environment"]
            assert set(env) <= SETTINGS, set(env) - SETTINGS
            for secret in REQUIRED_SECRETS:
                assert re.fullmatch(r"\$\{" + secret + r":\?.+\}", env[secret]), secret

    def test_commands_ports_and_checks_agree_with_the_code(self) -> None:
        web, worker = self.doc["services"]["web"], self.doc["services"]["worker"]
        assert_cli_command(web["command"])
        assert_cli_command(worker["command"])
        port = web["command"][web["command"].index("--port") + 1]
        assert web["ports"] == [f"{port}:{port}"]
        assert "/readyz" in " ".join(web["healthcheck"]["test"]) and "/readyz" in routes()
        assert worker["healthcheck"]["test"][1:] == ["salla-rewards", "worker", "--check"]
        assert_cli_command(worker["healthcheck"]["test"][2:])
        assert all(":ro" in v for v in web["volumes"] + worker["volumes"])


class TestKubernetes:
    """Probes, ports and settings match the code; pods run as non-root."""

    def by_kind(self, kind: str) -> list[dict[str, Any]]:
        return [d for d in k8s_docs() if d["kind"] == kind]

    def test_the_expected_objects_exist(self) -> None:
        kinds = {d["kind"] for d in k8s_docs()}
        assert {
            "Deployment",
            "Service",
            "HorizontalPodAutoscaler",
            "PodDisruptionBudget",
            "Secret",
        } <= kinds

    def test_probes_point_at_real_routes_and_commands(self) -> None:
        known = routes()
        for deployment in self.by_kind("Deployment"):
            [container] = deployment["spec"]["template"]["spec"]["containers"]
            assert_cli_command(container["args"])
            for probe in ("livenessProbe", "readinessProbe"):
                spec = container.get(probe)
                if spec and "httpGet" in spec:
                    assert spec["httpGet"]["path"] in known
                if spec and "exec" in spec:
                    assert_cli_command(spec["exec"]["command"][1:])
            assert deployment["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"]
            for env in container.get("env", []):
                assert env["name"] in SETTINGS

    def test_ports_agree(self) -> None:
        web = next(d for d in self.by_kind("Deployment") if d["metadata"]["name"].endswith("web"))
        [container] = web["spec"]["template"]["spec"]["containers"]
        port = container["args"][container["args"].index("--port") + 1]
        assert container["ports"][0]["containerPort"] == int(port)
        worker = next(
            d for d in self.by_kind("Deployment") if d["metadata"]["name"].endswith("worker")
        )
        [wc] = worker["spec"]["template"]["spec"]["containers"]
        metrics_port = next(e["value"] for e in wc["env"] if e["name"] == "WORKER_METRICS_PORT")
        assert wc["ports"][0]["containerPort"] == int(metrics_port)

    def test_secret_example_covers_the_required_settings(self) -> None:
        [secret] = self.by_kind("Secret")
        assert REQUIRED_SECRETS | {"REDIS_URL"} <= set(secret["stringData"])
        assert set(secret["stringData"]) <= SETTINGS


class TestSystemd:
    """Units start real commands and read the environment from one file."""

    def test_units(self) -> None:
        for path in (DEPLOY / "systemd").glob("*.service"):
            unit = configparser.ConfigParser(interpolation=None, strict=False)
            unit.read_string(path.read_text())
            service = unit["Service"]
            args = shlex.split(service["ExecStart"])
            assert args[0].endswith("/salla-rewards")
            assert_cli_command(args[1:])
            assert service["User"] != "root"
            assert service["EnvironmentFile"] == "/etc/salla-rewards/env"


#: Open files `serve` needs at the default MAX_CONNECTIONS.
OPEN_FILES_NEEDED = Settings.model_fields["max_connections"].default + RESERVED_FILES


class TestRedisPasswordAndOpenFiles:
    """Every file sets a Redis password and gives the web process the open files it needs."""

    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())

    def test_compose_starts_redis_with_a_required_password_the_services_use(self) -> None:
        redis = self.compose["services"]["redis"]
        required = r"\$\{REDIS_PASSWORD:\?.+\}"
        assert re.fullmatch(required, redis["environment"]["REDIS_PASSWORD"])
        assert 'requirepass "%s"' in " ".join(redis["command"])
        assert "REDISCLI_AUTH" in " ".join(redis["healthcheck"]["test"])
        for name in ("web", "worker"):
            url = self.compose["services"][name]["environment"]["REDIS_URL"]
            assert re.fullmatch(r"redis://:" + required + r"@redis:6379/0", url), url
            filled = re.sub(required, "0123abcd" * 4, url)
            assert make_settings(redis_url=filled).redis_url == check_redis_url(filled)

    def test_the_kubernetes_secret_example_is_refused_until_filled_in(self) -> None:
        [secret] = [d for d in k8s_docs() if d["kind"] == "Secret"]
        example = secret["stringData"]["REDIS_URL"]
        with pytest.raises(ValueError, match="password is a placeholder"):
            make_settings(redis_url=example)

    def test_web_gets_enough_open_files(self) -> None:
        nofile = self.compose["services"]["web"]["ulimits"]["nofile"]
        assert min(nofile["soft"], nofile["hard"]) >= OPEN_FILES_NEEDED
        unit = configparser.ConfigParser(interpolation=None, strict=False)
        unit.read_string((DEPLOY / "systemd" / "salla-rewards-web.service").read_text())
        assert int(unit["Service"]["LimitNOFILE"]) >= OPEN_FILES_NEEDED
