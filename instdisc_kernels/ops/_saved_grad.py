"""Autograd for the loss ops that compute dloss/dfeatures in their forward pass.

Such an op returns (loss, grad_features, ...) with features as its first
input; backward only scales the saved gradient by grad_output (which may be a
stride-0 expand) and returns None for every other input.

Double backward is not supported: the saved gradient is a constant, so its
derivative would silently be zero. Under create_graph=True the returned
gradient is tied to features by a node whose backward raises.
"""
import torch


class _NoDoubleBackward(torch.autograd.Function):
    """Identity on the gradient ``g``; differentiating it (w.r.t. features) raises."""

    @staticmethod
    def forward(ctx, g, features, opname):
        ctx.opname = opname
        return g.clone()

    @staticmethod
    def backward(ctx, *grads):
        raise NotImplementedError(
            f"double backward (create_graph=True, then a second derivative) through {ctx.opname} is not "
            f"supported: its gradient is computed in the forward pass and is not differentiable")


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(output[1], inputs[0] if inputs[0].requires_grad else None)
    ctx.features_dtype = inputs[0].dtype


def register(opname: str, fake) -> None:
    """Register ``fake`` and the saved-gradient autograd formula for ``opname``."""
    num_inputs = len(torch._library.utils.lookup_op(opname)._schema.arguments)
    public = "nce_loss" if "nce_forward" in opname else "nonparametric_softmax_loss"

    def backward(ctx, grad_loss, *unused):
        g, features = ctx.saved_tensors
        grad = (grad_loss.to(g.dtype) * g).to(ctx.features_dtype)
        if torch.is_grad_enabled() and features is not None:     # create_graph=True
            grad = _NoDoubleBackward.apply(grad, features, public)
        return (grad,) + (None,) * (num_inputs - 1)

    torch.library.register_fake(opname)(fake)
    torch.library.register_autograd(opname, backward, setup_context=_setup_context)
