"""Properties over arbitrary input (hypothesis): the tokenizer round-trips, reversing text is an
involution, the config loader fails only with ConfigError, and corpus cuts land on line ends.

Skipped when hypothesis is not installed. About 100 examples a property, no example database and no
`.hypothesis` folder in the repository.
"""

from __future__ import annotations

import atexit
import dataclasses
import os
import shutil
import string
import tempfile
from unittest import mock

import pytest

hypothesis = pytest.importorskip("hypothesis")
configuration = pytest.importorskip("hypothesis.configuration")

import yaml  # noqa: E402
from hypothesis import HealthCheck, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from lmtrain.config import SECTIONS, Config, ConfigError, all_keys, load_config  # noqa: E402
from lmtrain.data import dataset as data  # noqa: E402
from lmtrain.data.dataset import reverse_text  # noqa: E402
from lmtrain.data.encoding import split_points, stream_ids  # noqa: E402
from lmtrain.data.tokenizer import Tokenizer  # noqa: E402

# Hypothesis writes a cache into ./.hypothesis even without an example database, the first time at the
# end of collection (before any fixture runs): point it at a temporary folder from the start.
if not os.environ.get("HYPOTHESIS_STORAGE_DIRECTORY"):
    _HOME = tempfile.mkdtemp(prefix="lmtrain-hypothesis-")
    atexit.register(shutil.rmtree, _HOME, ignore_errors=True)
    configuration.set_hypothesis_home_dir(_HOME)

settings.register_profile("lmtrain-properties", deadline=None, max_examples=100, database=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
PROFILE = settings.get_profile("lmtrain-properties")


# Any text hypothesis makes (it leaves out surrogates, which are not encodable text).
TEXT = st.text()
# Text with many line ends, spaces and a few words, to reach empty lines and short cuts.
LINES = st.text(alphabet=st.sampled_from("ab c\n\n \té"), max_size=200)
ANY_TEXT = st.one_of(TEXT, LINES)
# Text without "\r" ending in a line end: what `read_text` hands the tokenizer, line by line.
TEXT_LINES = ANY_TEXT.map(lambda text: text.replace("\r", "") + "\n")


# -- the tokenizer ------------------------------------------------------------------------------------

@PROFILE
@given(TEXT_LINES)
def test_char_tokenizer_round_trips_lines(text):
    tokenizer = Tokenizer.fit(text, level="char")
    ids = tokenizer.encode(text)
    assert tokenizer.unk_id not in ids
    assert tokenizer.decode(ids) == text


@PROFILE
@given(ANY_TEXT)
def test_char_tokenizer_round_trips_any_text_without_eos(text):
    tokenizer = Tokenizer.fit(text, level="char", eos="none")
    ids = tokenizer.encode(text)
    assert len(ids) == len(text)
    assert tokenizer.decode(ids) == text


@PROFILE
@given(ANY_TEXT, ANY_TEXT)
def test_char_stream_ids_match_encode(training, text):
    """The vectorised id stream of the data pipeline is `<eos>` + `encode`, unseen characters <unk>."""
    for eos in ("line", "none"):
        tokenizer = Tokenizer.fit(training, level="char", eos=eos)
        assert stream_ids(tokenizer, text).tolist() == [tokenizer.eos_id, *tokenizer.encode(text)]


@PROFILE
@given(ANY_TEXT, st.one_of(st.none(), ANY_TEXT))
def test_word_tokenizer_encode_decode_is_stable(text, training):
    """Whitespace is normalised (one space between words, a line end per `<eos>`), so decoding is not
    the identity, but encoding the decoded text gives the same ids."""
    for eos in ("line", "none"):
        tokenizer = Tokenizer.fit(text if training is None else training, level="word", eos=eos)
        ids = tokenizer.encode(text)
        assert tokenizer.encode(tokenizer.decode(ids)) == ids


# -- reverse_text ---------------------------------------------------------------------------------------

@PROFILE
@given(TEXT_LINES)
def test_char_reverse_twice_is_the_text(text):
    once = reverse_text(text, level="char")
    assert reverse_text(once, level="char") == text
    tokenizer = Tokenizer.fit(text, level="char")
    # What `model.direction: bi` relies on: the backward stream is the forward one flipped.
    assert stream_ids(tokenizer, once).tolist() == stream_ids(tokenizer, text).tolist()[::-1]


@PROFILE
@given(ANY_TEXT)
def test_char_reverse_twice_without_eos(text):
    assert reverse_text(reverse_text(text, level="char", eos="none"), level="char", eos="none") == text


@PROFILE
@given(ANY_TEXT)
def test_word_reverse_twice_gives_the_same_ids(text):
    for eos in ("line", "none"):
        tokenizer = Tokenizer.fit(text, level="word", eos=eos)
        once = reverse_text(text, level="word", eos=eos)
        twice = reverse_text(once, level="word", eos=eos)
        assert tokenizer.encode(twice) == tokenizer.encode(text)
        if eos == "line":
            assert stream_ids(tokenizer, once).tolist() == stream_ids(tokenizer, text).tolist()[::-1]


# -- the config loader -------------------------------------------------------------------------------------

FIELD_NAMES = sorted({key.partition(".")[2] for key in all_keys()})
KEYS = st.one_of(st.sampled_from(FIELD_NAMES), st.sampled_from(list(SECTIONS)), st.text(max_size=12))
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=20),
                    st.sampled_from(["char", "word", "lstm", "gru", "cpu", "cuda", "1e-3", "0.5", "corpus.txt"]))
TREES = st.recursive(SCALARS, lambda children: st.one_of(st.lists(children, max_size=4),
                                                          st.dictionaries(KEYS, children, max_size=5)), max_leaves=20)
# Documents shaped like a config (sections of known keys) as well as anything at all.
SECTIONED = st.dictionaries(st.one_of(st.sampled_from(list(SECTIONS)), st.text(max_size=8)),
                            st.one_of(st.dictionaries(KEYS, TREES, max_size=6), TREES), max_size=4)
# Documents of the real sections and keys, each with an arbitrary value: they reach the type checks,
# the validation and the path handling.
CONFIG_LIKE = st.fixed_dictionaries({}, optional={
    name: st.dictionaries(st.sampled_from([f.name for f in dataclasses.fields(cls)]), st.one_of(SCALARS, TREES),
                          max_size=6)
    for name, cls in SECTIONS.items()})
VALID = "data:\n  path: corpus.txt\ntrain:\n  max_steps: 3\n"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("configs")


def loads_or_config_error(path, overrides=()):
    try:
        result = load_config(path, list(overrides))
    except ConfigError as error:
        message = str(error)
        assert message.strip() and "\n" not in message.strip(), repr(message)  # one line for the CLI
        return None
    assert isinstance(result, Config)
    return result


@PROFILE
@given(st.one_of(CONFIG_LIKE, SECTIONED, TREES))
@example(tree={"data": {"path": "corpus\x00.txt"}, "train": {"max_steps": 3}})  # a NUL in a path
@example(tree={"model\n": {}})  # a line end in a name the message repeats
@example(tree={"model": {"hidden\nsize": 3}})
def test_config_from_any_yaml_document(folder, tree):
    path = folder / "document.yaml"
    path.write_text(yaml.safe_dump(tree, allow_unicode=True), encoding="utf-8")
    loads_or_config_error(path)


@PROFILE
@given(st.one_of(st.text(), st.binary()))
@example(content="\x1b[0m")  # a control character YAML does not allow (here an ANSI escape)
def test_config_from_any_file_content(folder, content):
    path = folder / "raw.yaml"
    if isinstance(content, str):
        path.write_text(content, encoding="utf-8", newline="")
    else:
        path.write_bytes(content)
    loads_or_config_error(path)


OVERRIDES = st.one_of(
    st.text(),
    st.builds(lambda key, value: f"{key}={value}", st.sampled_from(all_keys()), st.text()),
    st.builds(lambda key, value: f"{key}={value}", st.sampled_from(all_keys()),
              SCALARS.map(lambda value: yaml.safe_dump(value, default_flow_style=True).removesuffix("\n...\n")
                          .strip())),
)


@PROFILE
@given(OVERRIDES)
@example(override="model.hidden\nsize=3")
def test_config_from_any_override(folder, override):
    path = folder / "valid.yaml"
    path.write_text(VALID, encoding="utf-8")
    assert loads_or_config_error(path) is not None
    loads_or_config_error(path, [override])


# -- split_points ---------------------------------------------------------------------------------------

FRACTIONS = st.lists(st.floats(min_value=-0.5, max_value=1.5, allow_nan=False), min_size=1, max_size=4)


def check_bounds(text: str, fractions: list[float], long_line: int | None) -> None:
    bounds = split_points(text, fractions)
    assert len(bounds) == len(fractions) + 1
    assert bounds[0] == 0 and bounds[-1] == len(text)
    assert all(a <= b for a, b in zip(bounds, bounds[1:])), bounds
    for bound in bounds[1:-1]:
        if bound in (0, len(text)) or text[bound - 1] == "\n":
            continue
        # Inside a line only when that line is longer than LONG_LINE (a corpus of one long line).
        start, end = text.rfind("\n", 0, bound) + 1, text.find("\n", bound)
        line_length = (len(text) if end < 0 else end) - start
        assert long_line is not None and line_length > long_line, (text, fractions, bounds)


@PROFILE
@given(ANY_TEXT, FRACTIONS)
def test_split_points_cut_at_line_ends(text, fractions):
    check_bounds(text, fractions, getattr(data, "LONG_LINE", None))


@PROFILE
@given(st.text(alphabet=st.sampled_from("ab \n"), max_size=60), FRACTIONS)
def test_split_points_with_short_long_lines(text, fractions):
    """The same with LONG_LINE lowered to 4, so that cuts inside long lines happen at all."""
    if not hasattr(data, "LONG_LINE"):
        pytest.skip("split_points never cuts inside a line here")
    with mock.patch.object(data, "LONG_LINE", 4):
        check_bounds(text, fractions, 4)


@PROFILE
@given(st.lists(st.text(alphabet=string.ascii_lowercase + " ", max_size=30), min_size=1, max_size=30),
       st.floats(min_value=0.05, max_value=0.95))
def test_split_points_keep_every_line_whole(lines, fraction):
    text = "".join(line + "\n" for line in lines)
    bounds = split_points(text, [fraction, 1 - fraction])
    parts = [text[a:b] for a, b in zip(bounds, bounds[1:])]
    assert "".join(parts) == text
    assert all(part == "" or part.endswith("\n") for part in parts)
