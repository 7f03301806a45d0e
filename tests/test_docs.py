"""The documentation names only what exists: the README's examples and the docstrings' references.

README: running the tour for real would train and compile for minutes, so this is a static check,
as a reader meets the examples: every ``ls.…`` reference in the text resolves; every ```python
block parses; every attribute taken from a module, a class or an instance exists; and every call
binds to the signature of what it calls (keywords, number of positional arguments). Types flow
through the blocks in order: a name assigned from a landscape class, or from a function or
property whose return annotation is one, is an instance of it in the lines and blocks after
(``loss = ls.ClipLoss(...)``, then ``loss.init(...)`` is checked against ``ClipLoss.init``).

Docstrings: every Sphinx-style cross-reference (``:func:`…```, ``:class:`…```, ``:attr:`…```, ...)
in landscape/, models/, figures/ and paper_repro.py resolves to an object, and every name an
``Args:`` section documents is a parameter of its function (or of its class's constructor).

Command lines: every ``python paper_repro.py …``, ``python bench/….py …`` and ``python -m
landscape …`` the README and the scripts' own docstrings show is accepted by that program's
argument parser (parsed, not run).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import importlib
import inspect
import pkgutil
import re
import shlex
import typing
from pathlib import Path

import pytest

import figures
import landscape as ls
import models
import paper_repro

README = Path(__file__).resolve().parents[1] / "README.md"
OURS = ("landscape", "models")


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, re.S)


def inline_code(text: str) -> list[str]:
    """The prose's `code` spans that are Python expressions with a call or an attribute; file
    names (``bench/lapq.py``, ``results/luq.md``) parse as attributes and are left out."""
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    spans = []
    for span in dict.fromkeys(re.findall(r"(?<!`)`([^`\n]+)`(?!`)", prose)):
        if "/" in span or re.fullmatch(r"[\w.-]+\.(py|md|txt|json|png|pdf|toml|sh|parquet|npz|cfg)", span):
            continue
        try:
            tree = ast.parse(span, mode="eval")
        except SyntaxError:
            continue
        if any(isinstance(node, ast.Call | ast.Attribute) for node in ast.walk(tree)):
            spans.append(span)
    return spans


def inline_references(text: str) -> list[str]:
    """``ls.a.b`` as written anywhere in the text (a trailing dot is the sentence's)."""
    return sorted(set(re.findall(r"\bls(?:\.[A-Za-z_]\w*)+", text)))


@dataclasses.dataclass(frozen=True)
class Instance:
    """A value known only by its class: what a call of a landscape constructor returns."""

    cls: type


def _ours(cls) -> bool:
    return isinstance(cls, type) and cls.__module__.split(".")[0] in OURS


def _returned(fn) -> Instance | None:
    """The instance a function returns, from its return annotation, when that is one of our classes."""
    try:
        result = typing.get_type_hints(fn).get("return")
    except Exception:  # an annotation that does not resolve says nothing about the type
        return None
    return Instance(result) if _ours(result) else None


@functools.cache  # asked once per attribute looked up: the class sources are read once
def _instance_attributes(cls) -> set[str]:
    """Attributes an instance has beyond the class's: dataclass fields, annotations, ``self.x = …``."""
    names = set()
    for klass in cls.__mro__[:-1]:
        names |= set(getattr(klass, "__annotations__", {}))
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        names |= set(re.findall(r"self\.(\w+)\s*(?::[^=\n]*)?=", source))
    return names


class ExampleChecker:
    """Walk code blocks in order; ``problems`` lists what does not exist or does not bind,
    ``bound`` counts the calls checked against a signature."""

    def __init__(self):
        self.env: dict[str, object] = {"ls": ls, "models": models}
        self.problems: list[str] = []
        self.bound = 0

    def check(self, blocks: list[str]) -> ExampleChecker:
        for number, block in enumerate(blocks):
            self.where = f"block {number}"
            try:
                tree = ast.parse(block)
            except SyntaxError as err:
                self.problems.append(f"{self.where}: does not parse ({err})")
                continue
            for stmt in tree.body:
                self._statement(stmt)
        return self

    def _say(self, node, what: str):
        self.problems.append(f"{self.where} line {getattr(node, 'lineno', '?')}: {what}")

    def _statement(self, stmt):
        if isinstance(stmt, ast.Import | ast.ImportFrom):
            self._import(stmt)
        elif isinstance(stmt, ast.ClassDef | ast.FunctionDef):
            self.env[stmt.name] = None  # the reader's own code: its calls are not ours to check
        elif isinstance(stmt, ast.Assign):
            value = self._value(stmt.value)
            for target in stmt.targets:
                names = target.elts if isinstance(target, ast.Tuple) else [target]
                for name in names:
                    if isinstance(name, ast.Name):
                        self.env[name.id] = value if len(names) == 1 else None
        else:
            self._value(stmt)

    def _import(self, stmt):
        for alias in stmt.names:
            try:
                if isinstance(stmt, ast.ImportFrom):
                    module = importlib.import_module(stmt.module)
                    value = (getattr(module, alias.name) if hasattr(module, alias.name)
                             else importlib.import_module(f"{stmt.module}.{alias.name}"))
                    self.env[alias.asname or alias.name] = value
                else:  # `import a.b` binds a (with a.b imported), `import a.b as c` binds a.b
                    module = importlib.import_module(alias.name)
                    top = alias.name.split(".")[0]
                    self.env[alias.asname or top] = module if alias.asname else importlib.import_module(top)
            except ImportError as err:
                self._say(stmt, f"import {alias.name}: {err}")

    def _value(self, node):
        """What ``node`` evaluates to, as far as known (None: unknown), checking it on the way."""
        if isinstance(node, ast.Name):
            return self.env.get(node.id)
        if isinstance(node, ast.Attribute):
            return self._attribute(node)
        if isinstance(node, ast.Call):
            return self._call(node)
        for child in ast.iter_child_nodes(node):  # tuples, subscripts, comprehensions, ...: their calls
            self._value(child)
        return None

    def _attribute(self, node):
        base = self._value(node.value)
        if base is None:
            return None
        if isinstance(base, Instance):
            cls = base.cls
            if hasattr(cls, node.attr):
                static = inspect.getattr_static(cls, node.attr)
                if isinstance(static, property):
                    return _returned(static.fget)
                return ("method", cls, getattr(cls, node.attr))
            if node.attr not in _instance_attributes(cls):
                self._say(node, f"{cls.__name__} has no attribute {node.attr!r}")
            return None
        if isinstance(base, tuple):  # an attribute of a method: not taken in the README
            return None
        if not hasattr(base, node.attr):
            self._say(node, f"{getattr(base, '__name__', base)!s} has no attribute {node.attr!r}")
            return None
        return getattr(base, node.attr)

    def _call(self, node):
        target = self._value(node.func)
        for arg in [*node.args, *(k.value for k in node.keywords)]:
            self._value(arg)
        if target is None:
            return None
        function = target[2] if isinstance(target, tuple) else target
        self._bind(target, function, node)
        if isinstance(function, type):
            return Instance(function) if _ours(function) else None
        return _returned(function) if callable(function) else None

    def _bind(self, target, function, node):
        if any(isinstance(a, ast.Starred) for a in node.args) or any(k.arg is None for k in node.keywords):
            return
        try:
            signature = inspect.signature(function)
        except (TypeError, ValueError):  # a builtin without one
            return
        args = [None] * len(node.args)
        if isinstance(target, tuple):  # a method looked up on an instance's class: self comes first
            static = inspect.getattr_static(target[1], function.__name__, None)
            if not isinstance(static, staticmethod | classmethod):
                args.insert(0, None)
        try:
            signature.bind(*args, **{k.arg: None for k in node.keywords})
        except TypeError as err:
            self._say(node, f"{getattr(function, '__qualname__', function)}: {err}")
        else:
            self.bound += 1


ROLE = re.compile(r":(?:func|class|meth|mod|attr|data|obj|exc):`~?([^`<]+?)`")


def _has(obj, name: str) -> bool:
    """``obj.name`` exists, counting a class's instance attributes."""
    return hasattr(obj, name) or (isinstance(obj, type) and name in _instance_attributes(obj))


def _resolves(module, target: str) -> bool:
    """Whether a cross-reference ``target`` written in ``module`` names an object: a dotted path
    from an importable module, a path from the module's own names, or (a bare name in a method's
    docstring) a member of one of the module's classes."""
    parts = target.strip().removesuffix("()").split(".")
    for i in range(len(parts), 0, -1):  # the longest importable prefix
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for j, part in enumerate(parts[i:], start=i):
            if not _has(obj, part):
                return False
            if j < len(parts) - 1:
                obj = getattr(obj, part)
        return True
    obj = module
    for j, part in enumerate(parts):
        if not _has(obj, part):
            break
        if j == len(parts) - 1:
            return True
        obj = getattr(obj, part)
    classes = [c for _, c in inspect.getmembers(module, inspect.isclass) if c.__module__ == module.__name__]
    return len(parts) == 1 and any(_has(c, parts[0]) for c in classes)


def _documented_modules():
    found = [paper_repro]
    for package in (ls, models, figures):
        found.append(package)
        names = [m.name for m in pkgutil.iter_modules(package.__path__)]
        found += [importlib.import_module(f"{package.__name__}.{name}") for name in names]
    return found


def test_docstring_cross_references_resolve():
    checked, missing = 0, []
    for module in _documented_modules():
        source = inspect.getsource(module)
        for match in ROLE.finditer(source):
            checked += 1
            if not _resolves(module, match.group(1)):
                line = source[: match.start()].count("\n") + 1
                missing.append(f"{module.__name__}:{line}: {match.group(0)}")
    assert checked >= 300, checked
    assert not missing, "\n".join(missing)


def documented_arguments(doc: str) -> list[str] | None:
    """The names a Google-style ``Args:`` section documents (``a, b: ...`` documents two; a
    ``*args`` entry its bare name), or None without one."""
    head = re.search(r"^\s*Args:\s*\n", doc, re.M)
    if head is None:
        return None
    names, indent = [], None
    for line in doc[head.end():].splitlines():
        if not line.strip():
            continue
        depth = len(line) - len(line.lstrip())
        indent = depth if indent is None else indent
        if depth < indent:
            break
        entry = re.match(r"\s*([\w*, ]+?)(?:\s*\([^)]*\))?:\s", line + " ")
        if depth == indent and entry:
            names += [name.strip().lstrip("*") for name in entry.group(1).split(",")]
    return names


def _functions(module):
    """The module's own functions and classes, and its classes' methods."""
    for name, obj in vars(module).items():
        if getattr(obj, "__module__", None) != module.__name__:
            continue
        if inspect.isfunction(obj):
            yield name, obj
        elif inspect.isclass(obj):
            yield name, obj
            yield from ((f"{name}.{m}", f) for m, f in vars(obj).items() if inspect.isfunction(f))


def test_args_sections_name_the_parameters():
    checked, wrong = 0, []
    for module in _documented_modules():
        for name, fn in _functions(module):
            names = documented_arguments(inspect.getdoc(fn) or "")
            if names is None:
                continue
            try:
                parameters = set(inspect.signature(fn).parameters)
            except (TypeError, ValueError):
                continue
            checked += 1
            if set(names) - parameters:
                wrong.append(f"{module.__name__}.{name}: {sorted(set(names) - parameters)} are not parameters")
    assert checked >= 40, checked
    assert not wrong, "\n".join(wrong)


def test_documented_arguments_reads_an_args_section():
    doc = """Summary.

    Args:
        H: (n, n) matrix,
            continued: on a second line.
        labels, ax: as before.
        n_samples (int): N.
        *arrays: the rest.

    Returns:
        x: not an argument.
    """
    assert documented_arguments(inspect.cleandoc(doc)) == ["H", "labels", "ax", "n_samples", "arrays"]
    assert documented_arguments("No section.") is None


@pytest.mark.parametrize("module, target, ok", [
    (ls.layers, "landscape.folding.fold_batchnorm", True),
    (ls.layers, "landscape.train.fold_batchnorm", False),  # the stale one this test found
    (ls.spectrum, "_HVP.home", True),                       # an attribute set in __init__
    (ls.spectrum, "_HVP.hom", False),
    (ls.clip_loss, "params", True),                         # a method's docstring naming its class's member
    (ls.clip_loss, "paramz", False),
    (ls.bit_allocation, "landscape.sites.Site.macs", True),
    (ls.bit_allocation, "Site.macs", False),                # Site is not a name of bit_allocation
])
def test_the_cross_reference_check(module, target, ok):
    assert _resolves(module, target) is ok


def test_every_inline_reference_resolves():
    refs = inline_references(README.read_text())
    assert len(refs) >= 20, refs  # the text does name the API
    missing = [ref for ref in refs if not _resolves(ls, "landscape." + ref.removeprefix("ls."))]
    assert not missing, missing


def test_the_python_examples_call_what_exists():
    blocks = python_blocks(README.read_text())
    assert len(blocks) >= 8
    checker = ExampleChecker().check(blocks)
    assert not checker.problems, "\n".join(checker.problems)
    # not a vacuous pass: the types flowed and the calls were bound
    assert checker.bound >= 40, checker.bound
    env = checker.env
    assert env["loss"] == Instance(ls.ClipLoss) and env["spec"] == Instance(ls.HessianSpectrum)
    assert env["qnet"] == Instance(ls.export.QuantizedNetwork)


def test_inline_code_names_what_exists():
    """`loss.weight_loss_batches(batch_size=...)` in a sentence is checked like the blocks' code,
    with the names the blocks defined (``loss`` a ClipLoss, ``spec`` a HessianSpectrum, ...)."""
    text = README.read_text()
    checker = ExampleChecker().check(python_blocks(text))
    before = checker.bound
    spans = inline_code(text)
    assert len(spans) >= 60, len(spans)
    for span in spans:
        checker.where = f"`{span}`"
        checker._value(ast.parse(span, mode="eval").body)
    assert not checker.problems, "\n".join(checker.problems)
    assert checker.bound - before >= 10


def commands(lines) -> list[tuple[str, ...]]:
    """argv of each ``python paper_repro.py``, ``python bench/X.py`` and ``python -m landscape``
    command in ``lines`` (comments and ``&&`` chains split off; a usage synopsis read as one
    call: ``[--n 128]`` as ``--n 128``, ``trained|random`` as ``trained``), without those that
    abbreviate (…) or name a placeholder (COMMAND)."""
    found = []
    for line in lines:
        line = re.sub(r"(\S+?)\|\S+", r"\1", line.replace("[", "").replace("]", ""))
        for part in line.split("#")[0].split("&&"):
            try:
                words = shlex.split(" ".join(part.split()))
            except ValueError:  # prose with an apostrophe, not a command
                continue
            if (len(words) >= 2 and words[0] in ("python", "python3") and not any("…" in w for w in words)
                    and "COMMAND" not in words
                    and (words[1] == "paper_repro.py" or words[1].startswith("bench/")
                         or words[1:3] == ["-m", "landscape"])):
                found.append(tuple(words[1:]))
    return list(dict.fromkeys(found))


def readme_commands(text: str) -> list[tuple[str, ...]]:
    """The commands of the README's inline code and ```bash blocks."""
    bash = [line for block in re.findall(r"```bash\n(.*?)```", text, re.S) for line in block.splitlines()]
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    return commands(bash + re.findall(r"(?<!`)`([^`]+)`(?!`)", prose))


def docstring_commands() -> list[tuple[str, ...]]:
    """The commands the scripts' module docstrings show (their usage lines)."""
    root = README.parent
    scripts = sorted((root / "bench").glob("*.py")) + [root / "paper_repro.py"]
    docs = [ast.get_docstring(ast.parse(path.read_text())) or "" for path in scripts]
    return commands(line for doc in docs for line in doc.splitlines())


class _Parsed(Exception):
    """Raised in place of running a program once its arguments are parsed."""


def _program(argv):
    """The ``main(argv)`` a command line runs, and its arguments."""
    if argv[:2] == ("-m", "landscape"):
        return importlib.import_module("landscape.__main__").main, list(argv[2:])
    if argv[0] == "paper_repro.py":
        return paper_repro.main, list(argv[1:])
    path = Path(__file__).resolve().parents[1] / argv[0]
    spec = importlib.util.spec_from_file_location(f"readme_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main, list(argv[1:])


README_COMMANDS = readme_commands(README.read_text())
DOCSTRING_COMMANDS = docstring_commands()
COMMANDS = list(dict.fromkeys(README_COMMANDS + DOCSTRING_COMMANDS))


def test_readme_and_scripts_show_commands():
    programs = {argv[0] if argv[0] != "-m" else "landscape" for argv in README_COMMANDS}
    assert {"paper_repro.py", "landscape", "bench/lapq.py", "bench/rounding.py"} <= programs, programs
    assert len(README_COMMANDS) >= 15
    # every benchmark script shows how it is called (bench/ also holds two shared modules)
    shown = {argv[0] for argv in DOCSTRING_COMMANDS}
    scripts = {f"bench/{p.name}" for p in (README.parent / "bench").glob("*.py")} - {"bench/mnist_resnet20.py",
                                                                                     "bench/torch_models.py"}
    assert scripts <= shown, sorted(scripts - shown)
    assert commands(["python bench/hessian.py [--n 128] [--weights trained|random]"]) == [
        ("bench/hessian.py", "--n", "128", "--weights", "trained")]


@pytest.mark.parametrize("argv", COMMANDS, ids=[" ".join(a)[:60] for a in COMMANDS])
def test_command_lines_parse(argv, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(README.parent / "bench"))  # the scripts import their shared modules
    main, args = _program(argv)
    parse = argparse.ArgumentParser.parse_args

    def parsed(self, args=None, namespace=None):
        raise _Parsed(parse(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parsed)
    try:
        returned = main(args)
    except _Parsed:
        return
    except SystemExit as exit:  # argparse's error (or --help): the message is on stderr
        pytest.fail(f"{' '.join(argv)}: exit {exit.code}: {capsys.readouterr().err.strip()[-500:]}")
    assert returned == 0 and "usage" in capsys.readouterr().out  # `python -m landscape`: its command list


DRIFT = [
    ("loss = ls.ClipLoss(None, None, w_bits=4, a_bits=4, bias_corection=True)",
     "unexpected keyword argument 'bias_corection'"),
    ("loss = ls.ClipLoss(None, None, w_bits=4, a_bits=4)\nloss.hesian(None)", "ClipLoss has no attribute 'hesian'"),
    ("res = ls.lapq(None)\nres.alpah", "LAPQResult has no attribute 'alpah'"),
    ("ls.clip_hessian(None, None, 'ste')", "too many positional arguments"),
    ("ls.data.lode('digits')", "has no attribute 'lode'"),
    ("from landscape.layers import QuantConvolution", "QuantConvolution"),
    ("spec = ls.hessian_spectrum(None, None)\nspec.plot(None, log=True, colour='r')", "colour"),
    ("ls.ClipLoss(None, w_bits=4, a_bits=4)", "missing a required argument: 'calib'"),
    ("x = (", "does not parse"),
]


@pytest.mark.parametrize("code, says", DRIFT, ids=[d[1][:24] for d in DRIFT])
def test_the_check_catches_drift(code, says):
    problems = ExampleChecker().check([code]).problems
    assert len(problems) == 1 and says in problems[0], problems


def test_types_flow_from_annotations_and_across_blocks():
    checker = ExampleChecker().check(["loss = ls.ClipLoss(None, None, w_bits=4, a_bits=4)\nres = ls.lapq(loss)",
                                      "q = ls.export.quantize_network(loss, res.alpha)\nq.accuracy(None)"])
    assert not checker.problems and checker.env["q"] == Instance(ls.export.QuantizedNetwork)
    assert checker.bound == 4
