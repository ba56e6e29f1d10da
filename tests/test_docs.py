"""The documentation stays true to the code: every config field is in the reference with its real default, and every
relative link between the docs points at a file that exists."""

import ast
import dataclasses
import re
from pathlib import Path

import pytest

from hf_layercache import LayerCacheConfig

DOCS = Path(__file__).resolve().parents[1] / "docs"
ROW = re.compile(r"^\| `(?P<name>\w+)` \| `(?P<type>[^|]+(?:\\\|[^|]+)*)` \| `(?P<default>[^`]*)` \|", re.MULTILINE)


def _documented_fields() -> dict[str, tuple[str, str]]:
    text = (DOCS / "configuration.md").read_text(encoding="utf-8")
    return {m["name"]: (m["type"].replace("\\|", "|"), m["default"]) for m in ROW.finditer(text)}


def _default(field: dataclasses.Field):
    return field.default_factory() if field.default is dataclasses.MISSING else field.default


def test_configuration_reference_documents_every_field_with_its_type_and_default():
    documented = _documented_fields()
    fields = dataclasses.fields(LayerCacheConfig)
    assert sorted(documented) == sorted(f.name for f in fields), "docs/configuration.md and config.py disagree"
    for field in fields:
        doc_type, doc_default = documented[field.name]
        assert doc_type == str(field.type), field.name
        assert ast.literal_eval(doc_default) == _default(field), field.name


@pytest.mark.parametrize("page", sorted(p.name for p in DOCS.glob("*.md")))
def test_links_between_docs_resolve(page):
    text = (DOCS / page).read_text(encoding="utf-8")
    for target in re.findall(r"\]\(([^)#:\s]+\.md)(?:#[^)]*)?\)", text):
        assert (DOCS / target).resolve().is_file(), f"{page} links to missing {target}"
