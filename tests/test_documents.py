"""The limits of settings documents, checked before anything walks them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from leafguard.documents import MAX_DEPTH, MAX_DOCUMENT_BYTES, MAX_ENTRIES, check_document, read_document
from leafguard.errors import ConfigurationError


def _nested(depth: int, leaf: object = 1) -> object:
    doc = leaf
    for i in range(depth):
        doc = {"k": doc} if i % 2 else [doc]
    return doc


def test_depth_is_the_hubs() -> None:
    check_document(_nested(MAX_DEPTH), "doc")
    with pytest.raises(ConfigurationError, match="doc: nests deeper than 10 levels"):
        check_document(_nested(MAX_DEPTH + 1), "doc")
    with pytest.raises(ConfigurationError, match="deeper"):
        check_document(_nested(100_000), "doc")  # no RecursionError, however deep


def test_entries_are_capped_in_objects_and_arrays() -> None:
    check_document({"a": list(range(MAX_ENTRIES)), "b": {str(i): i for i in range(MAX_ENTRIES)}}, "doc")
    for big in (list(range(MAX_ENTRIES + 1)), {"m": {str(i): i for i in range(MAX_ENTRIES + 1)}}):
        with pytest.raises(ConfigurationError, match="10001 entries, over 10000"):
            check_document(big, "doc")


def test_files_past_the_size_cap_are_not_read(tmp_path: Path) -> None:
    path = tmp_path / "gateway.json"
    path.write_text(json.dumps({"pad": "x" * (MAX_DOCUMENT_BYTES - 20)}))
    assert len(read_document(path)["pad"]) == MAX_DOCUMENT_BYTES - 20
    path.write_text(json.dumps({"pad": "x" * MAX_DOCUMENT_BYTES}))
    with pytest.raises(ConfigurationError, match="larger than 1048576 bytes"):
        read_document(path)
    path.write_text("[" * 5000 + "]" * 5000)
    with pytest.raises(ConfigurationError, match=r"gateway\.json: (not JSON|nests deeper)"):
        read_document(path)
    with pytest.raises(ConfigurationError, match="not readable"):
        read_document(tmp_path / "missing.json")
