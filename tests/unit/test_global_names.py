"""Every global name pych's functions use is defined in their module.

Imports made inside functions (pych imports lazily to start fast) are local names; a
function that uses a name its module imported at the top, after that import moved into
another function, fails only when it runs: a whole guest test's path may be the first to
run it (a local migration's receiver did, once). This reads the bytecode of every
function of every pych module and checks each global it loads against the module's
namespace and the builtins (the standard library only: no linter needed)."""

from __future__ import annotations

import builtins
import dis
import importlib
import pkgutil
import types
from pathlib import Path

import pych


def _functions(code: types.CodeType):
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield const
            yield from _functions(const)


def test_every_global_a_function_loads_is_defined_in_its_module():
    undefined = []
    for info in pkgutil.walk_packages(pych.__path__, "pych."):
        if info.name.endswith("__main__"):
            continue                        # runs the CLI when imported
        module = importlib.import_module(info.name)
        source = Path(module.__file__)
        for code in _functions(compile(source.read_text(), str(source), "exec")):
            for instruction in dis.get_instructions(code):
                name = instruction.argval
                if (instruction.opname == "LOAD_GLOBAL" and name not in vars(module)
                        and not hasattr(builtins, name)):
                    undefined.append(f"{info.name}.{code.co_qualname}: {name}")
    assert not undefined, "undefined global names:\n" + "\n".join(undefined)
