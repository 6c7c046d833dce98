"""docs/design/ARCHITECTURE.md's import rules, checked by walking the AST imports of every module in sacglam/ and
envs/.

Rules (ids used in the failure messages):
    R1  sacglam never imports envs.
    R2  envs imports nothing from sacglam but sacglam.types.
    R3  buffer, her, losses, types, prompting import neither sacglam.agent nor transformers/peft/accelerate, directly
        or through other project modules (the chain is reported).
    R4  collector imports neither sacglam.agent, sacglam.algos.sac.learner nor sacglam.replay.buffer, directly or
    through project modules.
    R5  only models, agent, scoring, sac, distributed and the baselines ppo/eto import transformers/peft/accelerate
        (directly); sac and distributed take accelerate only, scoring transformers only.
    R6  no import cycles among project modules (an import of a module's own package or of a package above it does
        not count: the package is already loading); each cycle is reported once, as its shortest loop through its
        first module by name.
    R7  config modules are light: sacglam.config and every sacglam.**.config module (and the packages above them,
        whose __init__ runs when they are imported) import none of torch/numpy/transformers/peft/accelerate, directly
        or through other project modules, so composing a config never loads a model library.
    R8  sacglam never reads Hydra's global state (no import of hydra.core.hydra_config): train.py reads it once and
        passes on what the library needs (the run folder, the command line's overrides).

Imports are counted wherever they appear: inside functions, under ``if TYPE_CHECKING:`` (a type-only import still
couples the modules the design keeps apart), and ``importlib.import_module("...")`` / ``__import__("...")`` with a
literal name. Importing ``a.b`` also loads the package ``a`` (its ``__init__``), which the transitive rules follow.
``test_config_imports_no_heavy_library`` checks R7's promise itself, by importing ``sacglam.config`` in a fresh
interpreter.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from collections import deque
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("sacglam", "envs")
HF = frozenset({"transformers", "peft", "accelerate"})
# R5: which sacglam modules (by file stem) may import which Hugging Face libraries.
HF_ALLOWED: dict[str, frozenset[str]] = {
    "sacglam.models": HF,
    "sacglam.agent": HF,
    "sacglam.algos.ppo.learner": HF,
    "sacglam.algos.eto.dpo": HF,
    "sacglam.algos.sac.learner": frozenset({"accelerate"}),
    "sacglam.distributed": frozenset({"accelerate"}),  # accelerate's process state (data-parallel runs)
    "sacglam.scoring": frozenset({"transformers"}),
}
# R7: what a config module must not load (directly or through project modules).
HEAVY = frozenset({"torch", "numpy", "transformers", "peft", "accelerate"})
R3_MODULES = frozenset({"sacglam.replay.buffer", "sacglam.replay.her", "sacglam.losses", "sacglam.types",
                        "sacglam.prompting"})


@dataclass(frozen=True)
class Import:
    """One imported module name, as written at ``line`` of its file (absolute, relative imports resolved)."""

    target: str
    line: int


@dataclass(frozen=True)
class Module:
    name: str  # dotted, e.g. "sacglam.replay.buffer"; a package's __init__ is the package name
    path: Path
    rel: str  # path relative to the root, for messages
    imports: tuple[Import, ...]

    @property
    def stem(self) -> str:
        return self.name.rsplit(".", 1)[-1]

    @property
    def package(self) -> str:
        return self.name.split(".", 1)[0]


@dataclass(frozen=True)
class Breach:
    rel: str
    line: int
    rule: str
    text: str

    def __str__(self) -> str:
        return f"{self.rel}:{self.line}: [{self.rule}] {self.text}"


def _module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path, name: str, known: set[str]) -> tuple[Import, ...]:
    tree = ast.parse(path.read_text(), filename=str(path))
    is_pkg = path.name == "__init__.py"
    found: list[Import] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [Import(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                pkg = name if is_pkg else name.rpartition(".")[0]
                for _ in range(node.level - 1):
                    pkg = pkg.rpartition(".")[0]
                base = f"{pkg}.{node.module}" if node.module else pkg
            else:
                base = node.module or ""
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                # `from pkg import mod` imports the submodule; `from mod import Name` imports from mod.
                found.append(Import(sub if sub in known else base, node.lineno))
        elif (
            isinstance(node, ast.Call)
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
            and (
                (isinstance(node.func, ast.Name) and node.func.id in ("__import__", "import_module"))
                or (isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
            )
        ):
            found.append(Import(node.args[0].value, node.lineno))
    return tuple(sorted(set(found), key=lambda i: (i.line, i.target)))


def collect_modules(root: Path) -> dict[str, Module]:
    """Every module under ``root/sacglam`` and ``root/envs``, by dotted name."""
    paths = sorted(p for pkg in PACKAGES if (root / pkg).is_dir() for p in (root / pkg).rglob("*.py"))
    known = {_module_name(root, p) for p in paths}
    modules = {}
    for p in paths:
        name = _module_name(root, p)
        modules[name] = Module(name, p, p.relative_to(root).as_posix(), _imports(p, name, known))
    return modules


def _loaded(target: str, modules: dict[str, Module]) -> list[str]:
    """Project modules that importing ``target`` executes: each package on the way, then the module itself."""
    parts = target.split(".")
    return [m for i in range(1, len(parts) + 1) if (m := ".".join(parts[:i])) in modules]


def _find_forbidden(
    start: str, modules: dict[str, Module], forbidden_module: frozenset[str], forbidden_top: frozenset[str]
) -> str | None:
    """Breadth-first search from project module ``start``; return a readable chain to a forbidden import, or None."""
    if start in forbidden_module:
        return start
    seen = {start}
    queue: deque[tuple[str, str]] = deque([(start, "")])
    while queue:
        name, chain = queue.popleft()
        mod = modules[name]
        for imp in mod.imports:
            step = f"{chain + ' -> ' if chain else ''}{mod.rel}:{imp.line} imports "
            if imp.target.split(".")[0] in forbidden_top:
                return step + imp.target
            for nxt in _loaded(imp.target, modules):
                if nxt in forbidden_module:
                    return step + nxt
                if nxt not in seen:
                    seen.add(nxt)
                    queue.append((nxt, step + nxt))
    return None


Transitive = tuple[str, frozenset[str], frozenset[str], str]
"""A transitive rule: (id, forbidden project modules, forbidden top-level packages, why; the message's end)."""


def _is_config(name: str) -> bool:
    """R7's config modules: ``sacglam.config`` and every ``sacglam.**.config``."""
    return name == "sacglam.config" or (name.startswith("sacglam.") and name.endswith(".config"))


def _transitive_rules(mod: Module, config_packages: set[str]) -> list[Transitive]:
    """The transitive rules (R3, R4, R7) that apply to ``mod``."""
    rules: list[Transitive] = []
    if mod.name in R3_MODULES:
        rules.append(("R3", frozenset({"sacglam.agent"}), HF, "must import neither agent nor " + "/".join(sorted(HF))))
    if mod.name == "sacglam.collector":
        rules.append(
            (
                "R4",
                frozenset({"sacglam.agent", "sacglam.algos.sac.learner", "sacglam.replay.buffer"}),
                frozenset(),
                "must import neither agent, sac nor buffer",
            )
        )
    heavy = "/".join(sorted(HEAVY))
    if _is_config(mod.name):
        rules.append(("R7", frozenset(), HEAVY, f"modules must import none of {heavy}"))
    elif mod.name in config_packages:
        rules.append(("R7", frozenset(), HEAVY, f"(a package of config modules) must import none of {heavy}"))
    return rules


def _direct_breaches(mod: Module) -> list[Breach]:
    """Breaches of the rules on a module's own imports (R1, R2, R5, R8)."""
    in_sacglam = mod.package == "sacglam"
    breaches = []
    for imp in mod.imports:
        top = imp.target.split(".")[0]
        if in_sacglam and top == "envs":
            breaches.append(Breach(mod.rel, imp.line, "R1", f"imports {imp.target}: sacglam never imports envs"))
        if not in_sacglam and top == "sacglam" and not (imp.target + ".").startswith("sacglam.types."):
            breaches.append(
                Breach(mod.rel, imp.line, "R2", f"imports {imp.target}: envs imports nothing from sacglam but types")
            )
        if in_sacglam and (imp.target + ".").startswith("hydra.core.hydra_config."):
            breaches.append(
                Breach(mod.rel, imp.line, "R8", f"imports {imp.target}: sacglam never reads Hydra's global state; "
                       "take what it holds (run folder, overrides) as arguments from train.py")
            )
        allowed = HF_ALLOWED.get(mod.name, frozenset())
        if top in HF and top not in allowed:
            breaches.append(
                Breach(
                    mod.rel,
                    imp.line,
                    "R5",
                    f"imports {imp.target}: only models/agent/ppo/eto may import transformers/peft/accelerate "
                    "(scoring: transformers only; sac, distributed: accelerate only)",
                )
            )
    return breaches


def _transitive_breaches(mod: Module, modules: dict[str, Module], rules: list[Transitive]) -> list[Breach]:
    """Breaches of the transitive ``rules`` by each import of ``mod``, with the chain to the forbidden import."""
    breaches = []
    for imp in mod.imports:
        top = imp.target.split(".")[0]
        for rule, bad_modules, bad_top, why in rules:
            if top in bad_top:
                breaches.append(Breach(mod.rel, imp.line, rule, f"imports {imp.target}: {mod.stem} {why}"))
                continue
            for loaded in _loaded(imp.target, modules):
                chain = _find_forbidden(loaded, modules, bad_modules, bad_top)
                if chain is not None:
                    via = f"imports {imp.target}" + (f", which leads to {chain}" if chain != loaded else "")
                    breaches.append(Breach(mod.rel, imp.line, rule, f"{via}: {mod.stem} {why}"))
                    break
    return breaches


def import_graph(modules: dict[str, Module]) -> dict[str, dict[str, int]]:
    """Module -> {project module its imports load: line of the first such import}. Every import counts (module level,
    in functions, under TYPE_CHECKING), and so does each package an import loads on the way, except the module's own
    ancestor packages (and itself): they are already loading when it runs."""
    graph: dict[str, dict[str, int]] = {}
    for mod in modules.values():
        own = set(_loaded(mod.name, modules))
        edges: dict[str, int] = {}
        for imp in mod.imports:  # sorted by line: the first line wins
            for nxt in _loaded(imp.target, modules):
                if nxt not in own:
                    edges.setdefault(nxt, imp.line)
        graph[mod.name] = edges
    return graph


def _strongly_connected(graph: dict[str, dict[str, int]]) -> list[set[str]]:
    """Tarjan's strongly connected components of ``graph`` (modules that reach one another), in discovery order."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            components.append(component)

    for v in graph:
        if v not in index:
            visit(v)
    return components


def _shortest_loop(start: str, graph: dict[str, dict[str, int]], within: set[str]) -> list[str]:
    """The shortest import path ``start -> ... -> start`` through the modules ``within`` (breadth-first)."""
    parent: dict[str, str] = {}
    queue = deque([start])
    while queue:
        v = queue.popleft()
        for w in graph[v]:
            if w == start:
                path = [v]  # v, its parent, ..., start
                while path[-1] != start:
                    path.append(parent[path[-1]])
                return [*reversed(path), start]
            if w in within and w not in parent:
                parent[w] = v
                queue.append(w)
    raise AssertionError(f"{start} is in no loop")


def _cycle_breaches(modules: dict[str, Module]) -> list[Breach]:
    """R6: one breach per import cycle (strongly connected set of modules), reported at its first module by name."""
    graph = import_graph(modules)
    breaches = []
    for component in _strongly_connected(graph):
        if len(component) < 2:
            continue
        start = min(component)
        loop = _shortest_loop(start, graph, component)
        steps = [f"{modules[a].rel}:{graph[a][b]} imports {b}" for a, b in pairwise(loop)]
        text = "import cycle: " + " -> ".join(steps) + "; move what both sides need into a third module"
        breaches.append(Breach(modules[start].rel, graph[start][loop[1]], "R6", text))
    return breaches


def check_import_rules(root: Path) -> list[Breach]:
    """All breaches of the import rules in the tree at ``root`` (which holds sacglam/ and envs/)."""
    modules = collect_modules(root)
    config_packages = {p for name in modules if _is_config(name) for p in _loaded(name, modules)[:-1]}
    breaches: list[Breach] = _cycle_breaches(modules)
    for mod in modules.values():
        breaches += _direct_breaches(mod)
        breaches += _transitive_breaches(mod, modules, _transitive_rules(mod, config_packages))
    return sorted(breaches, key=lambda b: (b.rel, b.line, b.rule))


def test_repository_follows_the_import_rules() -> None:
    modules = collect_modules(REPO)
    # Guard against a walker that silently checks nothing.
    assert {"sacglam.types", "envs.base", "envs"} <= set(modules)
    breaches = check_import_rules(REPO)
    rules = "Import-rule breaches (docs/design/ARCHITECTURE.md, 'Import rules'):\n"
    assert not breaches, rules + "\n".join(map(str, breaches))


_FAKE_TREE = {
    "sacglam/__init__.py": '"""fake"""\n',
    "sacglam/types.py": "import torch\n",
    "sacglam/replay/__init__.py": "",
    "sacglam/replay/buffer.py": "import torch\nfrom ..prompting import PromptCodec\nfrom sacglam import agent\n",
    "sacglam/prompting.py": (
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from transformers import PreTrainedTokenizerBase\n"
    ),
    "sacglam/collector.py": "import envs.vector\ndef f():\n    from sacglam.algos.sac.learner import SACUpdater\n",
    "sacglam/algos/__init__.py": "",
    "sacglam/algos/sac/__init__.py": "",
    "sacglam/algos/sac/learner.py": "import accelerate\nfrom peft import PeftModel\nfrom ...agent import Agent\n",
    "sacglam/scoring.py": "from transformers import PreTrainedModel\n",
    "sacglam/models.py": "import transformers, peft\n",
    "sacglam/agent.py": "from . import models\nfrom transformers import AutoModel\n",
    "sacglam/algos/ppo/__init__.py": "",
    "sacglam/algos/ppo/learner.py": "from ...agent import Agent\nimport peft\n",
    "sacglam/replay/her.py": "from sacglam.algos.ppo import learner\n",
    "envs/__init__.py": "from envs.base import TextEnvBase\n",
    "envs/base.py": "from sacglam.types import TextStep\nfrom sacglam import types\n",
    "envs/x.py": (
        "from sacglam.replay.buffer import ReplayBuffer\nimport importlib\nimportlib.import_module('transformers')\n"
    ),
}


def test_checker_reports_each_breach_with_file_and_line(tmp_path: Path) -> None:
    for rel, source in _FAKE_TREE.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(textwrap.dedent(source))
    breaches = check_import_rules(tmp_path)
    assert [(b.rel, b.line, b.rule) for b in breaches] == [
        ("envs/x.py", 1, "R2"),
        ("envs/x.py", 3, "R5"),
        ("sacglam/algos/sac/learner.py", 2, "R5"),
        ("sacglam/collector.py", 1, "R1"),
        ("sacglam/collector.py", 3, "R4"),
        ("sacglam/prompting.py", 3, "R3"),
        ("sacglam/prompting.py", 3, "R5"),
        ("sacglam/replay/buffer.py", 2, "R3"),
        ("sacglam/replay/buffer.py", 3, "R3"),
        ("sacglam/replay/her.py", 1, "R3"),
    ]
    text = {(b.rel, b.line, b.rule): str(b) for b in breaches}
    assert text[("sacglam/replay/buffer.py", 2, "R3")] == (
        "sacglam/replay/buffer.py:2: [R3] imports sacglam.prompting, which leads to sacglam/prompting.py:3 imports "
        "transformers: buffer must import neither agent nor accelerate/peft/transformers"
    )
    # The chain goes through the package __init__ and the submodule: her -> algos.ppo.learner -> agent.
    assert "sacglam/algos/ppo/learner.py:1 imports sacglam.agent" in text[("sacglam/replay/her.py", 1, "R3")]
    assert text[("sacglam/collector.py", 1, "R1")].startswith("sacglam/collector.py:1: [R1] imports envs.vector")


def test_config_imports_no_heavy_library() -> None:
    """R7's promise, checked by running it: composing the schema loads no model library (hydra/omegaconf are fine)."""
    code = "import sys, sacglam.config; print([m for m in ('torch','transformers','accelerate','peft','numpy') " \
           "if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


# R6 to R8: a cycle through an import inside a function (distributed <-> sac learner, as the real tree had), a
# config module that reaches torch through a TYPE_CHECKING import, a config package whose __init__ loads numpy, and a
# builder that reads Hydra's global state.
_FAKE_TREE_R6_TO_R8 = {
    "sacglam/__init__.py": '"""fake"""\n',
    "sacglam/config.py": (
        "from sacglam.algos.sac.config import SACConfig\nfrom sacglam.replay.config import BufferConfig\n"
    ),
    "sacglam/distributed.py": "import os\ndef check():\n    from sacglam.algos.sac.learner import SACConfig\n",
    "sacglam/algos/__init__.py": "",
    "sacglam/algos/sac/__init__.py": "",
    "sacglam/algos/sac/config.py": (
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from sacglam.algos.sac.learner import SACUpdater\n"
    ),
    "sacglam/algos/sac/learner.py": "import torch\nfrom .. import sac\nfrom sacglam.distributed import check\n",
    "sacglam/replay/__init__.py": "from sacglam.replay.buffer import ReplayBuffer\n",
    "sacglam/replay/buffer.py": (
        "import numpy\nfrom sacglam.replay.config import BufferConfig\nfrom sacglam import replay\n"
    ),
    "sacglam/replay/config.py": "from dataclasses import dataclass\n",
    "sacglam/run/__init__.py": "",
    "sacglam/run/builders.py": "import hydra\nfrom hydra.core.hydra_config import HydraConfig\n",
    "envs/__init__.py": "from envs.base import TextEnvBase\n",
    "envs/base.py": "import envs.spaces\n",
    "envs/spaces.py": "from envs import base\n",
}


def test_checker_reports_cycles_heavy_config_modules_and_hydra_state(tmp_path: Path) -> None:
    for rel, source in _FAKE_TREE_R6_TO_R8.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(source)
    breaches = check_import_rules(tmp_path)
    assert [(b.rel, b.line, b.rule) for b in breaches] == [
        ("envs/base.py", 1, "R6"),
        ("sacglam/algos/sac/config.py", 3, "R7"),
        ("sacglam/algos/sac/learner.py", 3, "R6"),
        ("sacglam/config.py", 1, "R7"),
        ("sacglam/config.py", 2, "R7"),
        ("sacglam/replay/__init__.py", 1, "R7"),
        ("sacglam/run/builders.py", 2, "R8"),
    ]
    text = {(b.rel, b.line, b.rule): str(b) for b in breaches}
    # The loop goes through an import inside a function; a module's import of its own package (`from .. import sac`,
    # `from sacglam import replay`) is no cycle.
    assert text[("sacglam/algos/sac/learner.py", 3, "R6")] == (
        "sacglam/algos/sac/learner.py:3: [R6] import cycle: sacglam/algos/sac/learner.py:3 imports "
        "sacglam.distributed -> sacglam/distributed.py:3 imports sacglam.algos.sac.learner; move what both sides "
        "need into a third module"
    )
    assert text[("envs/base.py", 1, "R6")].endswith(
        "envs/base.py:1 imports envs.spaces -> envs/spaces.py:1 imports envs.base; move what both sides need into a "
        "third module"
    )
    # A type-only import counts: the config module would load torch under a type checker's eyes and couples to it.
    assert text[("sacglam/algos/sac/config.py", 3, "R7")] == (
        "sacglam/algos/sac/config.py:3: [R7] imports sacglam.algos.sac.learner, which leads to "
        "sacglam/algos/sac/learner.py:1 imports torch: config modules must import none of "
        "accelerate/numpy/peft/torch/transformers"
    )
    # Importing sacglam.replay.config runs sacglam/replay/__init__.py, which loads numpy through the buffer.
    assert (
        "imports sacglam.replay.config, which leads to sacglam/replay/__init__.py:1 imports sacglam.replay.buffer "
        "-> sacglam/replay/buffer.py:1 imports numpy"
    ) in text[("sacglam/config.py", 2, "R7")]
    assert text[("sacglam/replay/__init__.py", 1, "R7")].endswith(
        "replay (a package of config modules) must import none of accelerate/numpy/peft/torch/transformers"
    )
