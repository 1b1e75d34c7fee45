"""The file layouts the deploy files produce, rebuilt in a temporary folder from those files.

Nothing here describes a layout by hand: `image_layout` follows deploy/Dockerfile's final stage
(its COPY, ENV, WORKDIR and CMD lines), `compose_layout` adds compose.yaml's bind mounts, and
`k8s_layout` adds the ConfigMap volumes of a Deployment, filled as deploy/README.md's
`kubectl create configmap` lines fill them and laid out as the kubelet lays them out. A path
`/app/rules` of the container is `root/app/rules` here.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

ROOT_DIR = Path(__file__).parent.parent.parent
DEPLOY = ROOT_DIR / "deploy"


@dataclass
class ImageStage:
    """What the Dockerfile's final stage puts in the image and how it starts it."""

    copies: list[tuple[str, str]]  # (path in the build context, absolute path in the image)
    env: dict[str, str]
    workdir: str
    cmd: list[str]


@dataclass
class Layout:
    """A container's files under `root`, its working folder and its environment."""

    root: Path
    workdir: str
    env: dict[str, str] = field(default_factory=dict)

    def path(self, inside: str) -> Path:
        """Where a path of the container is on this machine."""
        return self.root / PurePosixPath(inside).relative_to("/")

    @property
    def cwd(self) -> Path:
        return self.path(self.workdir)

    def host_env(self) -> dict[str, str]:
        """The container's environment with its absolute paths moved under `root`."""
        return {
            name: str(self.path(value)) if value.startswith("/") and name != "PATH" else value
            for name, value in self.env.items()
        }

    def files(self) -> set[Path]:
        return {p.relative_to(self.root) for p in self.root.rglob("*")}


def dockerfile_final_stage(text: str) -> ImageStage:
    """COPY (not `--from` another stage), ENV, WORKDIR and CMD of the last FROM's stage."""
    lines = [line.strip() for line in re.sub(r"\\\n", " ", text).splitlines()]
    lines = [line for line in lines if line and not line.startswith("#")]
    last_from = max(i for i, line in enumerate(lines) if line.upper().startswith("FROM "))
    stage = ImageStage(copies=[], env={}, workdir="/", cmd=[])
    for line in lines[last_from + 1 :]:
        instruction, _, rest = line.partition(" ")
        instruction = instruction.upper()
        if instruction == "WORKDIR":
            stage.workdir = str(PurePosixPath(stage.workdir) / rest.strip())
        elif instruction == "COPY":
            args = shlex.split(rest)
            if any(a.startswith("--from") for a in args):
                continue
            *sources, dest = [a for a in args if not a.startswith("--")]
            target = str(PurePosixPath(stage.workdir) / dest) + ("/" if dest.endswith("/") else "")
            stage.copies += [(source, target) for source in sources]
        elif instruction == "ENV":
            for item in shlex.split(rest):
                name, _, value = item.partition("=")
                stage.env[name] = value
        elif instruction == "CMD":
            stage.cmd = json.loads(rest)
    return stage


def image_layout(root: Path) -> tuple[Layout, ImageStage]:
    """The image's own files (the COPY lines from the build context) under `root`."""
    stage = dockerfile_final_stage((DEPLOY / "Dockerfile").read_text())
    layout = Layout(root, stage.workdir, dict(stage.env))
    for source, dest in stage.copies:
        origin = ROOT_DIR / source
        target = layout.path(dest.rstrip("/"))
        if origin.is_dir():
            shutil.copytree(origin, target, dirs_exist_ok=True)
        else:
            target = target / origin.name if dest.endswith("/") else target
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(origin, target)
    layout.cwd.mkdir(parents=True, exist_ok=True)
    return layout, stage


def compose_layout(root: Path, service: str) -> Layout:
    """The image plus the service's bind mounts (sources relative to compose.yaml's folder)."""
    doc = _yaml(DEPLOY / "compose.yaml")
    spec = doc["services"][service]
    layout, _ = image_layout(root)
    for volume in spec.get("volumes", []):
        source, target, *_ = volume.split(":")
        if source.startswith((".", "/")):  # a bind mount, not a named volume
            shutil.copytree((DEPLOY / source).resolve(), layout.path(target), dirs_exist_ok=True)
    layout.env.update({k: str(v) for k, v in spec.get("environment", {}).items()})
    return layout


def configmap_sources() -> dict[str, Path]:
    """ConfigMap name -> the folder deploy/README.md's `kubectl create configmap` fills it from."""
    found: dict[str, Path] = {}
    for match in re.finditer(
        r"kubectl create configmap (\S+) --from-file=(\S+)", (DEPLOY / "README.md").read_text()
    ):
        found[match.group(1)] = ROOT_DIR / match.group(2)
    return found


def project_configmap(source: Path, mount: Path) -> None:
    """A ConfigMap volume as the kubelet writes it: the files in a hidden timestamped folder,
    `..data` linking to it, and one link per key (`--from-file=DIR` takes DIR's regular files
    only, not its sub-folders)."""
    data = mount / "..2026_11_26_10_00_00.000000001"
    data.mkdir(parents=True)
    for file in sorted(p for p in source.iterdir() if p.is_file()):
        shutil.copy2(file, data / file.name)
    (mount / "..data").symlink_to(data.name)
    for file in data.iterdir():
        (mount / file.name).symlink_to(Path("..data") / file.name)


def k8s_layout(root: Path, deployment: dict[str, Any]) -> Layout:
    """The image plus a Deployment's ConfigMap volumes and its container's environment."""
    layout, _ = image_layout(root)
    pod = deployment["spec"]["template"]["spec"]
    [container] = pod["containers"]
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    sources = configmap_sources()
    # Outer mounts first: /rules before /rules/merchants, as the kubelet nests them.
    for mount in sorted(container.get("volumeMounts", []), key=lambda m: len(m["mountPath"])):
        config_map = volumes[mount["name"]]["configMap"]["name"]
        project_configmap(sources[config_map], layout.path(mount["mountPath"]))
    layout.env.update({e["name"]: str(e["value"]) for e in container.get("env", [])})
    return layout


def k8s_manifests() -> list[Path]:
    """The files of deploy/k8s, as `kubectl apply -k deploy/k8s` reads them (its base) plus
    the Secret's example; the overlays' own files are not among them."""
    return sorted((DEPLOY / "k8s").glob("*.yaml")) + sorted(
        (DEPLOY / "k8s" / "base").glob("*.yaml")
    )


def k8s_deployments() -> dict[str, dict[str, Any]]:
    """The Deployments of deploy/k8s by name."""
    import yaml

    found = {}
    for path in k8s_manifests():
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc["kind"] == "Deployment":
                found[doc["metadata"]["name"]] = doc
    return found


def _yaml(path: Path) -> dict[str, Any]:
    import yaml

    doc: dict[str, Any] = yaml.safe_load(path.read_text())
    return doc
