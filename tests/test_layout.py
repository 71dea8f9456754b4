"""README's Layout lists every module of the package, one line each."""

import pathlib
import re

REPO = pathlib.Path(__file__).resolve().parent.parent


def test_readme_layout_lists_every_module_once():
    readme = (REPO / "README.md").read_text()
    layout = readme[readme.index("## Layout") :]
    listed = re.findall(r"`(opa_jax/[\w/]+\.py)`", layout)
    modules = sorted(str(p.relative_to(REPO)) for p in (REPO / "opa_jax").rglob("*.py"))
    assert sorted(listed) == modules
    assert len(set(listed)) == len(listed)
