"""`UserError`: messages name the library's parameters, which a caller may call by its own names;
and no message of the library names a command-line flag."""

import ast
import pickle
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from debiformer.errors import UserError, mention, quoted

LIBRARY = Path(__file__).resolve().parents[1] / "debiformer"
FLAG = re.compile(r"(?<![\w-])--[a-z]")
FLAGS = {"fresh": "--fresh", "mode": "--mode", "on_bad_image=skip": "--skip-bad", "out": "--out"}


def test_mentions_read_as_parameters_or_as_the_callers_names():
    error = UserError(
        f"damaged; start over with {mention('fresh')}, use {mention('mode', 'infer')} or "
        f"skip it with {mention('on_bad_image', 'skip')}; {mention('seed')} stays"
    )
    assert str(error) == (
        "damaged; start over with fresh, use mode=infer or skip it with on_bad_image=skip; "
        "seed stays"
    )
    assert error.render(FLAGS) == (
        "damaged; start over with --fresh, use --mode infer or skip it with --skip-bad; seed stays"
    )


@pytest.mark.parametrize(
    ("message", "library", "cli"),
    [
        ("runs/x: is a file", "out runs/x: is a file", "--out runs/x: is a file"),
        (": unknown format 'gif'", "out: unknown format 'gif'", "--out: unknown format 'gif'"),
    ],
)
def test_about_comes_first(message, library, cli):
    error = UserError(message, about="out")
    assert error.about == "out"
    assert str(error) == library and error.render(FLAGS) == cli


def test_a_recipe_key_or_text_in_braces_keeps_its_name():
    error = UserError("got {'a': 1} and {1, 2} in {Train}", about="train.device")
    assert error.render(FLAGS) == str(error) == "train.device got {'a': 1} and {1, 2} in {Train}"


def test_an_error_keeps_its_mentions_across_processes():
    error = pickle.loads(pickle.dumps(UserError(f"use {mention('fresh')}", about="out")))
    assert isinstance(error, UserError) and error.render(FLAGS) == "--out use --fresh"


def test_a_quoted_value_is_its_repr_cut_short_however_large_it_is():
    bomb = ["lol"] * 9
    for _ in range(9):  # 9**10 strings once expanded, as a YAML alias bomb
        bomb = [bomb] * 9
    assert quoted("abc") == "'abc'" and quoted(1.5) == "1.5" and quoted({"a": 1}) == "{'a': 1}"
    for value in (bomb, "x" * 10**6, list(range(10**6)), {str(k): k for k in range(10**5)}):
        text = quoted(value)
        assert len(text) <= 60 and "\n" not in text
    assert len(quoted("x" * 100, limit=20)) == 20


# ----------------------------------------------------------------------------- no flags


def _name(call: ast.Call) -> str | None:
    """The name a call calls: `f` for `f(...)` and `x.f(...)`."""
    function = call.func
    return function.id if isinstance(function, ast.Name) else getattr(function, "attr", None)


def _parameters(function: ast.FunctionDef | ast.AsyncFunctionDef) -> set[str]:
    arguments = function.args
    names = arguments.posonlyargs + arguments.args + arguments.kwonlyargs
    return {argument.arg for argument in names} - {"self", "cls"}


def _functions(trees: list[ast.Module]) -> Iterator[ast.FunctionDef | ast.AsyncFunctionDef]:
    for tree in trees:
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                yield node


def _message_makers(trees: list[ast.Module]) -> set[str]:
    """`UserError` and every function that puts one of its parameters into a call of one of
    these (`check_writable(path, about)`): the text given to any of them is message text."""
    makers = {"UserError"}
    while True:
        found = {
            function.name
            for function in _functions(trees)
            for call in ast.walk(function)
            if isinstance(call, ast.Call) and _name(call) in makers
            if _parameters(function) & {n.id for n in ast.walk(call) if isinstance(n, ast.Name)}
        }
        if found <= makers:
            return makers
        makers |= found


def _texts(node: ast.AST) -> Iterator[tuple[int, str]]:
    """(line, text) of each string constant and f-string part within `node`."""
    for child in ast.walk(node):
        if isinstance(child, ast.Constant) and isinstance(child.value, str):
            yield child.lineno, child.value


def _message_texts(trees: dict[Path, ast.Module]) -> Iterator[tuple[str, str]]:
    """("file:line", text) of the texts given to message makers, their defaults included."""
    makers = _message_makers(list(trees.values()))
    for path, tree in trees.items():
        where = path.relative_to(LIBRARY.parent)
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and _name(node) in makers:
                parts = [*node.args, *(keyword.value for keyword in node.keywords)]
            elif isinstance(node, ast.FunctionDef) and node.name in makers:
                parts = [*node.args.defaults, *filter(None, node.args.kw_defaults)]
            else:
                continue
            for part in parts:
                for line, text in _texts(part):
                    yield f"{where}:{line}", text


def test_library_messages_name_no_flags():
    trees = {path: ast.parse(path.read_text()) for path in sorted(LIBRARY.rglob("*.py"))}
    flagged = sorted(
        f"{where}: {text!r}"
        for where, text in _message_texts(trees)
        if FLAG.search(text) and "pip install" not in text
    )
    assert not flagged, "messages that name flags (name the parameter instead):\n" + "\n".join(
        flagged
    )


def test_the_flag_scan_finds_flags_in_messages_and_message_makers():
    source = """
def check(about, value="--size"):
    raise UserError("too small", about=about)

def caller(path):
    check("--json")
    raise UserError(f"--resume {path}: damaged; start over with {mention('fresh')}")
    print("--not-a-message")
"""
    texts = [text for _, text in _message_texts({LIBRARY / "example.py": ast.parse(source)})]
    assert [text for text in texts if FLAG.search(text)] == ["--size", "--json", "--resume "]
