"""An independent, deliberately naive routing: Python loops over samples and capsules.

Written straight from the paper's Procedure 1 with no vectorisation, so that the
reference is checked against code that shares none of its structure.
"""
import torch


def naive_squash(s):
    n2 = sum(x * x for x in s)
    scale = n2 / (1 + n2) / torch.sqrt(n2 + 1e-8)
    return [x * scale for x in s]


def naive_capsule_routing(u, W, num_iterations):
    B, I, Din = u.shape
    _, J, Dout, _ = W.shape
    outputs = []
    for b in range(B):
        # u_hat[i][j] is a list of Dout scalars
        u_hat = [[[sum(W[i, j, d, k] * u[b, i, k] for k in range(Din)) for d in range(Dout)] for j in range(J)] for i in range(I)]
        outputs.append(_naive_route_one(u_hat, I, J, Dout, num_iterations))
    return torch.stack(outputs) if outputs else u.new_zeros(0, J, Dout)


def naive_route(u_hat, num_iterations):
    B, I, J, D = u_hat.shape
    outputs = []
    for b in range(B):
        uh = [[[u_hat[b, i, j, d] for d in range(D)] for j in range(J)] for i in range(I)]
        outputs.append(_naive_route_one(uh, I, J, D, num_iterations))
    return torch.stack(outputs)


def _naive_route_one(u_hat, I, J, D, num_iterations):
    logits = [[0.0] * J for _ in range(I)]
    for r in range(num_iterations):
        coupling = []
        for i in range(I):
            # subtracting the max is a constant shift; it does not change the softmax
            m = max(float(x.detach()) if isinstance(x, torch.Tensor) else x for x in logits[i])
            e = [torch.exp(torch.as_tensor(logits[i][j], dtype=torch.float64) - m) for j in range(J)]
            z = sum(e)
            coupling.append([e[j] / z for j in range(J)])
        v = []
        for j in range(J):
            s = [sum(coupling[i][j] * u_hat[i][j][d] for i in range(I)) for d in range(D)]
            v.append(naive_squash(s))
        if r < num_iterations - 1:
            for i in range(I):
                for j in range(J):
                    logits[i][j] = logits[i][j] + sum(u_hat[i][j][d] * v[j][d] for d in range(D))
    return torch.stack([torch.stack([torch.as_tensor(x) for x in v[j]]) for j in range(J)])
