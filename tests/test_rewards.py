"""The planning tasks' rewards (d1's rules), each branch against a table of cases."""
import pytest

import toy_dllm

@pytest.mark.parametrize("numbers,target,text,reward,branch", [
    ([3, 5, 7], 22, "3*5+7", 1.0, "right"),
    ([3, 5, 7], 22, " 7 + 5 * 3 ", 1.0, "right, in another order, with spaces"),
    ([3, 3, 6], 12, "6+3+3", 1.0, "right, a number given twice used twice"),
    ([3, 5, 7], 22, "3*7+5", 0.1, "each number once, but the wrong value (26)"),
    ([3, 5, 7], 22, "5*3+7+3-3", 0.1, "the right value, a number used twice"),
    ([3, 5, 7], 22, "15+7", 0.1, "the right value, numbers not the given ones"),
    ([3, 5, 7], 22, "3*5", 0.1, "a number missing"),
    ([3, 3, 6], 1, "6/(3-3)", 0.1, "division by zero"),
    ([3, 5, 7], 22, "3*(5+7", 0.1, "malformed: a parenthesis left open"),
    ([3, 5, 7], 22, "3*5+07", 0.1, "malformed: a leading zero"),
    ([3, 5, 7], 22, "3**5+7", 0.1, "not arithmetic: a power"),
    ([3, 5, 7], 22, "__import__('os')", 0.1, "not arithmetic at all"),
    ([3, 5, 7], 22, "3*5+7=22", 0.1, "more than the expression"),
    ([3, 5, 7], 22, "", 0.0, "no answer"),
    ([3, 5, 7], 22, "   ", 0.0, "no answer, only spaces"),
])
def test_countdown_reward_takes_each_branch_of_the_rule(numbers, target, text, reward, branch):
    assert toy_dllm.countdown_reward(numbers, target, text) == reward, branch


def test_countdown_reward_checks_the_value_to_within_1e_5():
    assert toy_dllm.countdown_reward([1, 3, 3], 0.1 / 0.3 + 1, "1+1/3*3") == 0.1  # = 2
    assert toy_dllm.countdown_reward([2, 3, 4], 2 / 3 + 4, "2/3+4") == 1.0


def test_sudoku_reward_is_the_share_of_blanks_right():
    puzzle, solution = "1030" "0400" "2001" "0020", "1234" "3412" "2341" "4123"
    blanks = [i for i, c in enumerate(puzzle) if c == "0"]
    assert toy_dllm.sudoku_reward(puzzle, solution, solution) == 1.0
    wrong_given = "4" + solution[1:]            # a given cell wrong: not counted
    assert toy_dllm.sudoku_reward(puzzle, solution, wrong_given) == 1.0
    one_off = solution[:blanks[0]] + "9" + solution[blanks[0] + 1:]
    assert toy_dllm.sudoku_reward(puzzle, solution, one_off) == (len(blanks) - 1) / len(blanks)
    assert toy_dllm.sudoku_reward(puzzle, solution, solution[:8]) == sum(i < 8 for i in blanks) / len(blanks)
    assert toy_dllm.sudoku_reward(puzzle, solution, solution + "1234") == 1.0   # cut to 16
    assert toy_dllm.sudoku_reward(puzzle, solution, " ".join(solution)) == 1.0  # spaces dropped
    assert toy_dllm.sudoku_reward(puzzle, solution, "") == 0.0
