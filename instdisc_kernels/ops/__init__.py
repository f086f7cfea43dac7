"""One module per op: its torch.library registration, fake kernel, autograd and
the public function. Kernels live beside it (``*_triton.py``) and in csrc/."""
