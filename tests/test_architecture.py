"The library's layers: chapters import only earlier chapters, at the top of the module; only the CLI parses arguments."
import ast, re
from pathlib import Path
import mri_protodiff

PKG = Path(mri_protodiff.__file__).resolve().parent
ROOT = PKG.parent
# chapter order = the numbered notebooks' default_exp, in file order
ORDER = [re.search(r"#\| default_exp (\w+)", p.read_text()).group(1) for p in sorted((ROOT/"nbs").glob("[0-9][0-9]_*.ipynb"))]


def sibling_imports(tree):
    "(module imported, node, inside a function?) for every import of a sibling module."
    out = []
    def walk(node, in_fn):
        for ch in ast.iter_child_nodes(node):
            fn = in_fn or isinstance(ch, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(ch, ast.ImportFrom):
                if ch.level == 1 and ch.module: out.append((ch.module.split(".")[0], ch, in_fn))
                elif ch.module == "mri_protodiff": out.extend((a.name, ch, in_fn) for a in ch.names)
                elif (ch.module or "").startswith("mri_protodiff."): out.append((ch.module.split(".")[1], ch, in_fn))
            walk(ch, fn)
    walk(tree, False)
    return out


def test_every_module_is_a_chapter_in_order():
    mods = {p.stem for p in PKG.glob("*.py")} - {"__init__", "_modidx"}
    assert mods == set(ORDER), (mods ^ set(ORDER))
    assert ORDER[-3:] == ["pipeline", "reproduce", "cli"]     # method chapters first, then the pipeline, then the command line


def test_imports_go_one_way_and_sit_at_the_top():
    for m in ORDER:
        src = (PKG/f"{m}.py").read_text()
        lines = src.splitlines()
        for dep, node, in_fn in sibling_imports(ast.parse(src)):
            if dep not in ORDER: continue
            assert ORDER.index(dep) < ORDER.index(m), f"{m} imports {dep}, a later chapter (line {node.lineno})"
            if in_fn:   # only where it must be lazy, said on the line (the CLI: --help must not import torch)
                assert m == "cli" or "must" in lines[node.lineno - 1], f"{m}:{node.lineno} imports {dep} inside a function"


def test_only_the_cli_chapter_parses_arguments():
    users = [m for m in ORDER if re.search(r"^\s*import argparse|^\s*from argparse|argparse\.", (PKG/f"{m}.py").read_text(), re.M)]
    assert users == ["cli"], users
