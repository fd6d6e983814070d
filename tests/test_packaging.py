"""The trainer shims ship inside a non-editable wheel, and nnU-Net finds the trainers through them.

Builds the wheel of this checkout (no dependencies, no build isolation: setuptools is already here), installs it
into a private folder that is put first on PYTHONPATH, and asks a fresh interpreter what ``nnUNetv2_sss_env``
would export and whether nnU-Net's own trainer lookup resolves the classes from there.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]

PROBE = """
import json, os
from nnunetv2_sss.cli import ensure_ext_trainer_env, ext_trainer_folder
os.environ.pop("nnUNet_extTrainer", None)
ensure_ext_trainer_env()
from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
found = {}
for name in ("nnUNetTrainerSSS_noSAM", "nnUNetTrainerSSS", "nnUNetTrainerSemiSAM"):
    cls = recursive_find_trainer_class_by_name(name)
    found[name] = [cls.__name__, __import__("inspect").getfile(cls)]
import nnunetv2_sss
print("PROBE " + json.dumps({"folder": str(ext_trainer_folder()), "package": nnunetv2_sss.__file__, "found": found,
                            "sam2_imported": __import__("sys").modules.get("sam2") is not None}))
"""


def test_wheel_ships_shims_and_nnunet_finds_trainers(tmp_path: Path) -> None:
    src = tmp_path / "src"  # a copy, so setuptools' build/ and egg-info never land in the checkout
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".venv", ".git", "build", "*.egg-info", "__pycache__",
                                                            ".pytest_cache", ".ruff_cache", "*_output"))
    wheels = tmp_path / "wheels"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation",
                            "-w", str(wheels), "-q"], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-3000:]
    wheel = next(wheels.glob("nnunetv2_sss-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for shim in ("__init__.py", "nnUNetTrainerSSS.py", "nnUNetTrainerSSS_noSAM.py", "nnUNetTrainer_budget.py"):
        assert f"nnunetv2_sss/ext_trainers/{shim}" in names
    assert not any(n.startswith("trainers/") for n in names), "the shim folder must not become a top-level package"

    site = tmp_path / "site"
    inst = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(site), str(wheel),
                           "-q"], capture_output=True, text=True)
    assert inst.returncode == 0, inst.stderr[-3000:]
    env = {**os.environ, "PYTHONPATH": str(site)}
    proc = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(next(x for x in proc.stdout.splitlines() if x.startswith("PROBE "))[6:])
    assert Path(out["package"]).resolve().is_relative_to(site.resolve()), out  # the wheel's copy, not the checkout
    assert Path(out["folder"]) == (site / "nnunetv2_sss" / "ext_trainers").resolve()
    for name, (found, source) in out["found"].items():
        assert found == name and Path(source).resolve().is_relative_to(site.resolve()), out["found"]
    assert out["sam2_imported"] is False  # finding (and importing) the SAM-2 trainers does not import sam2


def test_checkout_env_points_at_trainers_folder() -> None:
    proc = subprocess.run([str(Path(sys.executable).parent / "nnUNetv2_sss_env")], capture_output=True, text=True,
                          env={k: v for k, v in os.environ.items() if k != "nnUNet_extTrainer"})
    assert proc.returncode == 0, proc.stderr
    line = proc.stdout.strip().splitlines()[-1]
    assert line.startswith("export nnUNet_extTrainer=")
    assert str(ROOT / "trainers") in line
