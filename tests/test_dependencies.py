"""One list of dependencies: pyproject.toml declares every package the code imports, the lock comes from it,
and each DVC stage lists the project code it imports."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

import yaml
from packaging.requirements import Requirement

from tests.conftest import ROOT

OWN_PACKAGES = {"tasks", "flows", "review", "bench", "tests"}


# The peer of bench.side_by_side runs on torch in an environment of its own (make peer-setup), never
# beside TensorFlow in the project's: its extra is declared, and kept out of the lock.
OWN_ENVIRONMENT_EXTRAS = {"peer"}


def declared(*, locked_only: bool = False) -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = [
        item
        for name, items in project.get("optional-dependencies", {}).items()
        if not (locked_only and name in OWN_ENVIRONMENT_EXTRAS)
        for item in items
    ]
    return [Requirement(item) for item in project["dependencies"] + extras]


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def imported_modules() -> set[str]:
    """Top-level names of every module the project's code imports, outside the standard library."""
    names = set()
    for folder in OWN_PACKAGES:
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    names |= {alias.name.split(".")[0] for alias in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - OWN_PACKAGES - {"__future__"}


def test_every_imported_package_is_declared_in_pyproject():
    owners = packages_distributions()
    names = {canonical(requirement.name) for requirement in declared()}
    undeclared = {
        module: owners.get(module)
        for module in imported_modules()
        if not any(canonical(owner) in names for owner in owners.get(module, [module]))
    }
    assert undeclared == {}, "imported but not declared in pyproject.toml (module: distributions)"


def test_the_lock_is_compiled_from_pyproject_and_pins_each_declared_package():
    lock = (ROOT / "requirements.lock").read_text()
    assert "--extra dev pyproject.toml -o requirements.lock" in lock.splitlines()[1]
    assert not (ROOT / "requirements.in").exists()
    pinned = {canonical(name): version for name, version in re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", lock, re.M)}
    for requirement in declared(locked_only=True):
        version = pinned.get(canonical(requirement.name))
        assert version is not None, f"{requirement.name} is declared but not in requirements.lock"
        assert requirement.specifier.contains(version), f"{requirement.name}=={version} does not satisfy {requirement}"


def project_imports(module: str) -> set[str]:
    """The project's `tasks` modules that `module` imports anywhere: at the top or inside a function."""
    tree = ast.parse((ROOT / Path(*module.split("."))).with_suffix(".py").read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] == "tasks"}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "tasks":
            # `from tasks.lib import io` names a module; `from tasks.lib.io import read_json` names its contents.
            is_package = (ROOT / Path(*node.module.split("."))).is_dir()
            found |= {f"{node.module}.{alias.name}" for alias in node.names} if is_package else {node.module}
    return found


def code_deps(stage: dict) -> set[str]:
    """The project source files a dvc.yaml stage lists among its deps."""
    return {dep for dep in stage["deps"] if dep.startswith("tasks/") and dep.endswith(".py")}


def test_each_stage_lists_the_project_code_it_imports_in_dvc_yaml():
    # A module missing from a stage's deps would let `dvc repro` keep outputs made by old code. Imports
    # inside functions count too (the backend's, loaded late), whether or not the stage calls that function.
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    missing, extra = {}, {}
    for name, stage in stages.items():
        module = re.fullmatch(r"python -m (tasks\.\w+)", stage["cmd"]).group(1)
        imported, pending = set(), [module]
        while pending:
            current = pending.pop()
            if current not in imported:
                imported.add(current)
                pending.extend(project_imports(current))
        files = {f"{item.replace('.', '/')}.py" for item in imported}
        missing[name], extra[name] = sorted(files - code_deps(stage)), sorted(code_deps(stage) - files)
    assert missing == {name: [] for name in stages}
    # A module listed but never imported reruns the stage for nothing.
    assert extra == {name: [] for name in stages}


def test_the_resume_fingerprint_hashes_exactly_the_train_stage_s_code_deps():
    # So a killed run starts over after a change to any of them (test_faults shows the start-over).
    from tasks.train import training_code_files

    train_stage = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["train"]
    assert {str(path.relative_to(ROOT)) for path in training_code_files()} == code_deps(train_stage)


def test_the_shared_library_never_imports_a_stage():
    for path in sorted((ROOT / "tasks" / "lib").glob("*.py")):
        module = f"tasks.lib.{path.stem}"
        stages = {found for found in project_imports(module) if not found.startswith("tasks.lib")}
        assert not stages, f"{module} imports {sorted(stages)}: tasks.lib is what the stages share, never a stage"


def test_dvc_reads_its_yaml_with_libyaml():
    # Without ruamel.yaml.clib, every dvc process parses dvc.yaml, dvc.lock and params in pure Python.
    from ruamel.yaml import YAML
    from ruamel.yaml.main import CParser

    assert CParser is not None and YAML(typ="safe").Parser is CParser
