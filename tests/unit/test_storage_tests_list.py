"""conftest.STORAGE_TESTS (what ./run-tests runs again on S3) names tests that exist.

A renamed or removed test would otherwise drop out of the S3 pass without a word. The
files of OWN_BACKEND_TESTS (left out of that pass) exist too, and the lists do not meet.
"""

from __future__ import annotations

import ast

import pytest

from tests.conftest import OWN_BACKEND_TESTS, ROOT, STORAGE_TESTS


def functions_in(path: str) -> set[str]:
    tree = ast.parse((ROOT / path).read_text(encoding="utf-8"))
    return {n.name for n in tree.body
            if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef) and n.name.startswith("test")}


@pytest.mark.parametrize("entry", STORAGE_TESTS)
def test_entry_names_an_existing_test_file_or_function(entry: str) -> None:
    path, _, name = entry.partition("::")
    assert (ROOT / path).is_file(), f"{path} does not exist"
    assert path.startswith("tests/"), path
    assert path.endswith(".py"), path
    if name:
        assert name in functions_in(path), f"{path} has no test {name}"


def test_entries_are_unique() -> None:
    assert len(set(STORAGE_TESTS)) == len(STORAGE_TESTS)


@pytest.mark.parametrize("path", OWN_BACKEND_TESTS)
def test_own_backend_files_exist_and_are_not_storage_tests(path: str) -> None:
    assert (ROOT / path).is_file(), f"{path} does not exist"
    assert not [e for e in STORAGE_TESTS if e.partition("::")[0] == path]
