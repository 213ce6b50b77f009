"""`--verify choice`: a free answer to a multiple-choice question is right when it names the gold choice only."""

import pytest

from curate.verify import verify

pytestmark = pytest.mark.fast

ARC = {"choices": [" a thermometer", " a ruler", " heat", " heat energy"], "gold": 0}


def test_an_answer_in_a_sentence_that_names_the_gold_choice_is_right():
    assert verify("choice", "The best tool is A Thermometer.", "a thermometer", ARC).verified is True
    assert verify("choice", "I would measure it with a thermometer.", "a thermometer", ARC).verified is True


def test_naming_another_choice_too_or_not_the_gold_is_wrong():
    both = verify("choice", "Use a thermometer or a ruler.", "a thermometer", ARC)
    assert both.verified is False and "a ruler" in both.reason
    in_passing = verify("choice", "The best tool is a thermometer, which measures heat.", "a thermometer", ARC)
    assert in_passing.verified is False and "heat" in in_passing.reason
    assert verify("choice", "A ruler.", "a thermometer", ARC).verified is False


def test_a_choice_inside_the_gold_choice_does_not_count_against_it():
    gold_is_longer = {**ARC, "gold": 3}
    assert verify("choice", "It gives off heat energy.", "heat energy", gold_is_longer).verified is True
    assert verify("choice", "It gives off heat.", "heat energy", gold_is_longer).verified is False


def test_rows_without_choices_are_left_unchecked():
    assert verify("choice", "anything", "x", {}).verified is None
