"""anomaly.listing: names in a log line or an error."""

from anomaly.listing import some


def test_some_shows_the_first_names_and_counts_the_rest():
    assert some(["a", "b"]) == "a, b"
    assert some([f"p{i}" for i in range(12)]) == "p0, p1, p2, p3, p4, p5, p6, p7, p8, p9 and 2 more"
    assert some(["pump 7", "x,y"], quoted=True) == "'pump 7', 'x,y'"  # one name each, however written
    assert some(["a", "b", "c"], shown=1, quoted=True) == "'a' and 2 more"
    assert some([]) == ""
