"""One GPU runner: the steps of a device call, chosen by arguments, each timed and logged to ``--out``.

Usage (repository root, on the GPU machine; one command per device call)::

    python benchmarks/run_gpu.py STEP [STEP ...] [--out DIR] [options]

Steps (run in the order given; a failing step is reported and the next ones still run):

- ``env``: GPU, driver and library versions (``nvidia-smi``, torch, triton, transformers).
- ``build``: compile the CUDA extension (cached in ``$TORCH_EXTENSIONS_DIR``).
- ``tests``: the GPU tests, ``tests/test_gpu_kernels.py`` (``--tests-k`` selects, e.g. ``"cuda or static"``).
- ``gpu-tests``: every test marked ``gpu`` in ``tests/`` (kernels, caches, FP8, bookkeeping, ...).
- ``variants``: same-run A/B of CUDA kernel variants vs dense SDPA, ``benchmarks/kernel_variants.py``
  (``--variants-args``, default: this tree's kernel vs the v2 kernel of commit 7839734, all cases).
- ``ncu``: Nsight Compute counters (duration, instructions, issue, L1/TEX, DRAM, stall reasons) of the decode
  kernel at 8 x 32k, s = 0.7 and 0.5, for this tree's kernel and the v2 kernel (``benchmarks/ncu_case.py``).
- ``attention``: the kernel benchmark, ``benchmarks/attention.py`` (``--attention-args``).
- ``e2e``: the end-to-end benchmark, ``mustafar bench`` (``--bench-args``).
- ``tokens``: GPU vs CPU greedy tokens, ``benchmarks/gpu_cpu_tokens.py --tokens 32``.
- ``long-run``: ``benchmarks/long_run.py --steps N`` (``--long-steps``).
- ``capacity``: ``mustafar bench --capacity`` at a 32k prompt, 80 GiB (``--capacity-args``).
- Issue 14's end-to-end table against the fair dense baseline (``DenseStaticCache``; Llama-3-8B shape, random
  weights, fp16, graph mode on both sides; settings ``--fair-settings``):

  - ``fair-tests``: the GPU checks of its pieces, ``tests/test_gpu_fair_baseline.py`` (fused bookkeeping,
    chunk attention, per-step dense graphs). If they fail (not a timeout: slow compiles), the steps after it
    run with the fused bookkeeping off (``MUSTAFAR_FUSED_BOOKKEEPING=0``), and the output says so.
  - ``e2e-fair``: decode rows with the step breakdown (attention / bookkeeping / rest), batches 1, 16, 24 at
    4k and 32k prompts, caches filled with random K and V (``--random-fill``: a step's time does not depend
    on the values; saves the 20-30 s prefill of each 16 x 32k / 24 x 32k case), prefill chunks of 4096.
  - ``ttft-fair``: time to first token with real prefills in chunks of 4096 at 16 x 32k (and their decode rows).
  - ``capacity-fair``: capacity at a 32k prompt in an 80 GiB budget (weights included), dense and K0.7V0.7,
    real batch prefills in chunks of 512, the search starting at the memory model's prediction.
- ``fp8-fused-tests``: the fused FP8 bookkeeping, the Triton FP8 decompression and compress, and the Triton
  decode's long steps in pieces (a test running past 60 s dumps its Python stack into the log).
- ``pieces-tests``: the Triton decode's long steps in pieces alone, one line per test (on 2026-12-03 one of
  them ran past the ``fp8-fused-tests`` limit; this step says which, and where it waits).
- ``capacity-fp8``: capacity at a 32k prompt in 80 GiB, generate mode, ``--capacity-fp8-settings`` (default
  dense / K0.7V0.7 / K0.7V0.7-fp8), one sequence prefilled in chunks of 4096 and repeated (issue 15's target).
- ``bookkeeping-probe``: ``benchmarks/probes/bookkeeping_latency.py``, the fused bookkeeping launch's latency
  with other launch shapes (issue 14's batch-1 gap; written 2026-12-03 after the device time was spent).
- ``batch1-probe``: ``benchmarks/probes/batch1_splits.py``, the CUDA decode's time against its split count at
  batch 1 and 8 x 4k (the same issue; written then too).
- ``memcheck``, ``racecheck``: ``compute-sanitizer`` over ``benchmarks/sanitize_case.py``.
- ``tp``, ``device-map``: the 2-GPU runs of ``benchmarks/multi_gpu.py`` (``--multi-gpu-args``; NVLink
  multicast off).

Each step's output goes to ``DIR/<step>.log`` (its tail is printed) and its JSON results into ``DIR``.
Example (the commands of BENCHMARKS.md)::

    python benchmarks/run_gpu.py build tests attention memcheck --tests-k "cuda or static" \\
        --attention-args "--backends cuda --shapes llama3-8b"
    python benchmarks/run_gpu.py build tests e2e --bench-args "--batches 1,16 --prompts 32768 --modes generate"
    python benchmarks/run_gpu.py build fair-tests e2e-fair ttft-fair capacity-fair --fair-settings dense,K0.7V0.7
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
#: Lines of a step's output printed after it (the whole output is in its log).
TAIL_LINES = 25


@dataclass(frozen=True)
class Step:
    """One step: the command (a list, or a function of the parsed arguments), its time limit in seconds."""

    command: object
    timeout_s: int
    env: tuple[tuple[str, str], ...] = ()
    #: Environment of the steps after this one if it fails (not if it times out).
    failure_env: tuple[tuple[str, str], ...] = ()


#: What the ``ncu`` step reads: duration, instructions, issue activity, L1/TEX and DRAM throughput, stall reasons.
NCU_METRICS = ("regex:smsp__average_warps_issue_stalled_.*_per_issue_active.ratio,smsp__inst_executed.sum,"
               "smsp__issue_active.avg.pct_of_peak_sustained_active,dram__throughput.avg.pct_of_peak_sustained_elapsed,"
               "l1tex__throughput.avg.pct_of_peak_sustained_active,gpu__time_duration.sum,"
               "sm__warps_active.avg.pct_of_peak_sustained_active")
#: The committed v2 kernel, the "before" of issue 13.
V2_COMMIT = "7839734"


def _ncu(a) -> list[str]:
    """A shell loop: ncu of the decode kernel per (kernel, sparsity), one text report each under ``--out``."""
    runs = []
    for variant in ("lib", f"@{V2_COMMIT}"):
        for sparsity in ("0.7", "0.5"):
            report = a.out / f"ncu_{variant.lstrip('@')}_s{sparsity}.txt"
            runs.append(f"ncu --clock-control none -k regex:sparse_decode_kernel -s 2 -c 1 --metrics "
                        f"{shlex.quote(NCU_METRICS)} {shlex.quote(PYTHON)} benchmarks/ncu_case.py 8 32768 {sparsity} "
                        f"{variant} > {shlex.quote(str(report))} 2>&1; echo == {variant} s={sparsity}; "
                        f"grep -E 'stalled|inst_executed|issue_active|dram__|l1tex__|duration|warps_active' "
                        f"{shlex.quote(str(report))}")
    return ["bash", "-c", "; ".join(runs)]


def _sanitizer(tool: str):
    return lambda a: ["compute-sanitizer", "--tool", tool, "--print-limit", "20", PYTHON,
                      "benchmarks/sanitize_case.py"]


def _fair_bench(name: str, *options: str):
    """``mustafar bench`` on the Llama-3-8B shape in graph mode, ``--fair-settings`` (issue 14's table)."""
    return lambda a: [PYTHON, "-m", "mustafar", "bench", "--shape", "llama3-8b", "--modes", "graph", "--out",
                      str(a.out / name), "--settings", a.fair_settings, *options]


#: Prefill chunk of the fair decode and TTFT rows, and of the capacity probes (small there, so that the
#: activations of batch x chunk tokens do not bound them).
FAIR_CHUNK, FAIR_CAPACITY_CHUNK = "4096", "512"
_FUSED_OFF = (("MUSTAFAR_FUSED_BOOKKEEPING", "0"),)

_NO_MULTICAST = (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"), ("NVSHMEM_DISABLE_NVLS", "1"))

STEPS = {
    "env": Step(lambda a: [PYTHON, "-c", "import subprocess, torch, triton, transformers; "
                           "print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', "
                           "transformers.__version__, torch.cuda.get_device_name()); "
                           "subprocess.run(['nvidia-smi', '--query-gpu=name,driver_version,clocks.sm,clocks.mem,"
                           "memory.used', '--format=csv'])"], 60),
    "build": Step(lambda a: [PYTHON, "-c", "from mustafar.launch.cuda import load_extension; load_extension(); "
                             "print('extension built')"], 300),
    "tests": Step(lambda a: [PYTHON, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "tests/test_gpu_kernels.py",
                             *(["-k", a.tests_k] if a.tests_k else [])], 300),
    # --durations: the whole run took 355 s of a 30-minute device budget on 2026-12-03; its log says where.
    "gpu-tests": Step(lambda a: [PYTHON, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--durations=15", "-m", "gpu",
                                 "tests/",
                                 *(["-k", a.tests_k] if a.tests_k else [])], 400),
    "variants": Step(lambda a: [PYTHON, "benchmarks/kernel_variants.py", "--out", str(a.out),
                                *shlex.split(a.variants_args)], 300),
    "ncu": Step(_ncu, 400),
    "attention": Step(lambda a: [PYTHON, "benchmarks/attention.py", "--out", str(a.out),
                                 *shlex.split(a.attention_args)], 300),
    "e2e": Step(lambda a: [PYTHON, "-m", "mustafar", "bench", "--out", str(a.out / "e2e"), *shlex.split(a.bench_args)],
                420),
    "tokens": Step(lambda a: [PYTHON, "benchmarks/gpu_cpu_tokens.py", "--tokens", "32",
                              "--out", str(a.out / "gpu_cpu_tokens.json")], 120),
    "long-run": Step(lambda a: [PYTHON, "benchmarks/long_run.py", "--steps", str(a.long_steps), "--out", str(a.out)],
                     300),
    "capacity": Step(lambda a: [PYTHON, "-m", "mustafar", "bench", "--capacity", "--out", str(a.out / "capacity"),
                                *shlex.split(a.capacity_args)], 300),
    "fair-tests": Step(lambda a: [PYTHON, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                                  "tests/test_gpu_fair_baseline.py"], 90, failure_env=_FUSED_OFF),
    "e2e-fair": Step(_fair_bench("e2e_fair", "--batches", "1,16,24", "--prompts", "4096,32768", "--random-fill",
                                 "--prefill-chunk", FAIR_CHUNK), 130),
    "ttft-fair": Step(_fair_bench("ttft_fair", "--batches", "16", "--prompts", "32768", "--prefill-chunk", FAIR_CHUNK,
                                  "--new-tokens", "8"), 130),
    "capacity-fair": Step(lambda a: [PYTHON, "-m", "mustafar", "bench", "--capacity", "--shape", "llama3-8b",
                                     "--modes", "graph", "--settings", "dense,K0.7V0.7", "--prompts", "32768",
                                     "--budget-gib", "80", "--prefill-chunk", FAIR_CAPACITY_CHUNK, "--out",
                                     str(a.out / "capacity_fair")], 150),
    # Issue 15's GPU checks: the fused FP8 bookkeeping and Triton decompression (passed 2026-12-03, fifth
    # session: the MUSTAFAR_FUSED_FP8 gate removed), the Triton decode's long steps in pieces (MAX_ROWS), and the
    # FP8 capacity search that those long steps stopped.
    "fp8-fused-tests": Step(lambda a: [PYTHON, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rf", "--tb=short",
                                       "-o", "faulthandler_timeout=60", "--durations=10",
                                       "tests/test_fused_bookkeeping.py", "tests/test_gpu_compress_fp8.py",
                                       "tests/test_kernels.py", "-k", "fp8 or pieces or bookkeeping"], 300),
    "pieces-tests": Step(lambda a: [PYTHON, "-m", "pytest", "-v", "-p", "no:cacheprovider", "-rf", "--tb=short",
                                    "-o", "faulthandler_timeout=40", "--durations=0",
                                    "tests/test_kernels.py::test_triton_decode_long_steps_run_in_pieces",
                                    "tests/test_triton_long_steps.py"], 200),
    "capacity-fp8": Step(lambda a: [PYTHON, "-m", "mustafar", "bench", "--capacity", "--shape", "llama3-8b",
                                    "--modes", "generate", "--prompts", "32768", "--budget-gib", "80",
                                    "--prefill-chunk", "4096", "--capacity-prefill", "one", "--settings",
                                    a.capacity_fp8_settings, "--out", str(a.out / "capacity_fp8")], 400),
    "bookkeeping-probe": Step(lambda a: [PYTHON, "benchmarks/probes/bookkeeping_latency.py", "--out", str(a.out)], 200),
    "batch1-probe": Step(lambda a: [PYTHON, "benchmarks/probes/batch1_splits.py", "--out", str(a.out)], 200),
    "memcheck": Step(_sanitizer("memcheck"), 120),
    "racecheck": Step(_sanitizer("racecheck"), 300),
    "tp": Step(lambda a: [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "benchmarks/multi_gpu.py", "tp", "--out", str(a.out / "tp.json"),
                          *shlex.split(a.multi_gpu_args)], 420, _NO_MULTICAST),
    "device-map": Step(lambda a: [PYTHON, "benchmarks/multi_gpu.py", "device-map", "--out",
                                  str(a.out / "device_map.json"), *shlex.split(a.multi_gpu_args)], 420,
                       _NO_MULTICAST),
}


def parse_args(argv=None) -> argparse.Namespace:
    """The runner's arguments (``steps`` in the order given, duplicates dropped)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("steps", nargs="+", choices=sorted(STEPS), metavar="STEP",
                        help=f"one or more of: {', '.join(STEPS)}")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/out")),
                        help="directory for logs and results (default: $OUT or /tmp/out)")
    parser.add_argument("--tests-k", default="", help="pytest -k expression for the GPU tests")
    parser.add_argument("--attention-args", default="", help="arguments of benchmarks/attention.py")
    parser.add_argument("--variants-args", default=f"--variant v3=lib --variant v2=@{V2_COMMIT} --cases full",
                        help="arguments of benchmarks/kernel_variants.py")
    parser.add_argument("--bench-args", default="--quick", help="arguments of `mustafar bench` (default: --quick)")
    parser.add_argument("--capacity-args", default="--prompts 32768 --modes generate --settings "
                        "dense,K0.5V0.5,K0.7V0.7 --budget-gib 80", help="arguments of `mustafar bench --capacity`")
    parser.add_argument("--capacity-fp8-settings", default="dense,K0.7V0.7,K0.7V0.7-fp8",
                        help="settings of the capacity-fp8 step")
    parser.add_argument("--fair-settings", default="dense,K0.7V0.7,K0.5V0.5",
                        help="settings of the e2e-fair and ttft-fair steps")
    parser.add_argument("--long-steps", type=int, default=20000, help="decode steps of the long run")
    parser.add_argument("--multi-gpu-args", default="", help="arguments of benchmarks/multi_gpu.py (tp, device-map)")
    parser.add_argument("--timeout-scale", type=float, default=1.0, help="multiply every step's time limit")
    parser.add_argument("--dry-run", action="store_true", help="print the commands without running them")
    args = parser.parse_args(argv)
    args.steps = list(dict.fromkeys(args.steps))
    return args


def run_step(name: str, args: argparse.Namespace, extra_env: dict | None = None) -> int:
    """Run step ``name`` (with ``extra_env`` added to its environment); its output to ``args.out / f"{name}.log"``.

    Returns its exit status (124: timed out).
    """
    step = STEPS[name]
    command = step.command(args)
    print(f"== {name}: {shlex.join(command)}", flush=True)
    if args.dry_run:
        return 0
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "PYTHONUNBUFFERED": "1",
           "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", "/tmp/mustafar-ext"), **(extra_env or {}),
           **dict(step.env)}
    log = args.out / f"{name}.log"
    start = time.perf_counter()
    with open(log, "w") as out:
        try:
            status = subprocess.run(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                    timeout=step.timeout_s * args.timeout_scale).returncode
        except subprocess.TimeoutExpired:
            status = 124
        except FileNotFoundError as error:  # e.g. compute-sanitizer not installed
            out.write(f"{error}\n")
            status = 127
    lines = log.read_text(errors="replace").splitlines()
    print("\n".join(lines[-TAIL_LINES:]))
    print(f"== {name}: exit {status} after {time.perf_counter() - start:.0f} s", flush=True)
    return status


def main(argv=None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    failed, extra_env = [], {}
    for name in args.steps:
        status = run_step(name, args, extra_env)
        if status != 0:
            failed.append(name)
        if status not in (0, 124) and STEPS[name].failure_env:
            extra_env.update(STEPS[name].failure_env)
            print(f"== {name} failed: the next steps run with {' '.join(f'{k}={v}' for k, v in extra_env.items())}",
                  flush=True)
    print(f"== done: {len(args.steps) - len(failed)} of {len(args.steps)} steps passed"
          + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
