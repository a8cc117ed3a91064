"""kdep_jax.xla_flags: the defaults follow the CPU's instruction set, and a value the user set is left alone."""
import os

from kdep_jax import xla_flags

# The first processor of /proc/cpuinfo on the two CPU families the project runs on (flags lines abridged).
AMD_AVX2_CPUINFO = """processor	: 0
vendor_id	: AuthenticAMD
cpu family	: 23
model name	: AMD EPYC Processor
flags		: fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr sse sse2 ht \
syscall nx mmxext fxsr_opt pdpe1gb rdtscp lm rep_good nopl cpuid extd_apicid tsc_known_freq pni pclmulqdq ssse3 fma \
cx16 sse4_1 sse4_2 x2apic movbe popcnt aes xsave avx f16c rdrand hypervisor lahf_lm cmp_legacy abm sse4a misalignsse \
3dnowprefetch fsgsbase bmi1 avx2 smep bmi2 rdseed adx smap clflushopt clwb sha_ni xsaveopt xsavec xgetbv1 clzero xsaveerptr

processor	: 1
flags		: fpu avx avx2
"""

INTEL_AMX_CPUINFO = """processor	: 0
vendor_id	: GenuineIntel
cpu family	: 6
model name	: Intel(R) Xeon(R) Processor
flags		: fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr sse sse2 ss ht \
syscall nx pdpe1gb rdtscp lm constant_tsc rep_good nopl xtopology nonstop_tsc cpuid tsc_known_freq pni pclmulqdq ssse3 \
fma cx16 pcid sse4_1 sse4_2 x2apic movbe popcnt aes xsave avx f16c rdrand hypervisor avx2 bmi2 avx512f avx512dq \
avx512cd avx512bw avx512vl avx_vnni avx512_bf16 avx512vbmi avx512_vnni amx_bf16 avx512_fp16 amx_tile amx_int8
"""

YNN = "xla_cpu_experimental_ynn_fusion_type"


def test_cpu_features_come_from_the_first_flags_line():
    assert {"avx2", "fma", "sha_ni"} <= xla_flags.cpu_features(AMD_AVX2_CPUINFO)
    assert "avx512f" not in xla_flags.cpu_features(AMD_AVX2_CPUINFO)
    assert {"avx512f", "amx_bf16", "amx_tile"} <= xla_flags.cpu_features(INTEL_AMX_CPUINFO)
    assert xla_flags.cpu_features("processor : 0\nFeatures : fp asimd\n") == frozenset()  # not x86: generic


def test_x86_cpus_with_avx2_and_fma_get_the_measured_defaults():
    for cpuinfo in (AMD_AVX2_CPUINFO, INTEL_AMX_CPUINFO):
        assert xla_flags.avx2_fma(cpuinfo)
        assert xla_flags.defaults(cpuinfo) == xla_flags.AVX2_FMA_DEFAULTS
    assert xla_flags.AVX2_FMA_DEFAULTS[YNN].split(",") == ["dot", "reduce"]
    assert xla_flags.AVX2_FMA_DEFAULTS["xla_cpu_enable_concurrency_optimized_scheduler"] == "false"


def test_other_cpus_keep_the_generic_defaults():
    older_x86 = "processor : 0\nflags : fpu sse4_2 avx f16c\n"  # AVX without AVX2 and FMA
    for cpuinfo in (older_x86, "processor : 0\nFeatures : fp asimd\n", ""):
        assert not xla_flags.avx2_fma(cpuinfo)
        assert xla_flags.defaults(cpuinfo) == xla_flags.DEFAULTS == {YNN: "dot"}


def test_defaults_are_added_to_other_flags():
    for cpuinfo in (AMD_AVX2_CPUINFO, INTEL_AMX_CPUINFO):
        environ = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
        xla_flags.apply_defaults(environ, cpuinfo)
        flags = environ["XLA_FLAGS"].split()
        assert flags[0] == "--xla_force_host_platform_device_count=2"
        assert {f"--{name}={value}" for name, value in xla_flags.defaults(cpuinfo).items()} == set(flags[1:])


def test_a_flag_the_user_set_wins_and_applying_twice_changes_nothing():
    for cpuinfo in (AMD_AVX2_CPUINFO, INTEL_AMX_CPUINFO):
        environ = {"XLA_FLAGS": f"--{YNN}=-dot"}
        xla_flags.apply_defaults(environ, cpuinfo)
        xla_flags.apply_defaults(environ, cpuinfo)
        flags = environ["XLA_FLAGS"].split()
        assert flags.count(f"--{YNN}=-dot") == 1
        assert not any(flag.startswith(f"--{YNN}=") and flag != f"--{YNN}=-dot" for flag in flags)


def test_the_suite_runs_with_this_machines_defaults():
    flags = os.environ["XLA_FLAGS"].split()
    assert all(f"--{name}={value}" in flags for name, value in xla_flags.defaults().items())
