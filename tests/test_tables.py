"""The one markdown table writer (mosaic_jax/evaluation/tables.py)."""

import pytest

from mosaic_jax.evaluation import tables


def test_compact_table_sets_alignment_and_escapes_pipes():
    text = tables.markdown_table(["class", "AP"], [["a|b", 0.5], ["c", "n/a"]],
                                 ["left", "right"])
    assert text == ("| class | AP |\n"
                    "|---|---:|\n"
                    "| a\\|b | 0.5 |\n"
                    "| c | n/a |\n")


def test_padded_table_pads_every_column_to_its_widest_cell():
    lines = tables.table_lines(["a", "bb"], [[1, "x"], ["long", 2]], padded=True)
    assert lines == ["| a    | bb |",
                     "|------|----|",
                     "| 1    | x  |",
                     "| long | 2  |"]
    assert len({len(line) for line in lines}) == 1


def test_a_table_without_rows_is_its_header():
    assert tables.table_lines(["x"], []) == ["| x |", "|---|"]


def test_bad_shapes_and_alignments_are_refused_with_their_reason():
    with pytest.raises(ValueError, match="table row 1 has 1 cells for 2 columns"):
        tables.table_lines(["a", "b"], [[1, 2], [3]])
    with pytest.raises(ValueError, match="'left' or 'right' for each of the 2 columns"):
        tables.table_lines(["a", "b"], [], ["left"])
    with pytest.raises(ValueError, match="'left' or 'right'"):
        tables.table_lines(["a"], [], ["center"])
    with pytest.raises(ValueError, match="no alignment marks"):
        tables.table_lines(["a"], [], ["left"], padded=True)
