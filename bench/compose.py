"""Drive Docker Compose projects (for the tests and the benchmark): a real engine, real images,
one project per use, each with its own name, volumes and .env."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
COMPOSE_FILE = REPO / "docker-compose.yml"
# docker-compose.yml names its images after the Compose project (${COMPOSE_PROJECT_NAME}-server,
# -client), so that two checkouts never run each other's code. The tests and the benchmark build
# once under a project named after this checkout, and every project they make gets those images
# under its own names (a tag: no copy, no build).
BUILD_PROJECT = "fpt-build-" + hashlib.sha1(str(REPO).encode()).hexdigest()[:8]


def images(project: str) -> dict[str, str]:
    """The images docker-compose.yml builds for a Compose project of that name."""
    return {"server": f"{project}-server", "client": f"{project}-client"}


BUILT = images(BUILD_PROJECT)  # what build_images() makes


def docker(
    *args: str, timeout: float = 600, check: bool = True, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        ["docker", *args], capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
    )
    if check and result.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result


def committed_env() -> str:
    """The .env of the checkout's last commit (a user's tuning of the working copy, as README
    suggests, changes nothing here); the file itself outside a git checkout."""
    shown = subprocess.run(["git", "-C", str(REPO), "show", "HEAD:.env"], capture_output=True, text=True, check=False)
    return shown.stdout if shown.returncode == 0 else (REPO / ".env").read_text()


def env_file_with(path: Path, **settings: object) -> Path:
    """The committed .env with some values changed, written to `path` (a folder)."""
    text = committed_env()
    for name, value in settings.items():
        text, count = re.subn(rf"^{name}=.*$", f"{name}={value}", text, flags=re.M)
        assert count == 1, f"{name} is not in .env"
    path.mkdir(parents=True, exist_ok=True)
    (path / ".env").write_text(text)
    return path


class Project:
    """One Compose project. With `directory`, its .env (and relative paths) come from there;
    the images must then already be built (see the session fixture)."""

    def __init__(
        self,
        directory: Path | None = None,
        files: tuple[Path, ...] = (COMPOSE_FILE,),
        env: dict[str, str] | None = None,
        prefix: str = "fpt",
    ) -> None:
        self.name = f"{prefix}-{uuid.uuid4().hex[:8]}"
        self.directory, self.files, self.env = directory, files, env or {}
        self.images = images(self.name)
        for kind, image in BUILT.items():  # `up --build` still builds (from the cache) when asked
            if docker("image", "inspect", image, check=False).returncode == 0:
                docker("tag", image, self.images[kind])

    def compose(self, *args: str, timeout: float = 600, check: bool = False) -> subprocess.CompletedProcess[str]:
        where = ["--project-directory", str(self.directory)] if self.directory else []
        files = [arg for f in self.files for arg in ("-f", str(f))]
        return docker("compose", *files, *where, "-p", self.name, *args, timeout=timeout, check=check, env=self.env)

    def up(self, *args: str, timeout: float = 600) -> tuple[subprocess.CompletedProcess[str], float]:
        started = time.monotonic()
        result = self.compose("up", *args, timeout=timeout)
        return result, time.monotonic() - started

    def containers(self) -> list[dict[str, Any]]:
        out = self.compose("ps", "-a", "--format", "json", check=True).stdout
        rows = [json.loads(line) for line in out.splitlines() if line.strip()]
        return sorted(rows, key=lambda r: r["Name"])

    def wait_exited(self, service: str, timeout: float = 900) -> list[int]:
        """Wait until every container of `service` has stopped; their exit codes. Unlike `docker
        compose wait`, which sees running containers only, this also works after they are done."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            rows = [c for c in self.containers() if c["Service"] == service]
            if rows and all(c["State"] in ("exited", "dead") for c in rows):
                return [int(c["ExitCode"]) for c in rows]
            time.sleep(1)
        raise AssertionError(f"{service} of {self.name} still running after {timeout} s")

    def exit_codes(self, service: str) -> list[int]:
        return [int(c["ExitCode"]) for c in self.containers() if c["Service"] == service]

    def logs(self, service: str) -> str:
        return self.compose("logs", "--no-color", "--no-log-prefix", service, check=True).stdout

    def copy_results(self, target: Path) -> Path:
        """The results volume's contents, copied out through the (stopped) server container."""
        self.compose("cp", "server:/results", str(target), check=True)
        return target

    def down(self) -> None:
        self.compose("down", "-v", "--remove-orphans", "--timeout", "5")
        docker("image", "rm", *self.images.values(), check=False)  # the tags only: BUILT keeps the layers


def image_size_mb(image: str) -> float:
    return int(docker("image", "inspect", "-f", "{{.Size}}", image).stdout) / 1e6


def build_images(timeout: float = 1800) -> float:
    """Both images through Compose from the repository (named BUILT); returns the seconds it took."""
    started = time.monotonic()
    result = docker("compose", "-f", str(COMPOSE_FILE), "-p", BUILD_PROJECT, "build", timeout=timeout, check=False)
    if result.returncode != 0:
        raise AssertionError(result.stdout[-4000:] + result.stderr[-4000:])
    return time.monotonic() - started


def container_pid(name: str) -> int:
    return int(docker("inspect", "-f", "{{.State.Pid}}", name).stdout.strip())
