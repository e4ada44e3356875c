"""megabranch's and tools/' imports, read with ast (tests/helpers/import_rules.py): no import cycle (function-local
imports count), no private name of one module used by another (tools/ using megabranch's included), function-local
imports only of the optional or heavy dependencies on its allowlist, no change of sys.path, no module of the
package imported by a bare name; megabranch imports nothing of tools/. The checker is tested first on tiny
packages written here."""

from __future__ import annotations

import os
import textwrap

import pytest

from tests.helpers.env import ROOT
from tests.helpers.import_rules import check_package, folder_cycles

pytestmark = pytest.mark.unit


MEGABRANCH, TOOLS = os.path.join(ROOT, "megabranch"), os.path.join(ROOT, "tools")


def _package(tmp_path, files: dict[str, str], name: str = "pkg") -> str:
    """Write <name>/<path> for each entry (dedented) and return the package directory."""
    for rel, text in files.items():
        path = tmp_path / name / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return str(tmp_path / name)


def test_a_cycle_through_a_function_local_import_is_reported(tmp_path):
    report = check_package(
        _package(
            tmp_path,
            {
                "__init__.py": "",
                "a.py": "from . import b\n",  # from pkg import submodule
                "b.py": """\
            def f():
                from pkg.a import x
                return x
            """,
                # a longer cycle through a subpackage, `..` and `import p.m as m`
                "x.py": "from .sub import c\n",
                "sub/__init__.py": "",
                "sub/c.py": "from ..y import thing\n",
                "y.py": "import pkg.x as x\n",
            },
        )
    )
    assert report.cycles == [["pkg.a", "pkg.b", "pkg.a"], ["pkg.sub.c", "pkg.y", "pkg.x", "pkg.sub.c"]]
    msg = report.message("pkg")
    assert "  pkg.a -> pkg.b -> pkg.a\n" in msg and "  pkg.sub.c -> pkg.y -> pkg.x -> pkg.sub.c\n" in msg
    assert "pkg.b -> pkg.a: pkg/b.py:2 (in f)" in msg  # where the hidden edge is
    assert report.local == ["pkg/b.py:2 in f: from pkg.a import x"]
    assert not report.private and not report.ok


def test_a_cycle_through_a_package_init_is_reported(tmp_path):
    """`from pkg import name` where name is no submodule reads pkg's __init__, which imports the importer."""
    report = check_package(
        _package(
            tmp_path,
            {
                "__init__.py": "from .a import thing\n",
                "a.py": "from pkg import other\nthing = 1\n",
                "b.py": "other = 2\n",
            },
        )
    )
    assert report.cycles == [["pkg", "pkg.a", "pkg"]]


def test_private_names_used_across_modules_are_reported(tmp_path):
    report = check_package(
        _package(
            tmp_path,
            {
                "__init__.py": "",
                "a.py": """\
            __version__ = "1"
            _helper = 1

            def _own():
                return _helper  # its own private name: fine
            """,
                "b.py": """\
            import pkg.a
            from . import a
            from .a import _helper, __version__
            from .sub import _inner

            v = a._helper + pkg.a._helper + a.__version__ + a._own.__name__.__len__()
            """,
                "_impl.py": "",
                "sub/__init__.py": "",
                "sub/_inner.py": "",
                "sub/m.py": "from .. import _impl  # a private module of the package this module is in: fine\n",
            },
        )
    )
    assert report.private == [
        "pkg/b.py:3: from .a import _helper, __version__ (pkg.a._helper)",
        "pkg/b.py:4: from .sub import _inner (private submodule pkg.sub._inner)",
        "pkg/b.py:6: a._helper (pkg.a._helper)",
        "pkg/b.py:6: a._own (pkg.a._own)",
        "pkg/b.py:6: pkg.a._helper (pkg.a._helper)",
    ]
    assert not report.cycles and not report.local
    assert "private names used across modules:\n  pkg/b.py:3: from .a import _helper" in report.message()


def test_function_local_imports_outside_the_allowlist_are_reported(tmp_path):
    report = check_package(
        _package(
            tmp_path,
            {
                "__init__.py": "",
                "a.py": """\
            import json


            def plot():
                import matplotlib.pyplot as plt
                from torch.utils import tensorboard
                from deepspeed.pipe import LayerSpec
                return plt, tensorboard, LayerSpec, json


            def load():
                import yaml
                from torch.utils import data
                from . import b
                return yaml, data, b


            class C:
                import os  # a class body runs at import time: module level

                def m(self):
                    import shutil
                    return shutil
            """,
                "b.py": "X = 1\n",
            },
        )
    )
    assert report.local == [
        "pkg/a.py:12 in load: import yaml",
        "pkg/a.py:13 in load: from torch.utils import data",
        "pkg/a.py:14 in load: from . import b",
        "pkg/a.py:22 in C.m: import shutil",
    ]
    assert not report.cycles and not report.private


def test_changes_of_sys_path_and_bare_name_imports_are_reported(tmp_path):
    report = check_package(
        _package(
            tmp_path,
            {
                "__init__.py": "",
                "sub/__init__.py": "",
                "sub/plan.py": "X = 1\n",
                "sub/run.py": """\
            import os
            import site
            import sys

            sys.path.insert(0, os.path.dirname(__file__))
            sys.path.append("..")
            sys.path[:0] = ["."]
            sys.path += ["x"]
            site.addsitedir(".")
            os.environ["PYTHONPATH"] = "."  # a child process's environment: not this one's import path

            import plan
            from plan import X
            from . import plan as fine
            from .plan import X as Y
            from pkg.sub import plan as also_fine
            """,
            },
        )
    )
    assert report.path_changes == [
        "pkg/sub/run.py:5: sys.path.insert(0, os.path.dirname(__file__))",
        "pkg/sub/run.py:6: sys.path.append('..')",
        "pkg/sub/run.py:7: sys.path[:0] = ['.']",
        "pkg/sub/run.py:8: sys.path += ['x']",
        "pkg/sub/run.py:9: site.addsitedir('.')",
    ]
    assert report.bare == [
        "pkg/sub/run.py:12: import plan (the module pkg.sub.plan)",
        "pkg/sub/run.py:13: from plan import X (the module pkg.sub.plan)",
    ]
    assert not report.cycles and not report.private and not report.local and not report.ok
    msg = report.message()
    assert "5 change(s) of sys.path, 2 module(s) imported by a bare name" in msg.splitlines()[0]
    assert "changes of the import path" in msg and "imported by a bare name (import them relatively)" in msg


def test_a_used_package_is_known_but_not_checked(tmp_path):
    """tools/ uses megabranch/: an edge into it, and its private names, count; its own files are not checked."""
    lib = _package(
        tmp_path, {"__init__.py": "", "core.py": "import sys\n\nsys.path.append('x')\n_secret = 1\n"}, name="lib"
    )
    report = check_package(
        _package(
            tmp_path,
            {
                "__init__.py": "",
                "run.py": "import lib.core as core\nfrom lib.core import _secret\n\nv = core._secret\n",
            },
            name="app",
        ),
        uses=(lib,),
    )
    assert report.private == [
        "app/run.py:2: from lib.core import _secret (lib.core._secret)",
        "app/run.py:4: core._secret (lib.core._secret)",
    ]
    assert set(report.edges) == {("app.run", "lib.core")} and not report.path_changes


def test_a_clean_package_passes(tmp_path):
    report = check_package(
        _package(
            tmp_path,
            {
                "__init__.py": "from .core import run\n",
                "core.py": """\
            from .util import helper


            def run():
                return helper()
            """,
                "util.py": """\
            import os

            try:
                import deepspeed
            except ImportError:  # optional: detected at module level
                deepspeed = None


            def helper():
                import matplotlib

                return os.sep, _mine(), matplotlib, deepspeed


            def _mine():
                return 1
            """,
                "sub/__init__.py": "",
                "sub/m.py": "from .. import core\nfrom ..util import helper\n",
            },
        )
    )
    assert report.ok, report.message()
    assert set(report.edges) == {
        ("pkg", "pkg.core"),
        ("pkg.core", "pkg.util"),
        ("pkg.sub.m", "pkg.core"),
        ("pkg.sub.m", "pkg.util"),
    }
    assert report.message().startswith("import rules broken: 0 import cycle(s), 0 private name(s)")


def test_megabranch_follows_the_import_rules():
    report = check_package(MEGABRANCH, uses=(TOOLS,))
    assert report.ok, report.message("megabranch breaks its import rules")
    assert not [e for e in report.edges if e[1].startswith("tools.")], "megabranch imports tools/"


def test_megabranch_folders_depend_one_way():
    """docs/design.md: config/errors <- residual <- model <- parallel <- training <- the commands; no two folders
    import each other, however indirectly."""
    cycles = folder_cycles(check_package(MEGABRANCH))
    assert not cycles, "folders importing each other: " + "; ".join(" -> ".join(c) for c in cycles)


def test_tools_follow_the_import_rules():
    """tools/bench and tools/research are packages run with python -m: relative imports inside them, megabranch
    by its name, and neither imports the other's modules in a circle."""
    report = check_package(TOOLS, uses=(MEGABRANCH,))
    assert report.ok, report.message("tools/ breaks the import rules")
    cycles = folder_cycles(report)
    assert not cycles, "folders importing each other: " + "; ".join(" -> ".join(c) for c in cycles)
