"""The three LLaVA-specific fused ops. Each has a Triton kernel, a CUDA kernel (csrc/) and a
pure-torch reference; ``kernels.dispatch`` picks one per call (see its docstring)."""
from kernels.masked_loss import masked_lm_loss, masked_lm_loss_ref
from kernels.projector import projector, projector_ref
from kernels.scatter import scatter_image_tokens, scatter_image_tokens_ref

__all__ = ["masked_lm_loss", "masked_lm_loss_ref", "projector", "projector_ref", "scatter_image_tokens",
           "scatter_image_tokens_ref"]
