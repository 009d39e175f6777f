"""pych.config's names: each resolved from its own module when first used."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pych.config


def test_every_name_comes_from_the_module_the_table_gives() -> None:
    for module, names in pych.config._EXPORTS.items():
        for name in names:
            defined = getattr(importlib.import_module(f"pych.config.{module}"), name)
            assert getattr(pych.config, name) is defined


def test_the_names_type_checkers_see_are_the_names_resolved() -> None:
    """The TYPE_CHECKING imports (for checkers and readers) list exactly the table's names."""
    tree = ast.parse(Path(pych.config.__file__).read_text())
    checked = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            for stmt in node.body:
                assert isinstance(stmt, ast.ImportFrom)
                for alias in stmt.names:
                    checked[alias.name] = stmt.module.rpartition(".")[2]
    assert checked == pych.config._MODULE_OF


def test_the_errors_and_the_option_tables_need_no_pydantic() -> None:
    code = ("import sys; from pych.config import ConfigError, OptionError, rules; "
            "assert rules.CLI_OPTIONS and ConfigError; "
            "print([m for m in sys.modules if m.startswith('pydantic')])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).resolve().parents[3])
    assert out.stdout.strip() == "[]"
