import pytest

from lowbit import UserError
from lowbit.data import calibration_batches, enwiki, load_text, tokenize


def test_markup_to_text():
    markup = (
        "{{Infobox|name=x|{{nested|y}}}}'''Bold''' text with a [[Link target|label]] and [[plain link]]"
        " and a ref<ref name=a>Source, p. 1</ref> and [http://example.com an external link], long enough.\n"
        "{| class=wikitable\n|-\n| cell |}\n"
        "[[File:Picture.jpg|thumb|A caption with [[a link]]]]\n"
        "== Section ==\n"
        "* a list item that should be dropped because it is a list entry\n"
        "Second paragraph of prose with <!-- a comment --> enough characters to be kept.\n"
        "== References ==\nEverything after references is dropped, even long prose lines like this one.\n"
    )
    text = enwiki.markup_to_text(markup)
    assert text.splitlines() == [
        "Bold text with a label and plain link and a ref and an external link, long enough.",
        " == Section == ",
        "Second paragraph of prose with enough characters to be kept.",
    ]


@pytest.fixture(scope="module")
def corpus():
    try:
        enwiki.corpus_path()
    except UserError as exc:
        pytest.skip(str(exc))
    return enwiki


def test_default_corpus_splits_are_disjoint_prose(corpus):
    eval_text, calib_text = load_text(None, "eval"), load_text("enwiki-sample", "calib")
    assert len(eval_text) > 500_000 and len(calib_text) > 500_000
    eval_titles = {t for t in eval_text.splitlines() if t.startswith(" = ")}
    calib_titles = {t for t in calib_text.splitlines() if t.startswith(" = ")}
    assert eval_titles and calib_titles and not eval_titles & calib_titles
    for marker in ("{{", "}}", "[[", "]]", "<ref", "&quot;", "'''"):
        assert marker not in eval_text


def test_missing_gensim_says_how_to_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gensim" else real(name, *a))
    with pytest.raises(UserError, match="pip install --no-deps gensim"):
        enwiki.corpus_path()


def test_text_file_and_errors(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("hello world")
    assert load_text(str(f)) == "hello world"
    with pytest.raises(UserError, match="text file not found"):
        load_text(str(tmp_path / "missing.txt"))
    with pytest.raises(UserError, match="is a folder"):
        load_text(str(tmp_path))
    with pytest.raises(UserError, match="unknown data"):
        load_text("nonsense")
    (tmp_path / "bin").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(UserError, match="UTF-8"):
        load_text(str(tmp_path / "bin"))


def test_empty_text_fails():
    from conftest import word_tokenizer

    with pytest.raises(UserError, match="empty"):
        tokenize(word_tokenizer(), "  \n ")


def test_calibration_batches_are_seeded(sample_text_file):
    from conftest import word_tokenizer

    tok = word_tokenizer()
    a = calibration_batches(tok, str(sample_text_file), 4, 32, seed=1)
    b = calibration_batches(tok, str(sample_text_file), 4, 32, seed=1)
    assert len(a) == 4 and all(x.shape == (1, 32) for x in a)
    assert all((x == y).all() for x, y in zip(a, b))
    starts = {tuple(x[0, :4].tolist()) for x in a}
    assert len(starts) == 4  # distinct windows
    with pytest.raises(UserError, match="fewer than the 1 samples requested"):
        calibration_batches(tok, str(sample_text_file), 1, 100_000)
    available = tokenize(tok, sample_text_file.read_text()).numel() // 32
    with pytest.raises(UserError, match=f"{available} windows of 32, fewer than the {available + 1} samples"):
        calibration_batches(tok, str(sample_text_file), available + 1, 32)
    assert len(calibration_batches(tok, str(sample_text_file), available, 32)) == available


def test_hub_dataset_offline_or_without_datasets_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(UserError, match="lowbit\\[hub\\]|pass a local text file"):
        load_text("wikitext2")
