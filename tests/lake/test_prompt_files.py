"""Prompt files of every format import byte-identically and idempotently; bad files
stop with a line naming the file and the place."""

import csv
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from circuit_atlas.lake import Lake, PromptFileError, prompt_id, read_prompt_file


def write(path, fmt, texts, domain=None):
    records = [{"prompt": t, **({"domain": domain} if domain else {})} for t in texts]
    if fmt == "json":
        path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records),
                        encoding="utf-8")
    elif fmt == "yaml":
        # PyYAML writes YAML's other line breaks (NEL, LS, PS) raw into quoted scalars,
        # where a reader must fold them to spaces: escape them in that case
        raw = not any(c in t for t in texts for c in "\x85\u2028\u2029")
        path.write_text(yaml.safe_dump(records, allow_unicode=raw), encoding="utf-8")
    elif fmt == "csv":
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(records[0]))
            writer.writeheader()
            writer.writerows(records)
    elif fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(records), path)
    elif fmt == "txt":
        path.write_text("\n".join(texts) + "\n", encoding="utf-8")
    return path


FORMATS = ["json", "jsonl", "yaml", "csv", "parquet", "txt"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format_imports(tmp_path, fmt):
    texts = ["The capital of France is", "Aspirin inhibits", "naïve 漢字 🧬"]
    path = write(tmp_path / f"p.{fmt}", fmt, texts, domain=None if fmt == "txt" else "med")
    lake = Lake.init(tmp_path / "lake")
    report = lake.import_prompts(read_prompt_file(path), "c", source=path.name, domain="dflt")
    assert report.added == 3
    rows = lake.scan("prompts").collect().sort("text").to_dicts()
    assert [r["text"] for r in rows] == sorted(texts)
    assert {r["domain"] for r in rows} == ({"dflt"} if fmt == "txt" else {"med"})
    assert all(r["prompt_id"] == prompt_id(r["text"]) and r["source"] == path.name for r in rows)


def test_mappings_keep_extra_fields_and_accept_a_prompts_key(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("name: medical v6\nprompts:\n  - text: Insulin is made in the\n"
                    "    domain: medical\n    difficulty: 2\n  - plain string prompt\n")
    records = read_prompt_file(path)
    assert records[0] == {"text": "Insulin is made in the", "domain": "medical",
                          "meta": {"difficulty": 2}}
    assert records[1] == {"text": "plain string prompt", "domain": None, "meta": None}
    path = tmp_path / "q.json"
    path.write_text(json.dumps([{"question": "Why?", "id": 7}]))
    assert read_prompt_file(path, text_field="question")[0]["meta"] == {"id": 7}


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("bad.yaml", "- a\n- [b\n", r"not valid YAML at line \d+ column \d+"),
        ("bad.json", '["a", "b",]', r"not valid JSON: line 1 column \d+"),
        ("bad.jsonl", '{"prompt": "a"}\n{"prompt": \n', r"line 2: not valid JSON"),
        ("wrong.json", '{"a": 1}', r"expected a list of prompts"),
        ("nokey.json", '[{"prompt": "a"}, {"txt": "b"}]', r"prompt 2: no 'prompt' or 'text' key"),
        ("num.yaml", "- prompt: 12\n", r"prompt 1: the prompt must be a string, got int"),
        ("blank.json", '["ok", "  "]', r"prompt 2: empty prompt"),
        ("empty.txt", "\n\n  \n", r"no prompts found"),
        ("empty.json", "[]", r"no prompts found"),
        ("empty.yaml", "", r"no prompts found"),
        ("nohead.csv", "question\nwhy\n", r"CSV header has no 'prompt' or 'text' column"),
        ("wide.csv", "prompt\na,b\n", r"line 2: more fields than the header"),
        ("p.docx", "x", r"cannot tell the format .*\.docx"),
    ],
)
def test_bad_prompt_files(tmp_path, name, content, expected):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(PromptFileError, match=expected) as e:
        read_prompt_file(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_not_utf8_and_missing_and_corrupt_parquet(tmp_path):
    (tmp_path / "latin.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(PromptFileError, match=r"latin.txt: not UTF-8 text \(byte 3\)"):
        read_prompt_file(tmp_path / "latin.txt")
    with pytest.raises(PromptFileError, match="gone.json: no such file"):
        read_prompt_file(tmp_path / "gone.json")
    (tmp_path / "c.parquet").write_bytes(b"PAR1garbage")
    with pytest.raises(PromptFileError, match="c.parquet: not a readable Parquet file"):
        read_prompt_file(tmp_path / "c.parquet")


def test_reimport_is_idempotent(tmp_path):
    path = write(tmp_path / "p.jsonl", "jsonl", ["a", "b", "a"])
    lake = Lake.init(tmp_path / "lake")
    first = lake.import_prompts(read_prompt_file(path), "c")
    assert (first.added, first.duplicates_in_input) == (2, 1)
    again = lake.import_prompts(read_prompt_file(path), "c")
    assert (again.added, again.already_present) == (0, 2)
    assert lake.read("prompts").num_rows == 2
    assert len(lake.files("prompts")) == 1  # nothing written for an import that adds nothing


prompt_text = st.text(min_size=1, max_size=40).filter(lambda s: s.strip())


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(texts=st.lists(prompt_text, min_size=1, max_size=8), fmt=st.sampled_from(FORMATS))
def test_unicode_survives_every_format(tmp_path_factory, texts, fmt):
    if fmt == "txt":  # one prompt per line cannot hold a line break
        texts = [t for t in texts if "\n" not in t and "\r" not in t and t.strip()] or ["x"]
        texts = [t for t in texts if t == t.removesuffix("\r")]
    tmp = tmp_path_factory.mktemp("u")
    path = write(tmp / f"p.{fmt}", fmt, texts)
    lake = Lake.init(tmp / "lake")
    lake.import_prompts(read_prompt_file(path), "c")
    stored = lake.read("prompts").column("text").to_pylist()
    assert sorted(stored) == sorted(set(texts))
    assert [s.encode() for s in sorted(stored)] == [t.encode() for t in sorted(set(texts))]
    assert lake.import_prompts(read_prompt_file(path), "c").added == 0
