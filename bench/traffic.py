"""The Triton kernels' modelled memory traffic at the paper's layer, and the time it implies on a GPU.

    python -m bench.traffic [--sms 132] [--bandwidth-tbps 5.5] [--fma-tera 33.5]

Bytes come from ``triton_backend.forward_traffic`` / ``backward_traffic`` for the launches the
backend makes on a GPU with ``--sms`` SMs (tests/test_triton_traffic.py checks that model against
the loads and stores counted under the interpreter). The time is a lower bound, not a measurement:
the larger of bytes / bandwidth and multiply-adds / FMA rate. The defaults are an H100 SXM's: its
L2 (which holds W, 5.9 MB at the paper's layer) at about 5.5 TB/s, and 67 TFLOP/s of float32,
33.5 T FMA/s, without tensor cores. Padded lanes (J, Dout rounded up to powers of two) count as
work; exponentials, divisions and the shuffles of cross-thread sums do not.
"""
import argparse
import dataclasses
from typing import List

from capsrouting import triton_backend

PAPER = dict(I=1152, J=10, D=16, K=8, R=3)


@dataclasses.dataclass(frozen=True)
class Estimate:
    B: int
    forward: triton_backend.Traffic
    total: triton_backend.Traffic  # forward + backward
    forward_fmas: int
    total_fmas: int
    bytes_per_W: int  # B * |W| in bytes, the unit of the targets


def multiply_adds(p: triton_backend.LaunchPlan, R: int) -> tuple:
    """(forward, forward + backward) multiply-adds over padded (BLOCK_J, BLOCK_D) lanes."""
    jd = p.cfg.BLOCK_J * p.cfg.BLOCK_D
    pairs = p.B * p.I
    forward = R * pairs * jd * (p.K + 2)  # predictions, logits, s
    phase1 = (R - 1) * pairs * jd * (p.K + 3)  # predictions, logits, g_c, A
    phase2 = pairs * jd * (3 * p.K + 4 * R)  # predictions, per iteration logits, g_c and du_hat, then dW, du
    return forward, forward + phase1 + phase2


def estimate(B: int, sms: int, element_size: int = 4) -> Estimate:
    s = PAPER
    plan = triton_backend.launch_plan(B, s["I"], s["J"], s["D"], s["K"], element_size,
                                      programs=triton_backend._PROGRAMS_PER_SM * sms)
    forward = triton_backend.forward_traffic(plan, s["R"])
    backward = triton_backend.backward_traffic(plan, s["R"])
    fmas = multiply_adds(plan, s["R"])
    weights = s["I"] * s["J"] * s["D"] * s["K"] * element_size
    return Estimate(B, forward, forward + backward, fmas[0], fmas[1], B * weights)


def table(estimates: List[Estimate], bandwidth: float, fma_rate: float) -> str:
    def ms(traffic, fmas):
        return 1e3 * max((traffic.loaded + traffic.stored) / bandwidth, fmas / fma_rate)

    lines = [
        "| batch | forward loads GB | × B·\\|W\\| | fwd+bwd loads GB | × B·\\|W\\| | fwd+bwd stores GB "
        "| forward ms (bound) | fwd+bwd ms (bound) |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for e in estimates:
        lines.append(
            f"| {e.B} | {e.forward.loaded / 1e9:.3f} | {e.forward.loaded / e.bytes_per_W:.2f} | "
            f"{e.total.loaded / 1e9:.3f} | {e.total.loaded / e.bytes_per_W:.2f} | {e.total.stored / 1e9:.3f} | "
            f"{ms(e.forward, e.forward_fmas):.3f} | {ms(e.total, e.total_fmas):.3f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sms", type=int, default=132, help="SMs of the GPU (H100 SXM: 132)")
    parser.add_argument("--bandwidth-tbps", type=float, default=5.5, help="bandwidth that serves the loads, TB/s")
    parser.add_argument("--fma-tera", type=float, default=33.5, help="float32 multiply-adds per second, in T")
    parser.add_argument("--batch", type=int, nargs="+", default=[32, 128, 512])
    args = parser.parse_args(argv)
    if args.sms < 1 or args.bandwidth_tbps <= 0 or args.fma_tera <= 0 or min(args.batch) < 1:
        parser.error("--sms, --bandwidth-tbps, --fma-tera and --batch must be positive")
    print(f"paper layer {PAPER}, float32, {args.sms} SMs, {args.bandwidth_tbps} TB/s, {args.fma_tera} T FMA/s; "
          "bytes the Triton launches load and store")
    print(table([estimate(B, args.sms) for B in args.batch], args.bandwidth_tbps * 1e12, args.fma_tera * 1e12))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
