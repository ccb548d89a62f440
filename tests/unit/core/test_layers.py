"""Which part of ghsae may import which (ARCHITECTURE.md, "Layers"), checked on every module's imports.

    top        ghsae.pipeline, ghsae.executors, ghsae.compare, ghsae.sweep, ghsae.cli, ghsae.__main__,
               ghsae (the public API)
    stages     ghsae.harvest, ghsae.train, ghsae.analysis   (each: ground, store, run, itself, and
                                                             another stage only through its package)
    run        ghsae.run                                      (ground, store)
    store      ghsae.cache                                    (ground)
    ground     errors, config, layout, atomic, records, jsonrecord, device, lm, hooks, layers, locks,
               faults, space, hub, sae                        (ground only)

An import inside a function counts like any other; `if TYPE_CHECKING:` blocks are left out (they
are not run). A violation names the module, the line and the rule it breaks.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
PACKAGES = {
    "ghsae": "ghsae",
    "harvest": "ghsae.harvest",
    "cache": "ghsae.cache",
    "train": "ghsae.train",
    "analysis": "ghsae.analysis",
}
GROUND = {
    "ghsae.errors",
    "ghsae.config",
    "ghsae.layout",
    "ghsae.atomic",
    "ghsae.records",
    "ghsae.jsonrecord",
    "ghsae.device",
    "ghsae.lm",
    "ghsae.hooks",
    "ghsae.layers",
    "ghsae.locks",
    "ghsae.faults",
    "ghsae.space",
    "ghsae.hub",
    "ghsae.sae",
}
STAGES = ("ghsae.harvest", "ghsae.train", "ghsae.analysis")
TOP = {"ghsae", "ghsae.pipeline", "ghsae.executors", "ghsae.compare", "ghsae.sweep", "ghsae.cli", "ghsae.__main__"}


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    base = PACKAGES[parts[0]]
    rest = [p for p in parts[1:] if p != "__init__"]
    return ".".join([base, *rest])


def part_of(module: str) -> str:
    """ground | store | run | a stage's package | top."""
    if module in TOP:
        return "top"
    if module == "ghsae.run":
        return "run"
    if module == "ghsae.cache" or module.startswith("ghsae.cache."):
        return "store"
    for stage in STAGES:
        if module == stage or module.startswith(stage + "."):
            return stage
    if any(module == g or module.startswith(g + ".") for g in GROUND):
        return "ground"
    raise AssertionError(f"{module} belongs to no layer: add it to tests/unit/core/test_layers.py and ARCHITECTURE.md")


ALLOWED = {
    "ground": {"ground"},
    "store": {"ground", "store"},
    "run": {"ground", "store", "run"},
}


def ghsae_imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every ghsae import in the file, outside `if TYPE_CHECKING:`."""
    tree = ast.parse(path.read_text(), str(path))
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped |= {id(n) for n in ast.walk(node)}
    out = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "ghsae":  # from ghsae import faults
                out += [(node.lineno, f"ghsae.{a.name}") for a in node.names]
            elif node.module.startswith("ghsae."):
                out.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.startswith("ghsae.")]
    return out


def violations(path: Path) -> list[str]:
    me = module_name(path)
    mine = part_of(me)
    found = []
    for line, target in ghsae_imports(path):
        theirs = part_of(target)
        where = f"{path.relative_to(ROOT)}:{line} imports {target}"
        if mine == "top":
            continue
        if theirs == "top":
            found.append(f"{where}: only the top layer (pipeline, executors, cli) may import it")
        elif mine in ALLOWED:
            if theirs not in ALLOWED[mine]:
                found.append(f"{where}: {mine} may import only {', '.join(sorted(ALLOWED[mine]))}")
        elif theirs in STAGES and theirs != mine and target != theirs:
            found.append(f"{where}: another stage's internals; import what {theirs} exports instead")
    return found


SOURCES = sorted(p for folder in PACKAGES for p in (ROOT / folder).rglob("*.py"))


def test_every_module_belongs_to_a_layer():
    assert SOURCES, "no sources found"
    for path in SOURCES:
        part_of(module_name(path))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_a_module_imports_only_what_its_layer_may(path):
    assert not violations(path), "\n".join(violations(path))


def test_the_rule_catches_a_stage_importing_another_stages_internals(tmp_path, monkeypatch):
    """The check itself can fail: an analysis module reaching into train/fit.py, or up into the
    pipeline, is named; one importing train's package API is not."""
    fake_source = (
        "from ghsae.train.fit import fit_group\nfrom ghsae.train import load_sae\nfrom ghsae.pipeline import fit\n"
    )
    path = tmp_path / "analysis" / "_layer_probe.py"
    path.parent.mkdir()
    path.write_text(fake_source)
    monkeypatch.setattr("test_layers.ROOT", tmp_path)
    found = violations(path)
    assert len(found) == 2, found
    assert "another stage's internals" in found[0] and "ghsae.train.fit" in found[0]
    assert "only the top layer" in found[1]
