"""The goals of `make bench-guidance` (training/digits/guidance.py) on made-up rows: the negative prompt's effect as
the drop in points of the negated digit's share against the teacher's, with its standard error (the fraction of each
method's own images of the digit removed beside it), the dial's distances and accuracies (the closeness of the
accuracy reported beside the goal), the DMD ablation's checks on its own rows, each method's unconditional mix of
digits, and bench-guidance-seeds' table of the goals over training seeds (training/digits/guidance_seeds.py)."""

from __future__ import annotations

import json

import pytest
import torch

from flash_core.files import write_json_atomic
from training.digits import guidance, guidance_seeds

NEGATIVE = "a handwritten digit seven"
IMAGES = 2000


def negative_rows(student_with: float, student_without: float) -> list[dict]:
    rows = [{"method": "teacher", "nfe": guidance.TEACHER_STEPS, "negative": NEGATIVE, "negated_share": 0.002,
             "negated_share_without": 0.066}]
    rows += [{"method": method, "nfe": nfe, "negative": NEGATIVE, "negated_share": with_, "negated_share_without": without}
             for nfe in guidance.STUDENT_NFES
             for method, with_, without in (("student", student_with, student_without), ("baseline", 0.026, 0.026))]
    return rows


def dial_rows(student_fd: float = 10.0, baseline_fd: float = 20.0, student_accuracy=None) -> list[dict]:
    teacher_accuracy = dict(zip(guidance.DIAL, (0.67, 0.87, 0.94, 0.97)))
    student_accuracy = student_accuracy or teacher_accuracy
    rows = []
    for w in guidance.DIAL:
        rows.append({"method": "teacher", "nfe": guidance.TEACHER_STEPS, "w": w, "negative": "",
                     "accuracy": teacher_accuracy[w], "frechet_to_teacher": None})
        for nfe in guidance.STUDENT_NFES:
            rows.append({"method": "student", "nfe": nfe, "w": w, "negative": "", "accuracy": student_accuracy[w],
                         "frechet_to_teacher": student_fd})
            rows.append({"method": "baseline", "nfe": nfe, "w": w, "negative": "", "accuracy": 0.85,
                         "frechet_to_teacher": baseline_fd})
    return rows


def test_the_negative_goal_is_the_drop_in_points_against_the_teachers_with_the_fractions_beside():
    checks = guidance.goals(negative_rows(0.002, 0.06) + dial_rows(), IMAGES)
    result = checks["negative"][f"{NEGATIVE} @4"]
    assert result["teacher_removed_points"] == pytest.approx(0.064) and result["student_removed_points"] == pytest.approx(0.058)
    assert result["points_ratio"] == pytest.approx(0.058 / 0.064) and result["met"] and checks["met"]
    beside = result["beside_the_goal"]
    assert beside["teacher_removed_fraction"] == pytest.approx(0.064 / 0.066)
    assert beside["student_removed_fraction"] == pytest.approx(0.058 / 0.06)
    assert (beside["teacher_share_without"], beside["student_share_without"]) == (0.066, 0.06)


def test_the_points_ratio_carries_its_binomial_standard_error():
    """Delta method, the four shares independent binomials over IMAGES each; four times the images halve it."""
    result = guidance.goals(negative_rows(0.002, 0.06) + dial_rows(), IMAGES)["negative"][f"{NEGATIVE} @2"]
    variance = lambda *shares: sum(p * (1 - p) / IMAGES for p in shares)
    expected = (variance(0.06, 0.002) + result["points_ratio"] ** 2 * variance(0.066, 0.002)) ** 0.5 / 0.064
    assert result["points_ratio_standard_error"] == pytest.approx(expected)
    quadrupled = guidance.goals(negative_rows(0.002, 0.06) + dial_rows(), 4 * IMAGES)["negative"][f"{NEGATIVE} @2"]
    assert quadrupled["points_ratio_standard_error"] == pytest.approx(expected / 2)


def test_a_student_with_fewer_of_the_digit_to_begin_with_misses_the_goal_though_it_removes_all_of_its_own():
    """It removes all of its own sevens, but only 3.6 of the teacher's 6.4 points."""
    result = guidance.goals(negative_rows(0.0, 0.036) + dial_rows(), IMAGES)["negative"][f"{NEGATIVE} @4"]
    assert not result["met"] and result["points_ratio"] == pytest.approx(0.036 / 0.064)
    assert result["beside_the_goal"]["student_removed_fraction"] == 1.0


def test_the_unconditional_mix_gives_every_digits_share_and_the_total_variation_to_the_teacher():
    mix = guidance.unconditional_mix({"teacher@25": torch.tensor([0, 0, 7, 8]), "student@2": torch.tensor([0, 8, 8, 8])},
                                     "teacher@25")
    assert mix["teacher@25"]["digit_shares"] == [0.5, 0, 0, 0, 0, 0, 0, 0.25, 0.25, 0]
    assert mix["student@2"]["digit_shares"][8] == 0.75 and mix["teacher@25"]["total_variation_to_teacher"] == 0
    assert mix["student@2"]["total_variation_to_teacher"] == pytest.approx(0.5)  # a quarter of zeros, all the sevens


@pytest.mark.parametrize("with_,without", [(0.03, 0.066), (0.026, 0.026), (0.0, 0.0)])
def test_a_weak_or_absent_effect_misses_the_goal(with_, without):
    checks = guidance.goals(negative_rows(with_, without) + dial_rows(), IMAGES)
    result = checks["negative"][f"{NEGATIVE} @2"]
    assert not result["met"] and not checks["met"]


def test_the_dial_needs_the_student_nearer_than_the_baseline_and_accuracy_moving_the_teachers_way():
    assert guidance.goals(negative_rows(0.002, 0.06) + dial_rows(), IMAGES)["dial"]["@4"]["met"]
    farther = guidance.goals(negative_rows(0.002, 0.06) + dial_rows(student_fd=25.0), IMAGES)["dial"]["@4"]
    assert not farther["met"] and farther["nearer_than_baseline"] == {str(w): False for w in guidance.DIAL}
    flat = dict(zip(guidance.DIAL, (0.97, 0.97, 0.97, 0.97)))  # does not move with w as the teacher's does
    checks = guidance.goals(negative_rows(0.002, 0.06) + dial_rows(student_accuracy=flat), IMAGES)["dial"]["@2"]
    assert not checks["accuracy_same_direction"] and not checks["met"]
    assert checks["beside_the_goal"]["largest_accuracy_gap"] == pytest.approx(0.30)


def test_closeness_to_the_teachers_accuracy_is_reported_beside_the_goal_not_in_it():
    lower = dict(zip(guidance.DIAL, (0.51, 0.78, 0.91, 0.95)))  # rises with w, 16 points under at w 1.5
    checks = guidance.goals(negative_rows(0.002, 0.06) + dial_rows(student_accuracy=lower), IMAGES)
    assert checks["met"] and checks["dial"]["@4"]["met"]
    beside = checks["dial"]["@4"]["beside_the_goal"]
    assert not beside["accuracy_within_10_points"] and beside["largest_accuracy_gap"] == pytest.approx(0.16)


def test_the_dmd_ablation_is_checked_on_its_own_rows():
    rows = dial_rows()
    other = [{**r, "frechet_to_teacher": 30.0} for r in rows if r["method"] == "student" and r["nfe"] == 2]
    other += [r for r in rows if r["method"] == "student" and r["nfe"] == 4]
    checks = guidance.dial_checks(rows, other)
    assert checks["@4"]["met"] and not checks["@2"]["met"]
    assert guidance.dial_checks(rows)["@2"]["met"]


def _write_run(folder, seed: int, student_fd: float, per_digit: int = 50, student_accuracy=None) -> None:
    """One bench-guidance run's summary.json and results.json, as guidance.main writes them, from made-up rows."""
    rows = negative_rows(0.002, 0.06) + dial_rows(student_fd=student_fd, student_accuracy=student_accuracy)
    folder.mkdir(parents=True, exist_ok=True)
    write_json_atomic(folder / "results.json", rows)
    students = {"baseline": {"total_steps": 500, "seed": seed}, "student": {"total_steps": 500, "seed": seed}}
    write_json_atomic(folder / "summary.json", {
        "seed": seed, "per_digit": per_digit, "negative_images": IMAGES, "teacher_steps": guidance.TEACHER_STEPS,
        "negative_w": guidance.NEGATIVE_W, "students": students, "goals": guidance.goals(rows, IMAGES)})


def test_the_seed_replicates_report_each_goal_cell_per_seed_and_the_smallest(tmp_path):
    """bench-guidance-seeds: the full run (seed 0) and the replicates under seeds/ read into one table; a replicate
    whose student is farther from the teacher than the baseline shows as a missed cell and a seed not met; the
    negative's own-share fraction stands beside the goals."""
    _write_run(tmp_path, 0, student_fd=10.0)
    _write_run(tmp_path / "seeds" / "seed1", 1, student_fd=16.0)
    _write_run(tmp_path / "seeds" / "seed2", 2, student_fd=25.0,  # the baseline's 20.0 is nearer
               student_accuracy=dict(zip(guidance.DIAL, (0.97, 0.9, 0.8, 0.7))))  # falls as the teacher's rises
    result = guidance_seeds.aggregate(tmp_path)
    assert result["seeds"] == [0, 1, 2] and result["met_per_seed"] == {"0": True, "1": True, "2": False}
    cell = result["cells"]["dial @2 w 3"]
    assert cell["met_in"] == 2 and cell["smallest"] == pytest.approx(20.0 / 25.0)
    assert [cell["values"][s]["value"] for s in "012"] == pytest.approx([2.0, 20.0 / 16.0, 0.8])
    assert result["cells"]["negative seven @2"]["smallest"] == pytest.approx(0.058 / 0.064)
    beside = result["cells"]["negative seven @2, own share removed vs teacher's"]  # not a goal: counts in no seed
    assert beside["met_in"] is None and beside["smallest"] == pytest.approx((0.058 / 0.06) / (0.064 / 0.066))
    table = (tmp_path / "seeds.md").read_text()
    assert "| dial @2 w 3 | 2.00 | 1.25 | 0.80 (missed) | 2 of 3 |" in table
    assert "| dial @4 accuracy direction | +0.300 | +0.300 | -0.270 (missed) | 2 of 3 |" in table
    assert json.loads((tmp_path / "seeds.json").read_text()) == result


def test_seed_replicates_run_with_other_settings_are_refused_naming_the_file(tmp_path):
    _write_run(tmp_path, 0, student_fd=10.0)
    _write_run(tmp_path / "seeds" / "seed1", 1, student_fd=10.0, per_digit=20)
    with pytest.raises(SystemExit, match=r"seed1/summary.json \(seed 1\) was run with other settings \(per_digit\)"):
        guidance_seeds.aggregate(tmp_path)


def test_the_students_of_a_run_with_and_without_the_lora_average():
    base = guidance.StudentSettings()
    plain = guidance.students_of_run(base)
    assert plain["student"][1] == {"guidance_mode": "cfg"}  # what the committed default run trained
    assert list(plain) == ["baseline", "student", "dmd_ablation"] and plain["dmd_ablation"][1]["dmd_weights"]
    averaged = guidance.students_of_run(base, ema_decay=0.99)
    assert averaged["student"][1] == {"guidance_mode": "cfg", "ema_decay": 0.99}
    assert averaged["ema_ablation"] == (averaged["student"][0], {"guidance_mode": "cfg"})  # the same, unaveraged
    assert list(guidance.students_of_run(base, 0.99, goals_only=True)) == ["baseline", "student"]
