"""Pareto utility: simplex grid enumeration, the non-dominated set, tables and the PNG."""
import json
import math
import subprocess
import sys

import pytest

from moelora.methods.pareto import ParetoFront, evaluate_preferences, non_dominated, simplex_grid


@pytest.mark.parametrize("n,steps", [(1, 3), (2, 4), (3, 4), (4, 2)])
def test_simplex_grid_count_and_sum(n, steps):
    grid = simplex_grid(n, steps)
    assert len(grid) == math.comb(steps + n - 1, n - 1)
    assert len(set(grid)) == len(grid)
    assert all(len(w) == n and abs(sum(w) - 1) < 1e-12 and min(w) >= 0 for w in grid)


def test_simplex_grid_order_and_errors():
    assert simplex_grid(2, 2) == [(1.0, 0.0), (0.5, 0.5), (0.0, 1.0)]
    with pytest.raises(ValueError, match="steps"):
        simplex_grid(2, 0)
    with pytest.raises(ValueError, match="num_objectives"):
        simplex_grid(0, 3)


def test_non_dominated_known_answer():
    points = [(1, 5), (2, 4), (2, 3), (3, 1), (0, 0), (3, 1), (1, 4), (float("nan"), 9)]
    # (2,3) < (2,4); (0,0) < all; (1,4) < (1,5); duplicates (3,1) both stay; NaN never on the front
    assert non_dominated(points) == [True, True, False, True, False, True, False, False]
    assert non_dominated([(1, 1, 1), (1, 1, 2), (2, 0, 0)]) == [False, True, True]
    with pytest.raises(ValueError):
        non_dominated([(1, 2), (1, 2, 3)])


def test_evaluate_preferences_front_tables_and_plot(tmp_path):
    # objective i is a concave function of w_i: every grid point is on the front
    # (sqrt(w), sqrt(1 - w) is a strictly decreasing trade-off), plus a dominated "bad" scorer case
    calls = []

    def apply(w):
        calls.append(("apply", w))
        return lambda: calls.append(("undo", w))

    front = evaluate_preferences(simplex_grid(2, 4), {"a": lambda w: math.sqrt(w[0]), "b": lambda w: math.sqrt(w[1])},
                                 apply=apply)
    assert len(front.preferences) == 5 and all(front.front)
    assert calls[:2] == [("apply", (1.0, 0.0)), ("undo", (1.0, 0.0))]
    # a mixture that is worse than both ends (a convex trade-off below the chord still stays on
    # the front; a point strictly inside does not)
    scores = {(1.0, 0.0): (1.0, 0.0), (0.5, 0.5): (0.4, 0.4), (0.0, 1.0): (0.0, 1.0), (0.25, 0.75): (0.2, 0.3)}
    front2 = evaluate_preferences(list(scores), {"a": lambda w: scores[w][0], "b": lambda w: scores[w][1]})
    assert front2.front == [True, True, True, False]
    data = json.loads(open(front2.write_json(tmp_path / "f.json")).read())
    assert data["objectives"] == ["a", "b"] and data["rows"][3]["non_dominated"] is False
    assert data["rows"][1]["preference"] == [0.5, 0.5] and data["rows"][1]["a"] == 0.4
    md = open(front2.write_markdown(tmp_path / "f.md")).read().splitlines()
    assert md[0] == "| preference | a | b | non-dominated |" and len(md) == 6
    assert md[2].endswith("| yes |") and md[5].endswith("|  |")
    pytest.importorskip("matplotlib")
    png = front2.plot(tmp_path / "f.png", "a", "b")
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="unknown objective"):
        front2.plot(tmp_path / "g.png", "a", "c")


def test_evaluate_preferences_bad_scorers():
    with pytest.raises(ValueError):
        evaluate_preferences([(1.0,)], {})
    with pytest.raises(TypeError):
        evaluate_preferences([(1.0,)], {"a": 3})


def test_imports_without_matplotlib():
    code = ("import sys; sys.modules['matplotlib'] = None\n"
            "from moelora.methods.pareto import ParetoFront\n"
            "f = ParetoFront(['a'], [(1.0,)], [{'a': 1.0}])\n"
            "assert f.front == [True]\n"
            "try:\n    f.plot('x.png')\nexcept ImportError as e:\n    assert 'matplotlib' in str(e); print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ok"
