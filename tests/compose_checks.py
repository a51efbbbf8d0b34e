"""What only the Compose tests ask of a Docker engine: is one there, and did a project leave
anything behind."""

from __future__ import annotations

import shutil

from bench.compose import Project, docker


def docker_available() -> bool:
    return (
        shutil.which("docker") is not None
        and docker("compose", "version", check=False).returncode == 0
        and (docker("info", check=False).returncode == 0)
    )


def leftovers(project: Project) -> dict[str, list[str]]:
    """The project's containers, networks, volumes and image names that still exist."""
    label = f"label=com.docker.compose.project={project.name}"
    found = {
        kind: docker(kind, "ls", "-q", "--filter", label, *(["-a"] if kind == "container" else [])).stdout.split()
        for kind in ("container", "network", "volume")
    }
    found["image"] = [i for i in project.images.values() if docker("image", "inspect", i, check=False).returncode == 0]
    return found
