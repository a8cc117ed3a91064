"""Where kdep_jax's distillation step spends its time on a device: XLA's ops by their own time, from a JAX profiler
trace of a few calls of the step that benchmarks/distill_step.py times (synthetic images, placed on the device once).

    python benchmarks/step_profile.py                                   # CPU, R50 -> R18, batch 32, float32
    python benchmarks/step_profile.py --device gpu --batch 256 --dtype bfloat16 --out runs/gpu_profile

It prints the step's wall time, the device's busy time per step, then the kinds of op (XLA's HLO instructions:
convolutions, fusions, custom calls, copies) and the kernels (the trace's event names: cuDNN's and XLA's GPU kernels,
XLA:CPU's thunks) that take the most of it. An op's own time leaves out the ops it contains (a loop's body, a thunk's
nested ones), so nothing is counted twice. On a CPU an op also owns the time after it during which no op runs on any
thread: XLA:CPU's Eigen dot products and convolutions end their op's event once they have handed their work to its
thread pool, which then runs it untraced (on a Zen 3 `AMD EPYC`, a quarter of the R50 -> R18 step, a third of the
R50 -> MobileNetV2 one). The trace (perfetto_trace.json.gz, for ui.perfetto.dev) and the summary are kept in --out.
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import shutil
import sys
import time
import types

import distill_step


def own_times(events: list[dict]) -> list[tuple[dict, float]]:
    """(event, its duration less its direct children's) for complete ('X') events; a child starts and ends within
    its parent on the same thread. An event that starts within another and ends after it is the next one, not a
    child: a GPU stream's kernels are one after the other, their recorded times overlapping by a microsecond."""
    by_thread = collections.defaultdict(list)
    for event in events:
        by_thread[event["pid"], event["tid"]].append(event)
    result = []
    for thread_events in by_thread.values():
        thread_events.sort(key=lambda e: (e["ts"], -e["dur"]))
        open_events: list[list] = []  # [event, own time so far], outermost first
        for event in thread_events:
            while open_events and event["ts"] + event["dur"] > open_events[-1][0]["ts"] + open_events[-1][0]["dur"]:
                result.append(tuple(open_events.pop()))
            if open_events:
                open_events[-1][1] -= event["dur"]
            open_events.append([event, float(event["dur"])])
        result.extend(tuple(entry) for entry in reversed(open_events))
    return result


def waits_after(events: list[dict]) -> list[tuple[dict, float]]:
    """(event, the time from its end until the next event starts on any thread) for each event after which no event
    runs, before the last one: the time the thunk executor waits for that op's work, on a CPU (module docstring)."""
    ordered = sorted(events, key=lambda e: e["ts"])
    result = []
    last, last_end = None, None  # the event that ends last of those started so far
    for event in ordered:
        if last is not None and event["ts"] > last_end:
            result.append((last, float(event["ts"] - last_end)))
        if last is None or event["ts"] + event["dur"] >= last_end:
            last, last_end = event, event["ts"] + event["dur"]
    return result


def device_events(trace: dict) -> tuple[list[dict], list[str]]:
    """The events of the device's work, and the threads they came from: on a GPU its streams' kernels and copies
    (the device's other lines are summaries of the same time), on a CPU XLA's thunks (events naming an HLO op)."""
    events = trace["traceEvents"]
    process_names, thread_names = {}, {}
    for event in events:
        if event.get("ph") == "M" and event["name"] == "process_name":
            process_names[event["pid"]] = event["args"]["name"]
        elif event.get("ph") == "M" and event["name"] == "thread_name":
            thread_names[event["pid"], event["tid"]] = event["args"]["name"]
    complete = [e for e in events if e.get("ph") == "X" and "dur" in e]
    devices = {pid for pid, name in process_names.items() if name.startswith("/device:")}
    if devices:
        on_devices = [e for e in complete if e["pid"] in devices]
        streams = [e for e in on_devices if thread_names.get((e["pid"], e["tid"]), "").startswith("Stream")]
        chosen = streams or on_devices
    else:
        chosen = [e for e in complete if "hlo_op" in e.get("args", {})]
    threads = sorted({f"{process_names.get(e['pid'], e['pid'])} {thread_names.get((e['pid'], e['tid']), e['tid'])}"
                      for e in chosen})
    return chosen, threads


def custom_call_targets(hlo_text: str) -> dict[str, str]:
    """{custom call's name: its target} in a compiled module's HLO text: the trace names a custom call by its
    instruction alone (ffi_call.517), the kernel it runs is its target (kdep_winograd_conv, __cudnn$convForward)."""
    return dict(re.findall(r'^\s*%?([\w.\-]+) = [^\n]*custom_call_target="([^"]+)"', hlo_text, re.MULTILINE))


def op_kind(event: dict, targets: dict[str, str]) -> str:
    """A custom call's target, else the HLO instruction's name without its number (fusion.12, loop_add_fusion_3:
    fusion, loop_add_fusion), or the event's own name where it names no HLO op."""
    name = event.get("args", {}).get("hlo_op") or event["name"]
    return targets.get(name) or re.sub(r"[._]\d+$", "", name)


def kernel(event: dict, targets: dict[str, str]) -> str:
    """The event's name, with the custom call's target where it ran one."""
    target = targets.get(event.get("args", {}).get("hlo_op", ""))
    return f"{event['name']} ({target})" if target else event["name"]


def summary(trace: dict, steps: int, wall_seconds_per_step: float, top: int,
            targets: dict[str, str] | None = None) -> list[str]:
    """The report's lines: the busy time per step, then the op kinds and the kernels taking most of it; targets:
    custom_call_targets of the step's module."""
    targets = targets or {}
    events, threads = device_events(trace)
    timed = own_times(events)
    busy = sum(own for _, own in timed)
    on_cpu = not any(thread.startswith("/device:") for thread in threads)
    waits = waits_after(events) if on_cpu else []
    waited = sum(wait for _, wait in waits)
    lines = [f"wall {wall_seconds_per_step * 1e3:.1f} ms per step (profiled); device busy "
             f"{busy / steps / 1e3:.1f} ms per step, summed over {len(threads)} threads: {', '.join(threads[:8])}"
             + (" ..." if len(threads) > 8 else "")]
    if on_cpu:
        lines.append(f"no op running for {waited / steps / 1e3:.1f} ms per step: each wait is counted to the op before "
                     "it (XLA:CPU's Eigen dots and convolutions run after their op's event)")
    for title, key in (("op kind", op_kind), ("kernel", kernel)):
        totals, counts = collections.Counter(), collections.Counter()
        for event, own in timed:
            name = key(event, targets)
            totals[name] += own
            counts[name] += 1
        for event, wait in waits:
            totals[key(event, targets)] += wait
        lines.append(f"{'ms/step':>9} {'share':>6} {'calls/step':>10}  {title}")
        for name, total in totals.most_common(top):
            lines.append(f"{total / steps / 1e3:9.2f} {total / (busy + waited):6.1%} {counts[name] / steps:10.1f}  "
                         f"{name[:120]}")
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    distill_step.add_step_arguments(parser)
    parser.add_argument("--calls", type=int, default=2, help="calls profiled, after one that compiles the step")
    parser.add_argument("--top", type=int, default=25, help="rows of each table")
    parser.add_argument("--out", default="runs/step_profile", help="where the trace and summary.txt are kept")
    args = parser.parse_args()
    setup_args = types.SimpleNamespace(**vars(args), input="synthetic")
    step, state, count, constants, next_batches = distill_step.kdep_jax_setup(setup_args, cached=False)
    import jax  # after the setup, which sets JAX_PLATFORMS and XLA_FLAGS

    batches = next_batches()
    step = step.lower(state, batches, count, constants).compile()
    targets = custom_call_targets(step.as_text())
    state, metrics = step(state, batches, count, constants)
    jax.block_until_ready(metrics["loss"])
    trace_dir = os.path.join(args.out, "trace")
    shutil.rmtree(trace_dir, ignore_errors=True)
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        start = time.perf_counter()
        for _ in range(args.calls):
            state, metrics = step(state, batches, count, constants)
        jax.block_until_ready(metrics["loss"])
        steps = args.calls * args.steps_per_call
        wall = (time.perf_counter() - start) / steps
    [trace_path] = glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)
    with gzip.open(trace_path, "rt") as f:
        trace = json.load(f)
    device = jax.devices()[0].device_kind
    lines = [f"{args.teacher} -> {args.student}, batch {args.batch}, {args.image_size} px, {args.dtype}, {device}, "
             f"{steps} steps profiled ({args.calls} calls of {args.steps_per_call})"]
    lines += summary(trace, steps, wall, args.top, targets)
    shutil.move(trace_path, os.path.join(args.out, "perfetto_trace.json.gz"))
    shutil.rmtree(trace_dir)
    with open(os.path.join(args.out, "summary.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
