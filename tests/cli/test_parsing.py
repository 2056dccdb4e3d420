"""The parsers of option strings: lists, points and sizes, each a one-line error naming its flag
when the text does not fit."""

import pytest

from debiformer.cli.export import parse_resolution
from debiformer.cli.parsing import names, sides
from debiformer.cli.show import parse_point, parse_size
from debiformer.errors import UserError


def test_lists_are_repeated_or_comma_separated():
    assert names(["1.1,3.2", " all ", ",", "4.1"]) == ["1.1", "3.2", "all", "4.1"]


@pytest.mark.parametrize(
    ("text", "parsed"),
    [("224", (224,)), ("33x47", (33, 47)), ("33X47", (33, 47)), (" 33 x 47 ", (33, 47))],
)
def test_sides_are_n_or_h_by_w(text, parsed):
    assert sides(text) == parsed


@pytest.mark.parametrize("text", ["", "x", "224x224x3", "-32", "32.5", "ax3"])
def test_other_texts_are_no_sides(text):
    assert sides(text) is None


def test_resolution_is_a_square_side_or_a_pair():
    assert parse_resolution("224") == 224
    assert parse_resolution("33x47") == (33, 47)
    with pytest.raises(UserError, match=r"^--resolution takes H or HxW .*; got '224x'$"):
        parse_resolution("224x")


def test_query_is_a_point_in_pixels():
    assert parse_point("120,80.5") == (120.0, 80.5)
    for bad in ("120", "1,2,3", "a,b"):
        with pytest.raises(UserError, match=rf"^--query '{bad}': expected X,Y in pixels"):
            parse_point(bad)


def test_size_is_the_shorter_side_or_h_by_w():
    assert parse_size("64") == 64
    assert parse_size("97x131") == (97, 131)
    for bad in ("0", "64x0", "big", "1x2x3"):
        with pytest.raises(UserError, match=rf"^--size '{bad}': expected N \(the shorter side\)"):
            parse_size(bad)
