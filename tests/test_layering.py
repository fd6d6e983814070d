"""Layering: no module of ``nnunetv2_sss`` imports from a floor above its own.

Floors, bottom to top (a module may import from its own floor and the ones below):

0. ``files`` (atomic writes, locks, stale-file cleanup; imports nothing from the package)
1. ``unlabeled``, ``augment``, ``consistency``, ``evaluation``
2. ``sam``, ``datasets``
3. ``training``
4. ``cli`` (entry points)

Lazy imports inside functions count too. ``sam`` also never imports nnU-Net's trainer: the refresh gets a predict
callable from the training layer instead.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "nnunetv2_sss"
FLOORS = {"files": 0, "unlabeled": 1, "augment": 1, "consistency": 1, "evaluation": 1, "sam": 2, "datasets": 2,
          "training": 3, "cli": 4}


def _module_name(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)


def _imported_modules(path: Path) -> set[str]:
    """Every module an ``import``/``from ... import`` names anywhere in the file (lazy imports included)."""
    found: set[str] = set()
    package = _module_name(path).split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                found.add(".".join([*base, *([node.module] if node.module else [])]))
            elif node.module:
                found.add(node.module)
    return found


def _floor(module: str) -> int | None:
    parts = module.split(".")
    if parts[0] != "nnunetv2_sss" or len(parts) < 2:
        return None
    return FLOORS.get(parts[1])


def test_every_package_module_has_a_floor() -> None:
    modules = [_module_name(f) for f in PACKAGE.rglob("*.py") if f.name != "__init__.py" or f.parent != PACKAGE]
    unplaced = sorted(m for m in modules if _floor(m) is None and m.split(".")[1] != "ext_trainers")
    assert not unplaced, f"add these to FLOORS in {__file__}: {unplaced}"


def test_no_module_imports_from_a_floor_above_its_own() -> None:
    files = [f for f in sorted(PACKAGE.rglob("*.py")) if f.parent != PACKAGE or f.name != "__init__.py"]
    assert len(files) >= 30, f"expected the package's modules under {PACKAGE}"
    offenders = {}
    for f in files:
        own = _floor(_module_name(f))
        if own is None:
            continue
        upward = sorted(m for m in _imported_modules(f) if (_floor(m) or 0) > own)
        if upward:
            offenders[_module_name(f)] = upward
    assert not offenders, f"imports from a floor above (floors: {FLOORS}): {offenders}"


def test_sam_package_imports_nothing_from_training() -> None:
    files = sorted((PACKAGE / "sam").glob("*.py"))
    assert len(files) >= 5, f"expected the sam package's modules under {PACKAGE / 'sam'}"
    offenders = {f.name: sorted(m for m in _imported_modules(f) if m.startswith("nnunetv2.training.nnUNetTrainer"))
                 for f in files}
    offenders = {k: v for k, v in offenders.items() if v}
    assert not offenders, f"sam/ must not import nnU-Net's trainer (hand it a predict callable instead): {offenders}"
