"""deploy/ checked statically (no Docker engine here): what the files say agrees with the code."""

from __future__ import annotations

import configparser
import json
import os
import re
import shlex
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import yaml
from redis import Redis

from service.app import create_app
from service.cli import main
from service.redis_url import check as check_redis_url
from service.rules import load_rules
from service.rules.loader import MERCHANTS_DIR
from service.server import RESERVED_FILES
from service.settings import Settings
from service.webhooks import signed_headers
from tests.conftest import ROOT_DIR, SECRET, fixture_bytes, make_settings
from tests.support.layouts import (
    Layout,
    compose_layout,
    configmap_sources,
    image_layout,
    k8s_deployments,
    k8s_layout,
    k8s_manifests,
)
from tests.support.servers import free_port, wait_until

DEPLOY = Path(__file__).parent.parent / "deploy"
SETTINGS = {name.upper() for name in Settings.model_fields}
REQUIRED_SECRETS = {"SALLA_WEBHOOK_SECRET", "SALLA_CLIENT_ID", "SALLA_CLIENT_SECRET"}


def k8s_docs() -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for path in k8s_manifests():
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

    @pytest.mark.parametrize(
        "folder",
        sorted(p.parent.relative_to(DEPLOY).as_posix() for p in DEPLOY.rglob("kustomization.yaml")),
    )
    def test_each_kustomization_names_what_kustomize_can_load(self, folder: str) -> None:
        """Every resource is a file beside it or a folder with a kustomization, and no folder
        holds the kustomization that names it: kustomize refuses that cycle, which an overlay
        inside its base's folder (`../`) was."""
        here = (DEPLOY / folder).resolve()
        kustomization = yaml.safe_load((here / "kustomization.yaml").read_text())
        for resource in kustomization["resources"]:
            target = (here / resource).resolve()
            if target.is_dir():
                assert (target / "kustomization.yaml").is_file(), resource
                assert not here.is_relative_to(target), f"{resource}: a cycle"
            else:
                assert target.is_file() and target.parent == here, resource
        for patch in kustomization.get("patches", []):
            assert (here / patch["path"]).resolve().parent == here, patch

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


def same_rules(layout_rules: Path) -> None:
    """The rules found in a deploy layout are the repository's rules/, overrides included."""
    shipped, deployed = load_rules(ROOT_DIR / "rules"), load_rules(layout_rules)
    assert [r.id for r in deployed.rules] == [r.id for r in shipped.rules]
    assert set(deployed.overrides) == set(shipped.overrides) != set()
    # What broke it: the rule files' tests name example files the layout does not hold.
    named = [t.event for t in deployed.tests if isinstance(t.event, Path)]
    assert named and not any(path.exists() for path in named)


class TestDeployLayoutsHoldTheRules:
    """Each deploy file's layout gives RULES_PATH the shipped rules, loadable without examples."""

    def test_image(self, tmp_path: Path) -> None:
        layout, _ = image_layout(tmp_path)
        assert not (tmp_path / "examples").exists() and not layout.path("/app/examples").exists()
        same_rules(layout.path(layout.env["RULES_PATH"]))

    @pytest.mark.parametrize("service", ["web", "worker"])
    def test_compose_mounts_the_rules_where_rules_path_points(
        self, tmp_path: Path, service: str
    ) -> None:
        layout = compose_layout(tmp_path, service)
        targets = [v.split(":")[1] for v in TestCompose.doc["services"][service]["volumes"]]
        assert layout.env["RULES_PATH"] in targets
        same_rules(layout.path(layout.env["RULES_PATH"]))

    @pytest.mark.parametrize("name", sorted(k8s_deployments()))
    def test_k8s_configmaps_fill_rules_path_and_its_store_overrides(
        self, tmp_path: Path, name: str
    ) -> None:
        deployment = k8s_deployments()[name]
        [container] = deployment["spec"]["template"]["spec"]["containers"]
        rules_path = next(e["value"] for e in container["env"] if e["name"] == "RULES_PATH")
        mounts = {m["mountPath"] for m in container["volumeMounts"]}
        assert {rules_path, f"{rules_path}/{MERCHANTS_DIR}"} <= mounts
        for volume in deployment["spec"]["template"]["spec"]["volumes"]:
            # every ConfigMap the pod mounts is one deploy/README.md tells how to create
            assert volume["configMap"]["name"] in configmap_sources(), volume
        # The kubelet's layout (hidden `..data` folders) must not double every rule.
        same_rules(k8s_layout(tmp_path, deployment).path(rules_path))


def service_env(layout: Layout, redis_url: str, **extra: str) -> dict[str, str]:
    """The container's environment (paths moved into the layout) plus what an operator sets;
    none of this machine's own settings leak in."""
    settings = {name.upper() for name in Settings.model_fields}
    inherited = {k: v for k, v in os.environ.items() if k not in settings}
    return {
        **inherited,
        **layout.host_env(),
        "REDIS_URL": redis_url,
        "SALLA_WEBHOOK_SECRET": SECRET,
        "SALLA_CLIENT_ID": "client-id",
        "SALLA_CLIENT_SECRET": "client-secret",
        "SALLA_API_BASE": "http://127.0.0.1:9",
        **extra,
    }


def console_script() -> str:
    """The installed `salla-rewards` entry point, as the image's ENTRYPOINT runs it."""
    return str(Path(sys.executable).parent / "salla-rewards")


def with_options(args: list[str], **values: str) -> list[str]:
    """A command with `--name value` options replaced."""
    args = list(args)
    for name, value in values.items():
        args[args.index(f"--{name}") + 1] = value
    return args


@contextmanager
def started(args: list[str], layout: Layout, env: dict[str, str], log: Path) -> Iterator[Any]:
    """`salla-rewards ARGS` in the layout's working folder; on exit it must stop on SIGTERM
    within 30 s and have printed no traceback."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [console_script(), *args], cwd=layout.cwd, env=env, stdout=out, stderr=out
        )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise AssertionError(f"{args[0]} did not stop on SIGTERM:\n{log.read_text()}") from None
    text = log.read_text()
    # uvicorn finishes its shutdown, then re-raises the SIGTERM it caught (exit status 143).
    assert code in (0, -signal.SIGTERM), f"{args[0]} exited {code}:\n{text}"
    assert "Traceback" not in text, text


@pytest.mark.slow
class TestStartsInTheImageLayout:
    """`serve` and `worker` start from exactly the files the image holds, and stop cleanly."""

    def test_serve_and_worker_come_up_process_a_webhook_and_stop(
        self, tmp_path: Path, redis_url: str
    ) -> None:
        Redis.from_url(redis_url).flushall()
        layout, stage = image_layout(tmp_path / "image")
        before = layout.files()
        port, metrics_port = free_port(), free_port()
        env = service_env(layout, redis_url, WORKER_METRICS_PORT=str(metrics_port))
        web_url = f"http://127.0.0.1:{port}"
        serve_args = with_options(stage.cmd, host="127.0.0.1", port=str(port))
        with ExitStack() as stack:
            web = stack.enter_context(started(serve_args, layout, env, tmp_path / "serve.log"))
            worker_log = tmp_path / "worker.log"
            stack.enter_context(started(["worker"], layout, env, worker_log))
            wait_until(lambda: web.poll() is not None or httpx.get(f"{web_url}/readyz").is_success)
            assert web.poll() is None, (tmp_path / "serve.log").read_text()
            assert httpx.get(f"{web_url}/healthz").status_code == 200

            def worker_checks_in() -> bool:
                check = [console_script(), "worker", "--check"]
                return subprocess.run(check, env=env, capture_output=True).returncode == 0

            wait_until(worker_checks_in)
            assert httpx.get(f"http://127.0.0.1:{metrics_port}/metrics").status_code == 200

            # The rules the image holds do their work: the sample completed order earns 15.
            body = fixture_bytes("order.status.updated.json")
            answer = httpx.post(
                f"{web_url}/webhooks/salla", content=body, headers=signed_headers(body, SECRET)
            )
            assert answer.json()["status"] == "accepted"
            wait_until(lambda: '"event_processed"' in worker_log.read_text())
            [line] = [
                json.loads(line)
                for line in worker_log.read_text().splitlines()
                if '"event_processed"' in line
            ]
            assert [(g["rule_id"], g["points"]) for g in line["queued"]] == [("purchase", 15)]
        # Nothing was written into the image's folders (the pods run read-only).
        assert layout.files() == before


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


def _filled(env: dict[str, str]) -> dict[str, str]:
    """Compose's `${VAR:?message}` filled with a value, as compose would with the variable set,
    and `${VAR:-default}` with its default."""
    filled = {k: re.sub(r"\$\{(\w+):\?[^}]*\}", "s3cret-value", str(v)) for k, v in env.items()}
    return {k: re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", v) for k, v in filled.items()}


class TestQueueSentinelVariants:
    """The Sentinel variants of compose and Kubernetes give web and worker settings that load,
    naming Sentinels and a master that the files themselves set up."""

    compose = yaml.safe_load((DEPLOY / "compose.sentinel.yaml").read_text())
    base = yaml.safe_load((DEPLOY / "compose.yaml").read_text())

    def test_compose_sentinels_watch_the_master_the_service_asks_for(self) -> None:
        services = self.compose["services"]
        web_env, worker_env = services["web"]["environment"], services["worker"]["environment"]
        assert web_env == worker_env and set(web_env) <= SETTINGS
        settings = Settings(**{**_filled(self.base["services"]["web"]["environment"]),
                               **_filled(web_env)})  # fmt: skip
        master = settings.queue_redis_sentinel_master
        sentinels = settings.queue_sentinels
        assert sentinels and all(port == 26379 for _, port in sentinels)
        for host, _ in sentinels:
            # each Sentinel the service names is a service here, configured to watch `master`
            command = " ".join(services[host]["command"])
            config = re.search(r"printf\s+'([^']*)'", command)
            assert config is not None, host
            lines = config.group(1).split("\\n")
            monitor = next(line.split() for line in lines if line.startswith("sentinel monitor"))
            _, _, name, node, port, quorum = monitor
            assert name == master and f'sentinel auth-pass {master} "%s"' in lines
            assert node in services and f"--replica-announce-ip {node}" in " ".join(
                services[node]["command"]
            )
            assert int(port) == 6379 and 1 < int(quorum) <= len(sentinels)
            assert "sentinel resolve-hostnames yes" in lines  # before `monitor` names a host
            assert lines.index("sentinel resolve-hostnames yes") < lines.index(" ".join(monitor))
            assert "/data" in " ".join(services[host]["volumes"])  # its rewritten config kept
        replicas = [s for s in services.values() if "--replicaof" in " ".join(s.get("command", []))]
        assert replicas, "a master and no replica: nothing to fail over to"
        # the queue nodes' password is the one in QUEUE_REDIS_URL, and required
        assert "${QUEUE_REDIS_PASSWORD:?" in web_env["QUEUE_REDIS_URL"]
        assert settings.queue_redis_url and "s3cret-value" in settings.queue_redis_url

    def test_k8s_overlay_patches_web_and_worker_with_settings_that_load(self) -> None:
        overlay = DEPLOY / "k8s" / "queue-sentinel"
        kustomization = yaml.safe_load((overlay / "kustomization.yaml").read_text())
        assert kustomization["resources"] == ["../base"]
        deployments = k8s_deployments()
        patched = {p["target"]["name"] for p in kustomization["patches"]}
        assert patched == set(deployments)  # every Deployment: web and worker
        for patch in kustomization["patches"]:
            deployment = deployments[patch["target"]["name"]]
            [container] = deployment["spec"]["template"]["spec"]["containers"]
            env = {e["name"]: e["value"] for e in container.get("env", [])}
            for op in yaml.safe_load((overlay / patch["path"]).read_text()):
                assert op["op"] == "add"
                assert op["path"] == "/spec/template/spec/containers/0/env/-"
                env[op["value"]["name"]] = op["value"]["value"]
            assert set(env) <= SETTINGS
            settings = make_settings(**{k.lower(): v for k, v in env.items()})
            assert settings.queue_sentinels and settings.queue_redis_sentinel_master
        [secret] = [d for d in k8s_docs() if d["kind"] == "Secret"]
        assert "QUEUE_REDIS_URL" in (DEPLOY / "k8s" / "secret.example.yaml").read_text()
        assert secret  # the Secret it tells to fill in exists


def cluster_settings(env: dict[str, str]) -> Settings:
    """The settings web and worker get from `env`: cluster mode, and settings that load."""
    assert set(env) <= SETTINGS, set(env) - SETTINGS
    settings = Settings(**env)
    assert settings.redis_cluster is True
    # What survives a failover, and the inbox spread over the three masters.
    assert settings.webhook_durability == "replica"
    assert settings.inbox_shards == 3
    return settings


def created_nodes(command: str) -> list[str]:
    """The `host:port` nodes a `redis-cli --cluster create ... --cluster-replicas 1` joins."""
    found = re.search(r"--cluster create\s+((?:\S+:\d+\s+)+)--cluster-replicas 1 --cluster-yes",
                      command)  # fmt: skip
    assert found is not None, command
    return found.group(1).split()


#: What every state node runs with: cluster mode, its cluster state and AOF on its volume, and
#: its name (not its address) in the redirections clients follow.
CLUSTER_NODE_OPTIONS = (
    "--cluster-enabled yes",
    "--cluster-config-file /data/nodes.conf",
    "--appendonly yes",
    "--appendfsync everysec",
    "--cluster-preferred-endpoint-type hostname",
)


def node_command(command: list[str]) -> str:
    """A node's shell command, as it asks redis-server to run."""
    text = " ".join(command)
    for option in CLUSTER_NODE_OPTIONS:
        assert option in text, option
    # the password from a config file, for clients and for the replica's link to its master
    assert (
        'requirepass "%s"\\nmasterauth "%s"' in text and "exec redis-server /tmp/auth.conf" in text
    )
    return text


class TestStateClusterVariants:
    """The Redis Cluster variants: six cluster nodes made three masters with a replica each,
    web and worker on the cluster for state and on a standalone Redis for arq's queue."""

    compose = yaml.safe_load((DEPLOY / "compose.cluster.yaml").read_text())
    base = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    overlay = DEPLOY / "k8s" / "state-cluster"

    def nodes(self) -> dict[str, dict[str, Any]]:
        return {name: spec for name, spec in self.compose["services"].items()
                if "--cluster-enabled" in " ".join(spec.get("command", []))}  # fmt: skip

    def test_compose_nodes_keep_aof_and_cluster_state_each_on_its_own_volume(self) -> None:
        nodes = self.nodes()
        assert len(nodes) == 6
        volumes = set()
        for name, node in nodes.items():
            text = node_command(node["command"])
            # it announces its own name, which resolves on the compose network
            assert node["hostname"] == name and '--cluster-announce-hostname "$$(hostname)"' in text
            [volume] = node["volumes"]
            source, target = volume.split(":")
            assert target == "/data" and source in self.compose["volumes"]
            volumes.add(source)
            assert node["image"] == self.base["services"]["redis"]["image"]
            assert "REDISCLI_AUTH" in " ".join(node["healthcheck"]["test"])
            assert re.fullmatch(r"\$\{STATE_REDIS_PASSWORD:\?.+\}",
                                node["environment"]["STATE_REDIS_PASSWORD"])  # fmt: skip
        assert len(volumes) == 6

    def test_compose_creates_the_cluster_once_from_every_node(self) -> None:
        create = self.compose["services"]["state-cluster-create"]
        command = " ".join(create["command"])
        nodes = self.nodes()
        assert created_nodes(command) == [f"{name}:6379" for name in nodes]
        assert "REDISCLI_AUTH" in command and "cluster_slots_assigned:0" in command
        assert create["depends_on"] == {n: {"condition": "service_healthy"} for n in nodes}
        assert create["restart"] == "no"

    def test_compose_web_and_worker_keep_state_on_the_cluster_and_the_queue_on_redis(
        self,
    ) -> None:
        services = self.compose["services"]
        web_env, worker_env = services["web"]["environment"], services["worker"]["environment"]
        assert web_env == worker_env and web_env["REDIS_CLUSTER"] == "true"
        for name in ("web", "worker"):
            assert services[name]["depends_on"] == {
                "state-cluster-create": {"condition": "service_completed_successfully"}
            }
        env = {**_filled(self.base["services"]["web"]["environment"]), **_filled(web_env)}
        settings = cluster_settings(env)
        state, queue = urlsplit(settings.redis_url), urlsplit(settings.queue_redis_url or "")
        # the state's seed is a name every node answers to: any live node will do
        for node in self.nodes().values():
            assert state.hostname in node["networks"]["default"]["aliases"]
        # arq's queue on compose.yaml's standalone Redis, with that Redis's password
        assert queue.hostname == "redis" and "redis" in self.base["services"]
        assert "--cluster-enabled" not in " ".join(self.base["services"]["redis"]["command"])
        assert "${REDIS_PASSWORD:?" in web_env["QUEUE_REDIS_URL"]
        assert "${STATE_REDIS_PASSWORD:?" in web_env["REDIS_URL"]

    def k8s(self, name: str) -> list[dict[str, Any]]:
        return [d for d in yaml.safe_load_all((self.overlay / name).read_text()) if d]

    def test_k8s_overlay_patches_web_and_worker_into_cluster_mode(self) -> None:
        kustomization = yaml.safe_load((self.overlay / "kustomization.yaml").read_text())
        assert kustomization["resources"][0] == "../base"
        for resource in kustomization["resources"][1:]:
            assert (self.overlay / resource).is_file(), resource
        deployments = k8s_deployments()
        assert {p["target"]["name"] for p in kustomization["patches"]} == set(deployments)
        for patch in kustomization["patches"]:
            [container] = deployments[patch["target"]["name"]]["spec"]["template"]["spec"][
                "containers"
            ]
            env = {e["name"]: e["value"] for e in container.get("env", [])}
            for op in yaml.safe_load((self.overlay / patch["path"]).read_text()):
                assert op["op"] == "add"
                assert op["path"] == "/spec/template/spec/containers/0/env/-"
                env[op["value"]["name"]] = op["value"]["value"]
            assert env["REDIS_CLUSTER"] == "true"
            cluster_settings({
                **env, "REDIS_URL": "redis://:0123abcd@state-redis:6379/0",
                "QUEUE_REDIS_URL": "redis://:0123abcd@queue-redis:6379/0",
                "SALLA_WEBHOOK_SECRET": SECRET, "APP_ENV": "development",
            })  # fmt: skip

    def test_k8s_statefulset_and_job_make_three_masters_with_a_replica_each(self) -> None:
        objects = [d for name in ("state-redis.yaml", "create-cluster-job.yaml")
                   for d in self.k8s(name)]  # fmt: skip
        [sts] = [d for d in objects if d["kind"] == "StatefulSet"]
        [service] = [d for d in objects if d["kind"] == "Service"]
        [job] = [d for d in objects if d["kind"] == "Job"]
        name, replicas = sts["metadata"]["name"], sts["spec"]["replicas"]
        assert replicas == 6 and sts["spec"]["serviceName"] == service["metadata"]["name"]
        assert service["spec"]["clusterIP"] == "None"  # headless: a DNS name per pod
        labels = sts["spec"]["template"]["metadata"]["labels"]
        assert sts["spec"]["selector"]["matchLabels"] == service["spec"]["selector"] == labels
        pod = sts["spec"]["template"]["spec"]
        [node] = pod["containers"]
        text = node_command(node["command"])
        assert f'--cluster-announce-hostname "$POD_NAME.{service["metadata"]["name"]}"' in text
        env = {e["name"]: e for e in node["env"]}
        assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
        secret = env["REDISCLI_AUTH"]["valueFrom"]["secretKeyRef"]
        [template] = sts["spec"]["volumeClaimTemplates"]
        assert {"name": template["metadata"]["name"], "mountPath": "/data"} in node["volumeMounts"]
        assert {p["name"]: p["containerPort"] for p in node["ports"]} == {"redis": 6379,
                                                                          "bus": 16379}  # fmt: skip
        assert pod["securityContext"]["runAsNonRoot"]
        # the Job joins exactly the StatefulSet's pods, by their stable names
        [create] = job["spec"]["template"]["spec"]["containers"]
        pods = [f"{name}-{i}.{service['metadata']['name']}:6379" for i in range(replicas)]
        assert created_nodes(" ".join(create["command"])) == pods
        assert create["image"] == node["image"]
        assert create["env"][0]["valueFrom"]["secretKeyRef"] == secret
        # the Secret both read is one the overlay tells how to create
        kustomization = (self.overlay / "kustomization.yaml").read_text()
        assert (
            f"kubectl create secret generic {secret['name']} --from-literal={secret['key']}="
            in (kustomization)
        )
