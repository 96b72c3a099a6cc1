"""Compile every Triton kernel variant the dispatch can launch, for real GPUs, without one.

Usage: ``python tests/triton_aot.py [--arch 80 90] [--json FILE]``; tests call
``compile_in_subprocess``.

For each kernel, each (block sizes, has_weights) the launcher can choose
(``triton_backend.all_launch_configs``) and each input dtype, it runs
``triton.compile`` for ``GPUTarget("cuda", arch, 32)`` in an empty cache (so
ptxas really runs) and reads registers and spill stores/loads from ptxas's own
verbose log (``TRITON_DUMP_PTXAS_LOG``), shared memory from the metadata.
Prints one line per variant; exits 1 if any variant spills or fails to
compile. Must run WITHOUT ``TRITON_INTERPRET``.
"""
import argparse
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

DTYPES = {"fp64": "fp64", "fp32": "fp32", "fp16": "fp32", "bf16": "fp32"}  # input dtype -> compute dtype
ELEMENT_SIZES = {"fp64": 8, "fp32": 4, "fp16": 2, "bf16": 2}

# Per kernel: which pointer arguments hold the input dtype (the rest hold the compute dtype),
# which block sizes it takes (a pair: the kernel's name for a LaunchConfig field), and its name
# for LaunchConfig.gpu_options (warps and register cap).
KERNELS = {
    "_routing_forward_kernel": (("x_ptr", "W_ptr", "v_ptr", "bias_ptr", "prior_ptr", "c_ptr"), ("BLOCK_B", "BLOCK_I", "BLOCK_J", "BLOCK_D", "DOT_K"),
                                "forward"),
    "_routing_backward_reduce_kernel": (
        ("x_ptr", "W_ptr", "grad_v_ptr", "prior_ptr"),
        (("BLOCK_B", "REDUCE_BLOCK_B"), ("BLOCK_I", "REDUCE_BLOCK_I"), "BLOCK_J", "BLOCK_D"),
        "reduce",
    ),
    "_routing_backward_inputs_kernel": (
        ("x_ptr", "W_ptr", "dx_ptr", "prior_ptr"),
        (("BLOCK_I", "INPUTS_BLOCK_I"), "BLOCK_J", "BLOCK_D", "BLOCK_K", "W_IN_REGISTERS"),
        "inputs",
    ),
}


# Scalar arguments that are floats (the rest are integers).
FLOAT_ARGS = ("leak",)


def variants():
    from capsrouting.triton_backend import all_launch_configs

    seen = set()
    for cfg, has_w, element_size in all_launch_configs():
        for kernel, (_, block_names, options_name) in KERNELS.items():
            pairs = [(name, name) if isinstance(name, str) else name for name in block_names]
            blocks = tuple((arg, getattr(cfg, field)) for arg, field in pairs)
            for dtype in (d for d, size in ELEMENT_SIZES.items() if size == element_size):
                for with_options in (False, True):  # the plain op, and its variant with the routing options
                    options = cfg.gpu_options(options_name)
                    tile = blocks
                    if options_name == "forward":  # its options variant may take a smaller batch tile
                        block_b, dot_k = cfg.forward_tile(with_options)
                        tile = tuple((k, {"BLOCK_B": block_b, "DOT_K": dot_k}.get(k, v)) for k, v in blocks)
                    key = (kernel, has_w, tile + (("OPTIONS", with_options),), tuple(sorted(options.items())), dtype)
                    if key not in seen:
                        seen.add(key)
                        yield key


def compile_one(key, arch):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from capsrouting import _triton_kernels

    kernel_name, has_w, blocks, options, dtype = key
    options = dict(options)  # what the launcher passes: LaunchConfig.gpu_options
    fn = getattr(_triton_kernels, kernel_name)
    input_ptrs = KERNELS[kernel_name][0]
    constexprs = dict(blocks, HAS_W=has_w)
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            # Without weights the launcher passes x for W (and for dW), so those take the input dtype.
            in_input_dtype = name in input_ptrs or (not has_w and name == "dW_ptr")
            signature[name] = "*" + (dtype if in_input_dtype else DTYPES[dtype])
        elif name in FLOAT_ARGS:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    log = io.StringIO()
    with contextlib.redirect_stdout(log):  # Triton prints ptxas's -v log here
        compiled = triton.compile(
            ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", arch, 32), options=options
        )
    text = log.getvalue()
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    registers = re.search(r"Used (\d+) registers", text)
    if not spills or not registers:
        raise RuntimeError(f"no ptxas report in the compile log (was the kernel cached?): {text[-500:]!r}")
    return dict(
        kernel=kernel_name, arch=f"sm_{arch}", dtype=dtype, has_weights=has_w, num_warps=options["num_warps"], **dict(blocks),
        registers=int(registers.group(1)), spill_bytes=int(spills.group(1)) + int(spills.group(2)),
        shared_bytes=compiled.metadata.shared,
    )


def _compile_safely(args):
    key, arch = args
    try:
        return compile_one(key, arch)
    except Exception as exc:  # reported per variant
        return dict(kernel=key[0], arch=f"sm_{arch}", dtype=key[4], error=f"{type(exc).__name__}: {exc}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    parser.add_argument("--json", help="write the per-variant results here")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("unset TRITON_INTERPRET: the interpreter cannot compile for a GPU", file=sys.stderr)
        return 2
    # An empty cache, so that ptxas runs and reports for every variant.
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="capsrouting-aot-")
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    work = [(key, arch) for arch in args.arch for key in variants()]
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        results = list(pool.map(_compile_safely, work, chunksize=4))
    bad = 0
    for r in results:
        if "error" in r:
            bad += 1
            print(f"FAILED {r['kernel']} {r['arch']} {r['dtype']}: {r['error']}")
            continue
        blocks = " ".join(f"{k}={r[k]}" for k in ("BLOCK_B", "BLOCK_I", "BLOCK_J", "BLOCK_D", "BLOCK_K", "W_IN_REGISTERS", "DOT_K", "OPTIONS") if k in r)
        flag = "" if r["spill_bytes"] == 0 else f"  SPILLS {r['spill_bytes']} bytes"
        bad += r["spill_bytes"] != 0
        print(
            f"{r['kernel']:33s} {r['arch']} {r['dtype']} W={int(r['has_weights'])} {blocks:32s} "
            f"regs={r['registers']:3d} shared={r['shared_bytes']:6d}{flag}"
        )
    import triton

    print(f"{len(results)} variants compiled with triton {triton.__version__}, {bad} failed or spilled")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 1 if bad else 0


def compile_in_subprocess(report: Path, archs=(80, 90), path_prefix=(), timeout=1200):
    """Run this script in a fresh Python, with path_prefix first on its path; returns (process, results).

    The environment loses TRITON_INTERPRET: the interpreter replaces the compiler in a process that sets it.
    """
    root = Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([*map(str, path_prefix), str(root), *filter(None, [env.get("PYTHONPATH")])])
    command = [sys.executable, str(Path(__file__).resolve()), "--arch", *map(str, archs), "--json", str(report)]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    results = json.loads(report.read_text()) if report.exists() else None
    return proc, results


if __name__ == "__main__":
    sys.exit(main())
