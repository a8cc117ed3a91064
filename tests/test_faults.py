"""The fault matrix (scripts/fault_matrix.py), sampled: every stage of the tiny demo stopped once, at its boundary
or inside, by SIGKILL or SIGTERM, and rerun, ends with the uninterrupted run's results.json, student and losses,
and leaves no half-written checkpoint. The script runs the whole matrix; the README shows what it found."""
import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "scripts"))
import fault_matrix  # noqa: E402


def test_the_sample_stops_every_stage_with_both_signals_at_both_kinds_of_point():
    (planned,) = fault_matrix.sampled_plan().values()
    assert {fault.stage for fault, _ in planned} == {fault.stage for fault in fault_matrix.FAULTS}
    assert {(fault.where, signal) for fault, signal in planned} >= {
        ("boundary", "SIGKILL"), ("boundary", "SIGTERM"), ("inside", "SIGKILL"), ("inside", "SIGTERM"),
        ("saving", "SIGKILL")}


@pytest.mark.slow
def test_every_stage_survives_a_kill_or_a_preemption(tmp_path):
    matrix = fault_matrix.run_matrix(tmp_path, fault_matrix.sampled_plan())
    print("\n" + fault_matrix.table(matrix))
    assert fault_matrix.succeeded(matrix), fault_matrix.table(matrix) + f"\nlogs: {tmp_path}"
