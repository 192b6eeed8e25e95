"""`make lint`'s layer check: import-linter's contracts (pyproject.toml) on the package as installed.

The wheel maps three source folders into one package (shared/ -> mdmt, server/ -> mdmt.server, client/ ->
mdmt.client). import-linter walks a package's folder, and under an editable install that folder is shared/
alone, so this script first assembles the installed layout from pyproject's package-dir mapping: a copy of
the .py files under build/lint/ (fresh every run, so a new module never needs a reinstall). Then it runs the
contracts and two checks import-linter lacks: no import cycle between modules, and no import of another
module's private (underscore) names.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "build" / "lint"


def package_dirs() -> dict[str, Path]:
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    return {name: ROOT / folder for name, folder in cfg.items()}


def assemble() -> Path:
    """build/lint/mdmt/...: every .py file where the wheel puts it."""
    shutil.rmtree(OUT, ignore_errors=True)
    for name, folder in sorted(package_dirs().items()):
        target = OUT.joinpath(*name.split("."))
        for src in folder.rglob("*.py"):
            if "__pycache__" in src.parts:
                continue
            dst = target / src.relative_to(folder)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
    return OUT


def modules(root: Path) -> dict[str, Path]:
    out = {}
    for path in root.rglob("*.py"):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def imported(mod: str, path: Path, known: dict[str, Path]) -> list[tuple[str, str, int]]:
    """(module, name, line) of every project import in ``path``; name is '' for a plain module import."""
    tree = ast.parse(path.read_text())
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            if base.split(".")[0] != "mdmt":
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.append((sub, "", node.lineno) if sub in known else (base, alias.name, node.lineno))
        elif isinstance(node, ast.Import):
            found += [(a.name, "", node.lineno) for a in node.names if a.name.split(".")[0] == "mdmt"]
    return found


def private_imports(known: dict[str, Path]) -> list[str]:
    bad = []
    for mod, path in sorted(known.items()):
        for target, name, line in imported(mod, path, known):
            leaf = name or target.rpartition(".")[2]
            if leaf.startswith("_") and not leaf.startswith("__"):
                bad.append(f"{path.relative_to(OUT)}:{line}: imports the private name '{leaf}' of {target}")
    return bad


def undeclared_local_imports(known: dict[str, Path]) -> list[str]:
    """Imports inside functions that do not say which heavy or optional dependency they defer: the comment
    ``# deferred: <what>`` on the import's line or the line above it."""
    bad = []
    for _, path in sorted(known.items()):
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for inner in ast.walk(node):
                if isinstance(inner, (ast.Import, ast.ImportFrom)):
                    # the comment sits on the import's line or above it, over a block of imports
                    first = inner.lineno - 1
                    while first > 0 and lines[first - 1].lstrip().startswith(("import ", "from ")):
                        first -= 1
                    near = " ".join(lines[max(first - 1, 0) : inner.end_lineno])
                    if "deferred:" not in near:
                        bad.append(
                            f"{path.relative_to(OUT)}:{inner.lineno}: an import inside a function needs a "
                            "'# deferred: <dependency>' comment, or belongs at the top of the module"
                        )
    return sorted(set(bad))


def cycles(known: dict[str, Path]) -> list[str]:
    graph = {m: sorted({t for t, _, _ in imported(m, p, known) if t in known and t != m}) for m, p in known.items()}
    # A package's __init__ importing its own submodules is not a cycle of the design: leave those edges out.
    graph = {m: [t for t in ts if not t.startswith(m + ".")] for m, ts in graph.items()}
    seen, stack, found = {}, [], []

    def visit(m: str) -> None:
        seen[m] = 1
        stack.append(m)
        for t in graph[m]:
            if seen.get(t) == 1:
                found.append(" -> ".join(stack[stack.index(t) :] + [t]))
            elif t not in seen:
                visit(t)
        stack.pop()
        seen[m] = 2

    for m in sorted(graph):
        if m not in seen:
            visit(m)
    return found


def main() -> int:
    root = assemble()
    known = modules(root)
    problems = [f"import cycle: {c}" for c in cycles(known)] + private_imports(known)
    problems += undeclared_local_imports(known)
    for line in problems:
        print(line)
    env = dict(os.environ, PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    lint = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or "lint-imports"
    rc = subprocess.run([lint, str(ROOT / "pyproject.toml"), "--no-cache"], cwd=root, env=env).returncode
    return 1 if problems or rc else 0


if __name__ == "__main__":
    sys.exit(main())
