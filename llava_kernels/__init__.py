"""The three LLaVA-specific fused ops, plus the generation runtime's paged decode attention. Each has
a Triton kernel and a pure-torch reference (the three training ops a CUDA kernel in csrc/ too);
``llava_kernels.dispatch`` picks one per call (see its docstring)."""
from llava_kernels.masked_loss import masked_lm_loss, masked_lm_loss_ref
from llava_kernels.paged_decode import paged_decode_attention, paged_decode_attention_ref
from llava_kernels.projector import projector, projector_ref
from llava_kernels.scatter import scatter_image_tokens, scatter_image_tokens_ref

__all__ = ["masked_lm_loss", "masked_lm_loss_ref", "paged_decode_attention", "paged_decode_attention_ref",
           "projector", "projector_ref", "scatter_image_tokens", "scatter_image_tokens_ref"]
