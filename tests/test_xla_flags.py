"""kdep_jax.xla_flags: the measured defaults are added, and a value the user set is left alone."""
import os

from kdep_jax import xla_flags


def test_defaults_are_added_to_other_flags():
    environ = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    xla_flags.apply_defaults(environ)
    flags = environ["XLA_FLAGS"].split()
    assert flags[0] == "--xla_force_host_platform_device_count=2"
    assert {f"--{name}={value}" for name, value in xla_flags.DEFAULTS.items()} <= set(flags)


def test_a_flag_the_user_set_wins_and_applying_twice_changes_nothing():
    environ = {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=-dot"}
    xla_flags.apply_defaults(environ)
    xla_flags.apply_defaults(environ)
    assert environ["XLA_FLAGS"].split().count("--xla_cpu_experimental_ynn_fusion_type=-dot") == 1
    assert "--xla_cpu_experimental_ynn_fusion_type=dot" not in environ["XLA_FLAGS"].split()


def test_the_suite_runs_with_the_defaults():
    assert all(f"--{name}={value}" in os.environ["XLA_FLAGS"].split() for name, value in xla_flags.DEFAULTS.items())
