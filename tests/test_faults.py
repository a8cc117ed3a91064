"""The fault matrix (scripts/fault_matrix.py), half of it: every stage of the tiny demo, at its boundary and inside,
stopped by SIGKILL or SIGTERM and rerun, ends with the uninterrupted run's results.json, student and losses."""
import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "scripts"))
import fault_matrix  # noqa: E402


def test_the_interleaved_plan_covers_every_stage_with_both_signals():
    plan = fault_matrix.interleaved_plan()
    assert sorted(plan["SIGKILL"] + plan["SIGTERM"], key=fault_matrix.FAULTS.index) == list(fault_matrix.FAULTS)
    for name, faults in plan.items():
        assert {fault.stage for fault in faults} == {fault.stage for fault in fault_matrix.FAULTS}, name


@pytest.mark.slow
def test_every_stage_survives_a_kill_and_a_preemption(tmp_path):
    matrix = fault_matrix.run_matrix(tmp_path, fault_matrix.interleaved_plan())
    print("\n" + fault_matrix.table(matrix))
    assert fault_matrix.succeeded(matrix), fault_matrix.table(matrix) + f"\nlogs: {tmp_path}"
