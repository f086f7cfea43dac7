"""Autograd for the loss ops that compute dloss/dfeatures in their forward pass.

Such an op returns (loss, grad_features, ...) with features as its first
input; backward only scales the saved gradient by grad_output (which may be a
stride-0 expand) and returns None for every other input.
"""
import torch


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(output[1])
    ctx.features_dtype = inputs[0].dtype


def register(opname: str, fake) -> None:
    """Register ``fake`` and the saved-gradient autograd formula for ``opname``."""
    num_inputs = len(torch._library.utils.lookup_op(opname)._schema.arguments)

    def backward(ctx, grad_loss, *unused):
        (g,) = ctx.saved_tensors
        return ((grad_loss.to(g.dtype) * g).to(ctx.features_dtype),) + (None,) * (num_inputs - 1)

    torch.library.register_fake(opname)(fake)
    torch.library.register_autograd(opname, backward, setup_context=_setup_context)
