"""optional.py: a missing optional package is a one-line error naming the extra to install."""

import sys

import pytest

from peftcli.errors import UserError
from peftcli.optional import need


def test_an_installed_package_is_imported():
    assert need("json", "none", "reading JSON").dumps([1]) == "[1]"


def test_a_missing_package_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "somelib", None)  # import somelib -> ImportError
    with pytest.raises(UserError, match=r"plots needs.*`somelib`.*pip install 'peftcli\[plot\]'"):
        need("somelib.figure", "plot", "plots")
