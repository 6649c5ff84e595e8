import pytest

from retrieval.errors import StarbucksError
from retrieval.sizes import Size, SizeList, parse_size

PAPER = [
    ("demi", 2, 32),
    ("short", 4, 64),
    ("tall", 6, 128),
    ("grande", 8, 256),
    ("venti", 10, 512),
    ("trenta", 12, 768),
]


def paper_sizes():
    return SizeList.from_config([{"name": n, "layers": layers, "dim": d} for n, layers, d in PAPER])


def test_parse_name_and_lxd():
    sizes = paper_sizes()
    assert sizes.get("grande") == Size("grande", 8, 256)
    assert sizes.get("8x256").name == "grande"  # a configured size keeps its name
    assert sizes.get("7X100") == Size("", 7, 100)
    assert parse_size("3x48").name == "3x48" and parse_size("3x48").key == "3x48"


def test_unknown_size_names_the_choices():
    with pytest.raises(StarbucksError, match="unknown size 'huge'.*demi, short"):
        paper_sizes().get("huge")


def test_largest_and_select():
    sizes = paper_sizes()
    assert sizes.largest == Size("trenta", 12, 768)
    assert [s.name for s in sizes.select("demi,10x512")] == ["demi", "venti"]
    assert sizes.select("all") is sizes


def test_validate_against_model_names_both_numbers():
    with pytest.raises(StarbucksError, match="grande .* asks for 8 layers but the model has only 6"):
        paper_sizes().validate(num_layers=6, hidden=768)
    with pytest.raises(StarbucksError, match="asks for 768 dims but .* has only 384"):
        SizeList([Size("x", 6, 768)]).validate(num_layers=6, hidden=384)
    SizeList([Size("x", 6, 384)]).validate(num_layers=6, hidden=384)


def test_bad_entries():
    with pytest.raises(StarbucksError, match="sizes\\[1\\]"):
        SizeList.from_config([{"layers": 1, "dim": 8}, {"layers": 2}])
    with pytest.raises(StarbucksError, match="used twice"):
        SizeList.from_config(["2x8", "2x8"])
    with pytest.raises(StarbucksError, match="empty"):
        SizeList.from_config([])
    with pytest.raises(StarbucksError):
        Size("zero", 0, 8)
