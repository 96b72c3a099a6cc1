"""An independent, deliberately naive routing: Python loops over samples and capsules.

Written straight from the paper's Procedure 1 with no vectorisation, so that the
reference is checked against code that shares none of its structure. The routing
options of DESIGN.md §6 are written in the same style: ``bias`` (J, D) added to s,
``logit_prior`` (I, J) as the first logits, ``leaky`` an orphan zero logit in each
softmax, ``detach_inner`` every prediction detached in all iterations but the last.
With ``return_couplings`` the last iteration's couplings come back too, (B, I, J).
Scalars stay tensors, so autograd differentiates through the loops.
"""
import torch


def naive_squash(s):
    n2 = sum(x * x for x in s)
    scale = n2 / (1 + n2) / torch.sqrt(n2 + 1e-8)
    return [x * scale for x in s]


def naive_capsule_routing(u, W, num_iterations, **options):
    B, I, Din = u.shape
    _, J, Dout, _ = W.shape
    outputs = []
    for b in range(B):
        # u_hat[i][j] is a list of Dout scalars
        u_hat = [[[sum(W[i, j, d, k] * u[b, i, k] for k in range(Din)) for d in range(Dout)] for j in range(J)] for i in range(I)]
        outputs.append(_naive_route_one(u_hat, I, J, Dout, num_iterations, **options))
    return _collect(outputs, u.new_zeros(0, J, Dout), options)


def naive_route(u_hat, num_iterations, **options):
    B, I, J, D = u_hat.shape
    outputs = []
    for b in range(B):
        uh = [[[u_hat[b, i, j, d] for d in range(D)] for j in range(J)] for i in range(I)]
        outputs.append(_naive_route_one(uh, I, J, D, num_iterations, **options))
    return _collect(outputs, u_hat.new_zeros(0, J, D), options)


def _collect(outputs, empty, options):
    if not options.get("return_couplings"):
        return torch.stack(outputs) if outputs else empty
    return torch.stack([v for v, _ in outputs]), torch.stack([c for _, c in outputs])


def _naive_route_one(u_hat, I, J, D, num_iterations, bias=None, logit_prior=None, leaky=False, detach_inner=False,
                     return_couplings=False):
    logits = [[0.0 if logit_prior is None else logit_prior[i, j] for j in range(J)] for i in range(I)]
    for r in range(num_iterations):
        last = r == num_iterations - 1
        x = u_hat if last or not detach_inner else [[[e.detach() for e in row] for row in cap] for cap in u_hat]
        coupling = []
        for i in range(I):
            # subtracting the max is a constant shift; it does not change the softmax (the leak's
            # zero logit takes part in the max like any other)
            values = [float(x_.detach()) if isinstance(x_, torch.Tensor) else x_ for x_ in logits[i]]
            m = max(values + [0.0]) if leaky else max(values)
            e = [torch.exp(torch.as_tensor(logits[i][j], dtype=torch.float64) - m) for j in range(J)]
            z = sum(e) + (torch.exp(torch.as_tensor(-m, dtype=torch.float64)) if leaky else 0.0)
            coupling.append([e[j] / z for j in range(J)])
        v = []
        for j in range(J):
            s = [sum(coupling[i][j] * x[i][j][d] for i in range(I)) for d in range(D)]
            if bias is not None:
                s = [s[d] + bias[j, d] for d in range(D)]
            v.append(naive_squash(s))
        if not last:
            for i in range(I):
                for j in range(J):
                    logits[i][j] = logits[i][j] + sum(x[i][j][d] * v[j][d] for d in range(D))
    v = torch.stack([torch.stack([torch.as_tensor(e) for e in v[j]]) for j in range(J)])
    if return_couplings:
        return v, torch.stack([torch.stack([torch.as_tensor(c).detach() for c in row]) for row in coupling])
    return v
