"""Property-based tests (hypothesis): no scheme name, recipe file or saved description, however
malformed, produces anything but a result or a `UserError` (never a traceback)."""

from __future__ import annotations

import json

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lowbit import UserError
from lowbit.io.description import check_description
from lowbit.recipes import load_recipe
from lowbit.scheme import parse_scheme

FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

SCHEME_TEXT = st.text(alphabet="WAKVgcatsmfhbx0123456789-_ ", max_size=24)
PIECES = st.sampled_from(
    ["W", "A", "KV", "K", "V", "4", "8", "16", "2", "0", "99", "g", "64", "g-", "a", "t", "s", "m", "f", "h", "b", "c90", "c0", "-", "_"]
)


@FAST
@given(st.one_of(SCHEME_TEXT, st.lists(PIECES, max_size=10).map("".join)))
def test_any_scheme_text_parses_or_is_a_user_error(text):
    try:
        scheme = parse_scheme(text)
    except UserError:
        return
    assert parse_scheme(scheme.name) == scheme  # what parses has a canonical name that parses back


KEYS = st.sampled_from(
    ["scheme", "transform", "algorithm", "alpha", "smooth_all", "r1", "r4", "seed", "fuse_r1", "fold_norms", "damp", "act_order",
     "block_size", "static_groups", "token_clip", "scale_grid", "clip_grid", "search_scales", "unknown"]
)  # fmt: skip
VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 300),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["W4A16", "W4g64A8KV4", "W4g-64", "none", "smooth", "rotate", "smoothrot", "gptq", "awq", "rtn", "search", "false", ""]),
    st.text(max_size=8),
    st.lists(st.integers(), max_size=3),
)


@FAST
@given(st.dictionaries(KEYS, VALUES, max_size=8))
def test_any_recipe_file_loads_or_is_a_user_error(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("recipe") / "r.yaml"
    path.write_text(yaml.safe_dump(data))
    try:
        recipe = load_recipe(str(path))
    except UserError:
        return
    assert recipe.scheme is not None and recipe.algorithm in ("rtn", "gptq", "awq")


@FAST
@given(st.text(max_size=60))
def test_any_recipe_text_loads_or_is_a_user_error(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("recipe") / "r.yaml"
    path.write_text(text)
    try:
        load_recipe(str(path))
    except UserError:
        pass


JSON = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.text(max_size=6)),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
    max_leaves=12,
)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    from conftest import tiny_model

    import lowbit

    path = tmp_path_factory.mktemp("saved") / "model"
    lowbit.save_quantized(lowbit.quantize(tiny_model("llama"), "W4A8KV4", transform="rotate", progress=False), path)
    return path


FIELDS = st.sampled_from(
    ["dtype", "scheme", "modules", "files", "aliases", "hf_config", "transform", "algorithm", "algorithm_config", "format_version", "source"]
)


def _damage(saved, field, value) -> dict:
    from lowbit.io.description import CHECKSUM_KEY, description_checksum
    from lowbit.io.native import CONFIG_FILE

    config = json.loads((saved / CONFIG_FILE).read_text())
    config[field] = value
    config[CHECKSUM_KEY] = description_checksum(config)  # past the checksum: each field must be checked itself
    return config


@FAST
@given(FIELDS, JSON)
def test_any_damaged_description_is_checked_without_a_traceback(saved, field, value):
    try:
        check_description(_damage(saved, field, value), "lowbit.json")
    except UserError:
        pass


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(FIELDS, JSON)
def test_a_folder_with_any_damaged_description_loads_or_is_a_user_error(saved, tmp_path_factory, field, value):
    import shutil

    import lowbit
    from lowbit.io.native import CONFIG_FILE

    copy = tmp_path_factory.mktemp("damaged") / "model"
    shutil.copytree(saved, copy)
    (copy / CONFIG_FILE).write_text(json.dumps(_damage(saved, field, value)))
    try:
        lowbit.load_quantized(copy)
    except UserError:
        pass
