"""One import namespace: every module of ours is ``kvgate.<part>``, so no top-level name of
ours collides with another distribution's. Hugging Face's ``kernels`` (which transformers
needs) and ``kvgate.kernels`` import side by side, from the repository root and from
anywhere else, from the source tree and from an installed wheel."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from importlib.util import find_spec
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# In one process: Hugging Face's ``kernels``, transformers' hub-kernels integration (what
# broke when our ``kernels/`` was importable by its bare name), ``kvgate.kernels``, and a
# saved model directory loaded through transformers.
SIDE_BY_SIDE = textwrap.dedent("""
    import sys, tempfile
    import kernels
    assert hasattr(kernels, "get_kernel"), kernels.__file__     # Hugging Face's package
    import transformers.integrations.hub_kernels
    import kvgate.kernels
    assert callable(kvgate.kernels.copy_pages)                  # ours
    assert kernels is not kvgate.kernels
    from transformers import AutoModelForCausalLM, LlamaConfig
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
    with tempfile.TemporaryDirectory() as d:
        AutoModelForCausalLM.from_config(cfg).save_pretrained(d)
        model = AutoModelForCausalLM.from_pretrained(d)
        assert model.config.num_hidden_layers == 1
    print("KERNELS", kernels.__file__)
    print("OURS", kvgate.kernels.__file__)
""")


def _hf_kernels_dir() -> Path:
    spec = find_spec("kernels")
    assert spec is not None and spec.origin is not None, "Hugging Face's kernels is missing"
    path = Path(spec.origin).parent
    assert path != ROOT / "kernels" and ROOT / "kvgate" not in path.parents, \
        f"bare 'kernels' resolves to ours: {path}"
    return path


def _run(code: str, cwd: Path, pythonpath: list[Path]) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = os.pathsep.join(map(str, pythonpath))
    env["HF_HUB_OFFLINE"] = "1"
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300, check=False)


@pytest.fixture(scope="module")
def hf_first(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder that puts Hugging Face's ``kernels`` ahead of site-packages (PYTHONPATH)."""
    ahead = tmp_path_factory.mktemp("hf-first")
    (ahead / "kernels").symlink_to(_hf_kernels_dir(), target_is_directory=True)
    return ahead


@pytest.mark.parametrize("where", ["repository root", "elsewhere"])
def test_hugging_face_kernels_and_ours_import_side_by_side(hf_first: Path, tmp_path: Path,
                                                           where: str) -> None:
    cwd = ROOT if where == "repository root" else tmp_path
    done = _run(SIDE_BY_SIDE, cwd, [hf_first])
    assert done.returncode == 0, done.stderr[-3000:]
    theirs = Path(done.stdout.split("KERNELS ", 1)[1].splitlines()[0])
    ours = Path(done.stdout.split("OURS ", 1)[1].splitlines()[0])
    assert theirs.parent.resolve() == _hf_kernels_dir().resolve()
    assert ours.parent == ROOT / "kvgate" / "kernels"


def test_no_top_level_package_of_ours_but_kvgate() -> None:
    """Only ``kvgate`` is installed as a top-level name; the repository root holds no other
    importable package of ours a bare import could pick up (``tests`` and ``bench`` are
    the suite's and the benchmarks' own, ``testkit`` the toolkit both share)."""
    top = sorted(p.name for p in ROOT.iterdir()
                 if p.is_dir() and (p / "__init__.py").is_file())
    assert top == ["bench", "kvgate", "testkit", "tests"]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """kvgate's wheel, built from a copy of the sources (setuptools leaves a build/ folder
    beside the sources it builds). The copy holds ``testkit`` too, which must stay out."""
    out = tmp_path_factory.mktemp("wheel")
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for package in ("kvgate", "testkit"):
        shutil.copytree(ROOT / package, src / package,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                           "--no-build-isolation", "-q", "-w", str(out), str(src)],
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    (built,) = out.glob("kvgate-*.whl")
    return built


def test_the_wheel_holds_one_package_with_its_migrations_and_assets(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/", 1)[0] for n in names if not n.split("/", 1)[0].endswith(".dist-info")}
    assert tops == {"kvgate"}
    for needed in ("kvgate/migrations/env.py", "kvgate/migrations/script.py.mako",
                   "kvgate/migrations/versions/0001_initial.py", "kvgate/gateway/py.typed",
                   "kvgate/gateway/http/console/static/console.js"):
        assert needed in names, needed


def test_an_installed_wheel_serves_its_parts_beside_hugging_face_kernels(
        wheel: Path, hf_first: Path, tmp_path: Path) -> None:
    """Installed from the wheel (not the source tree): the same side-by-side imports, and
    ``kvgate migrate`` finds the revisions inside the installed package."""
    site = tmp_path / "site"
    done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                           "--target", str(site), str(wheel)],
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    work = tmp_path / "elsewhere"
    work.mkdir()
    code = SIDE_BY_SIDE + textwrap.dedent(f"""
        import kvgate
        assert kvgate.__file__.startswith({str(site)!r}), kvgate.__file__
        from kvgate.gateway.cli import main
        assert main(["migrate", "--db", "sqlite:///{work / 'ledger.db'}"]) == 0
    """)
    done = _run(code, work, [hf_first, site])
    assert done.returncode == 0, done.stderr[-3000:]
    assert (work / "ledger.db").stat().st_size > 0
