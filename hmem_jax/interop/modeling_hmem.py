"""`transformers` modeling code for hmem_jax anchors with full-width qk-norm (copied into exports).

hmem_jax's default anchor (docs/method.md) normalises the whole query and key
vectors (RMSNorm over heads·head_dim, one gain per unit) before splitting
them into heads. No `transformers` architecture does exactly that with a
pre-norm block (OLMo2 is post-norm; OLMoE ties the width to hidden_size and
adds an MoE router), so an export of such an anchor ships this file and is
loaded with `trust_remote_code=True` from the local folder. Everything else
is Qwen3 (pre-norm, gain-only RMSNorm, rotate-half RoPE, SwiGLU, no biases,
free head_dim, GQA): only the two qk-norm modules are swapped. This file must
not import hmem_jax: it runs wherever the export is loaded.
"""

import torch
from torch import nn
from transformers.models.qwen3.configuration_qwen3 import Qwen3Config
from transformers.models.qwen3.modeling_qwen3 import Qwen3ForCausalLM


class HmemConfig(Qwen3Config):
    model_type = "hmem"


class FullWidthRMSNorm(nn.Module):
    """RMSNorm over the last two axes [..., heads, head_dim] together, gain of width
    heads·head_dim."""

    def __init__(self, width: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        flat = hidden_states.reshape(*shape[:-2], shape[-2] * shape[-1])
        input_dtype = flat.dtype
        flat = flat.to(torch.float32)
        flat = flat * torch.rsqrt(flat.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return (self.weight * flat.to(input_dtype)).reshape(shape)


class HmemForCausalLM(Qwen3ForCausalLM):
    config_class = HmemConfig

    def __init__(self, config: HmemConfig) -> None:
        super().__init__(config)
        q_width = config.num_attention_heads * config.head_dim
        assert config.num_key_value_heads is not None  # Qwen3Config fills it in
        k_width = config.num_key_value_heads * config.head_dim
        for layer in self.model.layers:
            layer.self_attn.q_norm = FullWidthRMSNorm(q_width, config.rms_norm_eps)
            layer.self_attn.k_norm = FullWidthRMSNorm(k_width, config.rms_norm_eps)
