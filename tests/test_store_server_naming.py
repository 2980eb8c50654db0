"""Collection names of server generations (``collection_for``)."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from qdrant_client import QdrantClient

from repd.adapters.store_server import (
    MAX_COLLECTION_NAME,
    ServerStore,
    alias_target,
    collection_for,
    set_alias,
)

NAME = re.compile(r"[a-z0-9_-]+")
MINILM = "sentence-transformers/all-MiniLM-L6-v2"
MINILM_ID = "all-MiniLM-L6-v2@0123456789abcdef"


def test_the_usual_model() -> None:
    assert collection_for("repd", MINILM, MINILM_ID, 3) == "repd-all-minilm-l6-v2-01234567-g3"
    # A bare name or a hub id give the same slug.
    assert collection_for("repd", "all-MiniLM-L6-v2", MINILM_ID, 3) == collection_for(
        "repd", MINILM, MINILM_ID, 3)


@pytest.mark.parametrize(("model_name", "slug"), [
    ("/home/me/models/BGE-Small-EN-v1.5/", "bge-small-en-v1-5"),
    (r"C:\models\e5_base", "e5_base"),
    ("./local model (copy)", "local-model-copy"),
    ("Modèle/Çà-Ünïcödé", "ca-unicode"),
    ("org/模型", "model"),  # nothing left in ASCII
    ("🙂", "model"),
    ("", "model"),
    ("--__weird__--", "weird"),
    ("a..b//c", "c"),
])
def test_odd_model_names(model_name: str, slug: str) -> None:
    assert collection_for("repd", model_name, "x@89abcdef01234567", 1) == (
        f"repd-{slug}-89abcdef-g1")


@pytest.mark.parametrize(("base", "head"), [
    ("repd", "repd"),
    ("My Repd!", "my-repd"),
    ("team/repd:prod", "team-repd-prod"),
    ("", "repd"),
    ("***", "repd"),
])
def test_odd_bases(base: str, head: str) -> None:
    assert collection_for(base, MINILM, MINILM_ID, 7) == f"{head}-all-minilm-l6-v2-01234567-g7"


def test_the_digest() -> None:
    upper = collection_for("repd", MINILM, "all-MiniLM-L6-v2@0123456789ABCDEF", 1)
    assert upper == collection_for("repd", MINILM, MINILM_ID, 1)
    # Without a hex digest after '@', a hash of the whole id stands in: still 8 hex
    # digits, still deterministic, and different ids give different names.
    for model_id in ("no-at-sign", "name@", "name@xyz", "name@0123"):
        name = collection_for("repd", MINILM, model_id, 1)
        digest = name.split("-")[-2]
        assert re.fullmatch(r"[0-9a-f]{8}", digest), model_id
        assert name == collection_for("repd", MINILM, model_id, 1)
    assert collection_for("repd", MINILM, "name@xyz", 1) != collection_for(
        "repd", MINILM, "name@xyw", 1)
    # The digest follows the last '@'.
    assert collection_for("repd", MINILM, "a@b@fedcba9876543210", 1).endswith("-fedcba98-g1")


def test_names_differ_by_weights_and_generation() -> None:
    names = {
        collection_for("repd", MINILM, MINILM_ID, 1),
        collection_for("repd", MINILM, MINILM_ID, 2),
        collection_for("repd", MINILM, "all-MiniLM-L6-v2@ffffffff00000000", 1),
        collection_for("other", MINILM, MINILM_ID, 1),
    }
    assert len(names) == 4


def test_very_long_names_are_bounded() -> None:
    name = collection_for("b" * 1000, "org/" + "m" * 1000, "m@" + "a" * 64, 2**63 - 1)
    assert len(name) <= MAX_COLLECTION_NAME
    assert NAME.fullmatch(name)
    assert name.endswith(f"-aaaaaaaa-g{2**63 - 1}")
    # A cut never leaves a dash hanging before the separator.
    cut = collection_for("repd", "x" * 47 + "-yyy", MINILM_ID, 1)
    assert cut == f"repd-{'x' * 47}-01234567-g1"


def test_a_negative_or_absurd_generation_id_is_refused() -> None:
    with pytest.raises(ValueError, match="negative"):
        collection_for("repd", MINILM, MINILM_ID, -1)
    with pytest.raises(ValueError, match="too long"):
        collection_for("b" * 200, "m" * 200, MINILM_ID, 10**45)


@settings(max_examples=300, deadline=None)
@given(base=st.text(max_size=300), model_name=st.text(max_size=300),
       model_id=st.text(max_size=300), gen_id=st.integers(min_value=0, max_value=2**63 - 1))
def test_any_input_gives_a_valid_bounded_name(
    base: str, model_name: str, model_id: str, gen_id: int,
) -> None:
    name = collection_for(base, model_name, model_id, gen_id)
    assert NAME.fullmatch(name)
    assert len(name) <= MAX_COLLECTION_NAME
    assert name.endswith(f"-g{gen_id}")
    assert name == collection_for(base, model_name, model_id, gen_id)


def test_the_name_works_as_a_collection_behind_an_alias() -> None:
    client = QdrantClient(":memory:")
    try:
        first = collection_for("repd", MINILM, MINILM_ID, 1)
        second = collection_for("repd", "BAAI/bge-small-en-v1.5", "bge@00112233aabbccdd", 2)
        ServerStore(client, first, 8)
        ServerStore(client, second, 8)
        set_alias(client, "repd", first)
        set_alias(client, "repd", second)
        assert alias_target(client, "repd") == second
        assert alias_target(client, "absent") is None
    finally:
        client.close()
