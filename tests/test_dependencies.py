"""Dependencies flow one way (docs/architecture.md): no import cycle between the package's modules, lazy
imports inside functions included, and the layers import only the layers below them."""
from __future__ import annotations

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# source folder -> import path (pyproject.toml maps the three top-level folders into the namespace)
FOLDERS = {'nnunet_ext': 'nnunet_ext', 'trainers': 'nnunet_ext.trainers', 'architectures': 'nnunet_ext.architectures',
           'plans': 'nnunet_ext.plans'}


def package_modules() -> dict:
    """``{module name: file}`` for every module of the package."""
    modules = {}
    for folder, prefix in FOLDERS.items():
        for dirpath, _, files in os.walk(os.path.join(ROOT, folder)):
            for file in files:
                if not file.endswith('.py'):
                    continue
                parts = os.path.relpath(os.path.join(dirpath, file), os.path.join(ROOT, folder))[:-3].split(os.sep)
                if parts[-1] == '__init__':
                    parts = parts[:-1]
                modules['.'.join([prefix, *parts])] = os.path.join(dirpath, file)
    return modules


def imports_of(file: str, module: str, known: set) -> set:
    """Modules of the package that ``file`` imports anywhere (top level or inside functions), or names in a
    string (``importlib.import_module('nnunet_ext.plans')``, a dotted class path in plans)."""
    tree = ast.parse(open(file, encoding='utf-8').read())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ''
            if node.level:  # relative import
                package = module.split('.')[:len(module.split('.')) - node.level + (file.endswith('__init__.py'))]
                base = '.'.join(package + ([base] if base else []))
            names = [f'{base}.{alias.name}' for alias in node.names] + [base]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith('nnunet_ext.'):
            # a package named in a string is scanned (importlib over its modules): a dependency on each module
            names = [node.value] + [m for m in known if m.startswith(node.value + '.')]
        else:
            continue
        for name in names:
            while name and name not in known:
                name = name.rpartition('.')[0]
            if name and name != module:
                found.add(name)
    return found


def import_graph() -> dict:
    modules = package_modules()
    known = set(modules)
    graph = {m: imports_of(f, m, known) for m, f in modules.items()}
    # importing a module runs its package's __init__ first, but that is not a dependency of the module's code:
    # a package's __init__ importing its own submodules is not a cycle
    for m in graph:
        graph[m] = {d for d in graph[m] if not m.startswith(d + '.')}
    return graph


def cycles(graph: dict) -> list:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _in(module: str, packages) -> bool:
    return any(module == p or module.startswith(p + '.') for p in packages)


def test_the_cycle_finder_finds_a_lazy_cycle():
    assert cycles({'a': {'b'}, 'b': {'c'}, 'c': {'a'}, 'd': {'a'}}) == [['a', 'b', 'c']]
    assert cycles({'a': {'b'}, 'b': set()}) == []


def test_no_import_cycle_between_the_packages_modules():
    assert cycles(import_graph()) == []


def test_training_machinery_does_not_reach_up_to_planners_registry_or_trainers():
    graph = import_graph()
    upper = ('nnunet_ext.plans', 'nnunet_ext.trainers', 'nnunet_ext.registry', 'nnunet_ext.memory_check',
             'nnunet_ext.trainer_base', 'nnunet_ext.cli')
    for module, imported in graph.items():
        if _in(module, ('nnunet_ext.training', 'nnunet_ext.losses', 'nnunet_ext.nn', 'nnunet_ext.architectures')):
            assert not {d for d in imported if _in(d, upper)}, module


def test_losses_and_blocks_do_not_import_nnunet():
    for module, file in package_modules().items():
        if _in(module, ('nnunet_ext.losses', 'nnunet_ext.nn')):
            tree = ast.parse(open(file, encoding='utf-8').read())
            names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
            names += [n.module or '' for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
            assert not [n for n in names if n.startswith('nnunetv2')], module


def test_the_deploy_predictor_imports_neither_torch_nor_nnunet():
    """``nnunet_ext.deploy`` runs where only numpy, scipy, SimpleITK and onnxruntime are installed: its modules
    import no training library, and of this package only ``nnunet_ext.deploy``, ``nnunet_ext.errors`` and
    ``nnunet_ext.signals`` (themselves torch-free; the run with these imports blocked is in test_deploy_steps.py
    and the stock-CLI tests)."""
    forbidden = ('torch', 'nnunetv2', 'skimage', 'nibabel', 'batchgenerators', 'dynamic_network_architectures')
    for module, file in package_modules().items():
        if _in(module, ('nnunet_ext.deploy',)) or module in ('nnunet_ext.errors', 'nnunet_ext.signals', 'nnunet_ext'):
            tree = ast.parse(open(file, encoding='utf-8').read())
            names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
            names += [n.module or '' for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and not n.level]
            assert not [n for n in names if _in(n, forbidden)], module
            ours = [n for n in names if _in(n, ('nnunet_ext',))]
            allowed = ('nnunet_ext.deploy', 'nnunet_ext.errors', 'nnunet_ext.signals')
            assert all(_in(n, allowed) or n == 'nnunet_ext' for n in ours), (
                module, ours)
