r"""The ``"fused"`` engine: every pair term with its analytic gradient in one pass.

All pair terms (nonbonded, exceptions, generalized Born) depend on the positions only through
:math:`d_{ij}=|x_i-x_j|^2`; each term returns :math:`W_{ij}=\partial U/\partial d_{ij}` on the
dense ``(B, n, n)`` pair geometry, and the gradient is one batched product
:math:`\nabla_{x_k}U = 2\sum_j (W_{kj}+W_{jk})(x_k-x_j)`, computed in the forward pass instead
of taping the graph for autograd.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from ._ff_terms import _Pairs


class _FusedPairs(torch.autograd.Function):
    """Nonbonded + GB energy (B,) with the gradient computed alongside in the forward pass.

    :math:`\\nabla_{x_k}U = 2\\sum_j (W_{kj}+W_{jk})(x_k-x_j)` with :math:`W = \\partial U/\\partial d`.
    First-order only (``once_differentiable``).
    """

    @staticmethod
    def forward(ctx, x, nb, gb, floor):
        need = bool(ctx.needs_input_grad[0])
        g = _Pairs(x, floor)
        energy = x.new_zeros(x.shape[0])
        W = None
        for term in (nb, gb):
            if term is None:
                continue
            e, w = term.dense_energy_grad(g, need)
            energy = energy + e
            if need:
                W = w if W is None else W + w
        if need:
            grad = 2.0 * torch.einsum("bij,bijc->bic", W + W.transpose(1, 2), g.diff)
            ctx.save_for_backward(grad)
        return energy

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_energy):
        (grad,) = ctx.saved_tensors
        return grad_energy[:, None, None] * grad, None, None, None
