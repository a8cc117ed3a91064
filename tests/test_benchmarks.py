"""The arithmetic behind the figures that benchmarks/distill_step.py prints (the README's performance tables)."""
import argparse
import importlib.util
import json
import os
import subprocess
import sys

import pytest

_PATH = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "distill_step.py")
_SPEC = importlib.util.spec_from_file_location("distill_step", _PATH)
distill_step = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(distill_step)
_CPU_FORMS = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "cpu_forms.py")
sys.path.insert(0, os.path.dirname(_PATH))  # step_profile imports distill_step as its neighbour
import step_profile  # noqa: E402


def test_each_step_is_measured_against_its_own_flop_count():
    """The cached step skips the teacher, so its share of the FMA peak comes from its own FLOP count; PyTorch's
    configurations run the same online step as kdep_jax and take that step's count."""
    results = {"batch": 32, "fp32_peak_flops": 200e9,
               "kdep_jax_images_per_sec": 8.0, "kdep_jax_flops": 576e9,
               "kdep_jax_cached_images_per_sec": 16.0, "kdep_jax_cached_flops": 320e9,
               "pytorch_channels_last_images_per_sec": 4.0}
    shares = distill_step.peak_shares(results, ["kdep_jax", "kdep_jax_cached", "pytorch_channels_last",
                                                "pytorch_compile"], results["fp32_peak_flops"], "fma_peak_share")
    assert shares == {"kdep_jax_fma_peak_share": pytest.approx(576e9 / 4.0 / 200e9),
                      "kdep_jax_cached_fma_peak_share": pytest.approx(320e9 / 2.0 / 200e9),
                      "pytorch_channels_last_fma_peak_share": pytest.approx(576e9 / 8.0 / 200e9)}


def test_gpu_model_flop_utilisation_is_against_the_dense_tensor_core_peak():
    """On a GPU each step's MFU divides by the dense peak of its dtype, float32's being TF32's (the tensor cores run
    both frameworks' float32 convs); a GPU without a known peak gets none rather than a wrong one."""
    assert distill_step.gpu_peak_flops("NVIDIA H200", "bfloat16") == 989e12
    assert distill_step.gpu_peak_flops("NVIDIA H100 80GB HBM3", "float32") == 495e12
    assert distill_step.gpu_peak_flops("Tesla T4", "float32") is None
    results = {"batch": 256, "kdep_jax_images_per_sec": 2560.0, "kdep_jax_flops": 256 * 19e9}
    assert distill_step.peak_shares(results, ["kdep_jax"], 989e12, "mfu") == {
        "kdep_jax_mfu": pytest.approx(19e9 * 2560 / 989e12)}


def test_flop_count_includes_the_convolutions_that_run_as_custom_calls():
    """A 3x3 conv's forward pass, input gradient and weight gradient each count 2 FLOP per product of a valid tap,
    also where kdep_jax's C++ kernels (custom calls, which a compiled step's count leaves out) compute them."""
    import jax
    import jax.numpy as jnp

    from kdep_jax.models import layers

    conv = layers.conv2d(32, 3)
    images = jnp.ones((2, 16, 16, 16), jnp.float32)
    variables = conv.init(jax.random.key(0), images)
    step = jax.jit(jax.grad(lambda v, x: jnp.sum(conv.apply(v, x) ** 2), argnums=(0, 1)))
    valid_taps = (16 * 3 - 2) ** 2  # per image and channel pair: each row's and column's 3 taps, less the 2 padded
    assert distill_step.xla_flop_count(step, variables, images) == pytest.approx(3 * 2 * 2 * 16 * 32 * valid_taps,
                                                                                  rel=0.01)


@pytest.mark.slow
def test_step_flop_count_is_the_whole_steps_and_taken_on_the_cpu_for_a_gpu():
    """The count that a GPU's MFU divides (`--count-flops`, here asked for `--device gpu` on a machine without one: it
    is taken on the CPU) against PyTorch's FLOP counter on the same step in torchvision: ResNet-50's forward pass
    and ResNet-18's forward and backward passes. XLA counts only the taps inside the image and PyTorch every tap of
    the padded one, which at 224 px makes XLA's count 3.4% lower; a count without the backward pass or the teacher
    would be 37-42% lower."""
    import torch
    import torchvision
    from torch.utils.flop_counter import FlopCounterMode

    result = subprocess.run([sys.executable, _PATH, "--framework", "kdep_jax", "--count-flops", "--device", "gpu",
                             "--batch", "2", "--steps-per-call", "1", "--json"],
                            capture_output=True, text=True, timeout=300, env={**os.environ, "XLA_FLAGS": ""})
    assert result.returncode == 0, result.stderr[-3000:]
    xla_flops = json.loads(result.stdout.splitlines()[-1])["flops"]
    teacher = distill_step.pytorch_pre_relu_model(torchvision.models.resnet50()).eval()
    student = distill_step.pytorch_pre_relu_model(torchvision.models.resnet18()).train()
    images = torch.randn(2, 3, 224, 224)
    with FlopCounterMode(display=False) as counter:
        with torch.no_grad():
            targets = teacher(images)[:, :512]
        torch.nn.functional.mse_loss(student(images), targets).backward()
    assert 0.95 < xla_flops / counter.get_total_flops() < 1.0, (xla_flops, counter.get_total_flops())


def test_profile_counts_each_op_by_its_own_time_once():
    """A loop of 100 us on one thread holding two ops (30 and 50 us, one of them holding a 10 us custom call) owns
    20 us, the ops 20, 50 and 10; another thread's op and an op after the loop stand alone; the device's busy time is
    the sum of the threads' own times, each microsecond once. Two kernels of a GPU stream whose recorded times overlap
    by 1 us are one after the other, each owning its time. A custom call counts as the kernel it runs."""
    def op(name, ts, dur, tid=1):
        return {"ph": "X", "pid": 7, "tid": tid, "ts": ts, "dur": dur, "name": name, "args": {"hlo_op": name}}

    events = [op("fusion.2", 10, 30), op("while.1", 0, 100), op("ffi_call.3", 15, 10), op("fusion.4", 45, 50),
              op("copy.5", 100, 5), op("fusion.6", 20, 40, tid=2)]
    own = {event["name"]: time for event, time in step_profile.own_times(events)}
    assert own == {"while.1": 20, "fusion.2": 20, "ffi_call.3": 10, "fusion.4": 50, "copy.5": 5, "fusion.6": 40}
    stream = [op("kernel.8", 200, 10, tid=3), op("kernel.9", 209, 10, tid=3)]
    assert [time for _, time in step_profile.own_times(stream)] == [10, 10]
    hlo = ('  %ffi_call.3 = f32[2,8]{1,0} custom-call(f32[2,8]{1,0} %p), custom_call_target="kdep_conv", '
           'api_version=API_VERSION_TYPED_FFI\n  fusion.4 = f32[2]{0} fusion(f32[2]{0} %q), kind=kLoop\n'
           '  custom-call.7 = (f32[1]{0}) custom-call(), custom_call_target="__cudnn$convForward"\n')
    targets = step_profile.custom_call_targets(hlo)
    assert targets == {"ffi_call.3": "kdep_conv", "custom-call.7": "__cudnn$convForward"}
    trace = {"traceEvents": [{"ph": "M", "pid": 7, "name": "process_name", "args": {"name": "/host:CPU"}}, *events,
                             {"ph": "X", "pid": 7, "tid": 1, "ts": 0, "dur": 500, "name": "python"}]}
    lines = step_profile.summary(trace, steps=1, wall_seconds_per_step=2e-4, top=5, targets=targets)
    assert "wall 0.2 ms per step (profiled); device busy 0.1 ms per step, summed over 2 threads" in lines[0], lines
    assert lines[1].startswith("no op running for 0.0 ms per step"), lines
    assert lines[2].split()[-2:] == ["op", "kind"] and lines[3].split() == ["0.11", "75.9%", "3.0", "fusion"], lines
    assert lines[5].split() == ["0.01", "6.9%", "1.0", "kdep_conv"], lines
    assert lines[7].split()[-1] == "kernel" and "ffi_call.3 (kdep_conv)" in lines[-1], lines


def test_profile_counts_the_wait_after_an_op_to_it_on_a_cpu():
    """XLA:CPU's Eigen dots run after their op's event ends: the time in which no op runs on any thread is counted to
    the op that ended last before it (a dot's 0.1 ms event followed by 20 ms of its work). On a GPU the gaps between a
    stream's kernels are idle time, counted to no kernel."""
    def op(name, ts, dur, tid=1, pid=7):
        return {"ph": "X", "pid": pid, "tid": tid, "ts": ts, "dur": dur, "name": name, "args": {"hlo_op": name}}

    events = [op("fusion.1", 0, 100), op("dot.2", 50, 60, tid=2), op("dot.3", 120, 10), op("fusion.4", 150, 10),
              op("copy.5", 152, 3, tid=2), op("fusion.6", 165, 45)]
    assert [(event["name"], wait) for event, wait in step_profile.waits_after(events)] == [
        ("dot.2", 10), ("dot.3", 20), ("fusion.4", 5)]
    lines = step_profile.summary({"traceEvents": events}, steps=1, wall_seconds_per_step=2e-4, top=3)
    assert "device busy 0.2 ms per step" in lines[0] and lines[1].startswith("no op running for 0.0 ms per step"), lines
    assert lines[3].split() == ["0.16", "60.8%", "3.0", "fusion"], lines
    assert lines[4].split() == ["0.10", "38.0%", "2.0", "dot"], lines
    gpu = {"traceEvents": [{"ph": "M", "pid": 9, "name": "process_name", "args": {"name": "/device:GPU:0"}},
                           {"ph": "M", "pid": 9, "tid": 1, "name": "thread_name", "args": {"name": "Stream #14"}},
                           op("kernel_a", 0, 10, pid=9), op("kernel_b", 30, 10, pid=9)]}
    lines = step_profile.summary(gpu, steps=1, wall_seconds_per_step=5e-5, top=3)
    assert lines[1].split()[-2:] == ["op", "kind"] and lines[2].split()[:2] == ["0.01", "50.0%"], lines


def test_fp32_peak_from_cpuinfo():
    """cores x nominal clock x 2 FMA units x lanes (16 with AVX-512, 8 with AVX2 and on Zen 4, whose AVX-512 runs
    in 256-bit halves) x 2 FLOP per FMA."""
    cores = len(os.sched_getaffinity(0))

    def cpuinfo(vendor, family, mhz, flags):
        return (f"processor\t: 0\nvendor_id\t: {vendor}\ncpu family\t: {family}\ncpu MHz\t\t: {mhz}\n"
                f"flags\t\t: fpu sse {flags}\n")

    peak = distill_step.cpu_fp32_peak_flops
    assert peak(cpuinfo("GenuineIntel", 6, "2100.000", "avx2 avx512f amx_bf16"))[0] == pytest.approx(
        cores * 2.1e9 * 2 * 16 * 2)
    assert peak(cpuinfo("AuthenticAMD", 26, "2600.000", "avx2 avx512f"))[0] == pytest.approx(cores * 2.6e9 * 2 * 16 * 2)
    assert peak(cpuinfo("AuthenticAMD", 25, "2600.000", "avx2 avx512f"))[0] == pytest.approx(cores * 2.6e9 * 2 * 8 * 2)
    assert peak(cpuinfo("AuthenticAMD", 23, "2450.000", "avx2 fma"))[0] == pytest.approx(cores * 2.45e9 * 2 * 8 * 2)


def test_repeated_runs_give_each_figure_its_median_and_range(capsys):
    """--runs N: a figure's median and range over the runs, a ratio's from the runs' own ratios (not the ratio of
    the medians), and PyTorch's best configuration run by run; a figure some run lacks is left out."""
    images = [[20.6, 14.8], [21.7, 16.3], [21.6, 14.9]]  # kdep_jax, PyTorch's best (compile_freezing or channels_last)
    runs = [{"kdep_jax_images_per_sec": ours, "kdep_jax_peak_bytes": (1.45 + 0.02 * run) * 2**30,
             "pytorch_images_per_sec": theirs, "pytorch_peak_bytes": 2.1 * 2**30, "speedup_vs_pytorch": ours / theirs,
             "pytorch_best_config": ["compile_freezing", "channels_last", "compile_freezing"][run], "batch": 32}
            for run, (ours, theirs) in enumerate(images)]
    runs[1]["kdep_jax_cached_images_per_sec"] = 35.0
    summary = distill_step.summarise(runs)
    ratios = [ours / theirs for ours, theirs in images]
    assert summary["speedup_vs_pytorch"] == {"median": sorted(ratios)[1], "min": min(ratios), "max": max(ratios)}
    assert summary["speedup_vs_pytorch"]["median"] != pytest.approx(21.6 / 14.9)  # not the medians' ratio
    assert summary["kdep_jax_images_per_sec"] == {"median": 21.6, "min": 20.6, "max": 21.7}
    assert summary["kdep_jax_peak_bytes"]["max"] == pytest.approx(1.49 * 2**30)
    assert summary["pytorch_best_configs"] == ["compile_freezing", "channels_last", "compile_freezing"]
    assert "kdep_jax_cached_images_per_sec" not in summary and "batch" not in summary
    distill_step.print_summary(summary, argparse.Namespace(device="cpu"), ["channels_last", "compile_freezing"])
    report = capsys.readouterr().out
    assert "median of 3 runs (range):" in report, report
    assert "  kdep_jax: 21.60 (20.60-21.70) images/s, peak RSS 1.47 (1.45-1.49) GiB" in report, report
    assert "  PyTorch's best: 14.90 (14.80-16.30) images/s" in report, report
    assert (f"  kdep_jax / PyTorch's best = {sorted(ratios)[1]:.2f} ({min(ratios):.2f}-{max(ratios):.2f})x (best: "
            "compile_freezing, channels_last, compile_freezing)") in report, report


@pytest.mark.slow
def test_gpu_check_runs_the_step_benchmark_and_keeps_its_report(tmp_path):
    """benchmarks/gpu_check.sh, which a session lent a GPU runs, here with a tiny CPU step: the whole benchmark,
    kdep_jax online and with cached targets (2 steps per call) and PyTorch eager, each in its own process, then the
    report, kept in the part's log with its exit status (a report line that fails to print loses the figures of a
    device's run). A part it does not know is refused before anything runs."""
    script = os.path.join(os.path.dirname(_PATH), "gpu_check.sh")
    env = {**os.environ, "XLA_FLAGS": "", "OUT": str(tmp_path), "PYTHON": sys.executable,
           "STEP_ARGS": "--device cpu --student resnet18 --batch 2 --image-size 32 --warmup 0 --repeats 1 "
                        "--target-cache --pytorch-configs eager --steps-per-call 2",
           "PROFILE_ARGS": "--device cpu --batch 2 --image-size 32 --steps-per-call 2 --calls 1 --top 5"}
    refused = subprocess.run(["bash", script, "float64"], cwd=os.path.dirname(os.path.dirname(_PATH)), env=env,
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "unknown part 'float64'" in refused.stderr, refused.stderr
    assert not list(tmp_path.iterdir())
    result = subprocess.run(["bash", script, "float32", "profile"], cwd=os.path.dirname(os.path.dirname(_PATH)),
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    status = (tmp_path / "status.txt").read_text().splitlines()
    assert status[0].startswith("step_float32: exit status 0, ") and status[1].startswith("profile: exit status 0, "), \
        result.stdout
    profile = (tmp_path / "profile" / "summary.txt").read_text()
    assert "resnet50 -> resnet18, batch 2, 32 px, float32, cpu, 2 steps profiled (1 calls of 2)" in profile, profile
    assert "op kind" in profile and "ms per step" in profile, profile
    assert (tmp_path / "profile" / "perfetto_trace.json.gz").stat().st_size > 0
    report = (tmp_path / "step_float32.log").read_text()
    assert "kdep_jax input synthetic, 2 steps per call" in report, report
    for line in ("  kdep_jax: ", "  kdep_jax, cached targets: ", "  PyTorch eager (best): ", "kdep_jax / PyTorch eager = ",
                 "float32 FMA peak", "target cache: "):
        assert line in report, report
    assert report.count("of the float32 FMA peak") == 3, report


@pytest.mark.slow
def test_cpu_forms_benchmark_times_each_form_both_ways():
    """Two of the CPU-dependent forms, tiny: one on a distillation step, one on a forward pass. Each workload is
    timed with the form on and off, and the two variants' results agree to float32 rounding (the forms only reorder
    the arithmetic), the step's after one update, so through its backward pass (a second update diverges at this
    size: the student's last BatchNorms see 2 values per channel). A step form costs two compilations of a
    ResNet-50 step, the suite's longest: one is enough to test the harness, with the student that compiles fastest
    (the whole run with ResNet-18: 42 s of CPU time, with MobileNetV2 68 s; AMD EPYC Zen 4)."""
    result = subprocess.run(
        [sys.executable, _CPU_FORMS, "--form", "native_max_pool,pad_wide_kernels",
         "--workload", "step:resnet18,forward:efficientnet_lite0", "--step-batch", "2",
         "--forward-batch", "2", "--image-size", "32", "--warmup", "1", "--rounds", "1"],
        capture_output=True, text=True, timeout=600, env={**os.environ, "XLA_FLAGS": ""})
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line.split() for line in result.stdout.splitlines() if " on is " in line]
    assert [row[:2] for row in rows] == [["native_max_pool", "step:resnet18"],
                                         ["pad_wide_kernels", "forward:efficientnet_lite0"]], result.stdout
    for row in rows:
        assert float(row[row.index("on") + 1]) > 0 and float(row[row.index("off") + 1]) > 0, row
        assert float(row[row.index("by") + 1]) < 1e-5, row


def test_cpu_forms_switches_the_forms_that_layers_picks():
    """cpu_forms.py switches each form by patching the predicate of that name in kdep_jax.models.layers: every
    form it lists is one, and every argument-free `-> bool` function of layers (each reads the CPU's instruction
    set) is listed."""
    spec = importlib.util.spec_from_file_location("cpu_forms", _CPU_FORMS)
    cpu_forms = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cpu_forms)
    from kdep_jax.models import layers

    with open(layers.__file__, encoding="utf-8") as f:
        source = f.read()
    predicates = {name[1:] for name in dir(layers)
                  if name.startswith("_") and callable(getattr(layers, name))
                  and f"def {name}() -> bool:" in source}
    assert set(cpu_forms.FORMS) == predicates


def test_teacher_forward_benchmark_times_one_arch_per_framework_process():
    """`--framework kdep_jax|pytorch` times one arch in the process it runs in: a list of archs is a usage error
    naming the fix, not an unknown-arch error from the model registry."""
    path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "teacher_forward.py")
    result = subprocess.run([sys.executable, path, "--framework", "kdep_jax", "--arch", "swin_t,vit_b_16"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "--framework kdep_jax times one arch; give one, or --framework both for several" in result.stderr
