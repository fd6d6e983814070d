"""Layering: ``nnunetv2_sss.sam`` depends on nothing above it (no trainer, no training code)."""

from __future__ import annotations

import ast
from pathlib import Path

SAM_PACKAGE = Path(__file__).resolve().parents[1] / "nnunetv2_sss" / "sam"


def _imported_modules(path: Path) -> set[str]:
    """Every module an ``import``/``from ... import`` names anywhere in the file (lazy imports included)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.level:  # relative import inside nnunetv2_sss.sam
                base = "nnunetv2_sss.sam".split(".")[: 2 - (node.level - 1)]
                found.add(".".join([*base, node.module]))
            else:
                found.add(node.module)
    return found


def test_sam_package_imports_nothing_from_training() -> None:
    files = sorted(SAM_PACKAGE.glob("*.py"))
    assert len(files) >= 5, f"expected the sam package's modules under {SAM_PACKAGE}"
    offenders = {
        f.name: sorted(m for m in _imported_modules(f)
                       if m.startswith(("nnunetv2_sss.training", "nnunetv2.training.nnUNetTrainer")))
        for f in files
    }
    offenders = {k: v for k, v in offenders.items() if v}
    assert not offenders, f"sam/ must not import the training layer (hand it a predict callable instead): {offenders}"
