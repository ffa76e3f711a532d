"""The layering contract: every fastrank module imports only from its own layer or the layers below it, and
the kernels import nothing of fastrank but the leaf ``fastrank.common``. Checked on the source, lazy imports
inside functions included, so an upward import fails here rather than waiting to become a cycle."""

from __future__ import annotations

import ast
import pathlib

REPO = pathlib.Path(__file__).resolve().parents[1]

# Lowest first. A module may import modules of its own layer and of the layers before it.
LAYERS = (
    ("fastrank.common",),  # the leaf: op configs, status codes, launch helpers
    ("fastrank.utils",),  # backend selection, value-check switches, argument helpers
    ("fastrank.workers",),  # worker processes, one per device (the device pools' transport)
    ("fastrank.kernels",),  # Triton kernels and their launch code
    ("fastrank.ops", "fastrank.functional"),  # one room per op, and their re-export
    ("fastrank.heads",),  # scoring conventions
    ("fastrank.data",),  # templates, batching, datasets, collators
    ("fastrank.presets",),  # conventions + templates under one name
    ("fastrank.engine",),  # packed, shared-prefix execution of HF backbones
    ("fastrank.models",),  # wrappers around HF backbones
    ("fastrank.evaluation",),
    ("fastrank.inference",),  # Reranker, Embedder and their device pools
    ("fastrank.integrations",),  # HF Trainer, sentence-transformers
    ("fastrank.training",),  # what the train commands do
    ("fastrank",),  # the public API (fastrank/__init__.py)
    ("fastrank.serve",),  # the HTTP server over Reranker and Embedder
    ("fastrank.benchmarks",),
    ("fastrank.cli",),
)


def _module_files():
    """(module name, path) of every source file: fastrank/ as fastrank.*, kernels/ as fastrank.kernels.*."""
    for root, package in ((REPO / "fastrank", "fastrank"), (REPO / "kernels", "fastrank.kernels")):
        for path in sorted(root.rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            yield ".".join([package, *parts]), path


MODULES = dict(_module_files())


def _layer(module: str) -> int:
    """The index of the most specific layer prefix that covers ``module``."""
    best, length = None, -1
    for i, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > length:
                best, length = i, len(prefix)
    assert best is not None, f"{module} is in no layer of tests/test_layers.py: add it"
    return best


def _imports(module: str, path: pathlib.Path):
    """The fastrank modules ``path`` imports, anywhere in the file."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # `from fastrank import common` imports the module fastrank.common
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        for name in names:
            if name == "fastrank" or name.startswith("fastrank."):
                yield node.lineno, name


def test_every_module_is_in_a_layer():
    for module in MODULES:
        _layer(module)


def test_no_import_runs_up_the_layers():
    upward = []
    for module, path in MODULES.items():
        own = _layer(module)
        for line, target in _imports(module, path):
            if _layer(target) > own:
                upward.append(
                    f"{path.relative_to(REPO)}:{line}: {module} ({LAYERS[own][0]}) imports {target} "
                    f"({LAYERS[_layer(target)][0]})"
                )
    assert not upward, "imports up the layers:\n" + "\n".join(upward)


def test_kernels_import_only_the_leaf():
    """The kernels never depend on the reference implementations they are tested against."""
    wrong = [
        f"{path.relative_to(REPO)}:{line}: {target}"
        for module, path in MODULES.items()
        if module.startswith("fastrank.kernels")
        for line, target in _imports(module, path)
        if not (target == "fastrank.common" or target.startswith("fastrank.kernels"))
    ]
    assert not wrong, "kernels import more than fastrank.common:\n" + "\n".join(wrong)


def test_the_contract_can_fail(tmp_path):
    """The checker sees an upward import, a lazy one included (a test that cannot fail proves nothing)."""
    path = tmp_path / "lazy.py"
    path.write_text("def f():\n    from fastrank.inference import Reranker\n")
    assert [t for _, t in _imports("fastrank.data.lazy", path)] == ["fastrank.inference"]
    assert _layer("fastrank.inference") > _layer("fastrank.data.lazy")
