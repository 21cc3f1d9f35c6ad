"""The package layout: no import cycle, the CLI at the edge, light tables.

The import graph is built by grimp from the source (imports inside functions
count too), so a cycle hidden in a function body is found as well.
"""

from __future__ import annotations

import subprocess
import sys

import grimp

from tests.test_workflow import REPO


def _graph():
    graph = grimp.build_graph("khe_vol", cache_dir=None)
    return {m: graph.find_modules_directly_imported_by(m) for m in graph.modules}


def _cycles(edges):
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
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
                found.append(sorted(component))

    for module in sorted(edges):
        if module not in index:
            visit(module)
    return found


def test_cycle_finder_finds_a_cycle():
    # The check below can fail: a planted loop is found.
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_in_khe_vol():
    assert _cycles(_graph()) == []


def test_no_library_module_imports_the_cli():
    edges = _graph()
    assert "khe_vol.cli" in edges
    assert sorted(m for m, imported in edges.items() if "khe_vol.cli" in imported) == []


def test_tables_files_workbook_and_provenance_load_no_imaging_library():
    # `khe-vol tables` and `workbook` need none of them; SimpleITK alone takes
    # a noticeable time to load in every job.
    code = ("import sys, khe_vol.tables, khe_vol.files, khe_vol.report.workbook, khe_vol.report.provenance, "
            "khe_vol.qa; "
            "print(sorted(m for m in ('SimpleITK', 'nibabel', 'skimage', 'scipy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_series_record_type_names_every_field_a_record_has():
    import typing

    from khe_vol.record import SeriesRecord
    from khe_vol.series import base_record

    assert set(base_record("sub-01", "ses-baseline", 0)) == set(typing.get_type_hints(SeriesRecord))
