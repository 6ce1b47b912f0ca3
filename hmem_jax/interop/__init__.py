"""Hugging Face `transformers` interoperability (extra `hf`): exact export and import.

- `hf_export.export_hf`: anchor, or anchor + one path's memory merged into a wider FFN;
  `hf_export.export_bank`: the bank as safetensors per level with a manifest;
- `hf_import.load_hf_anchor` / `write_anchor_run`: a local Llama / Mistral / Qwen2 / Qwen3
  checkpoint as an hmem_jax anchor run for post-hoc memories (experiments/posthoc_ffn.gin);
- `hf_layout`: the tensor-name mapping both use; `modeling_hmem.py`: the remote code shipped
  with exports of full-width qk-norm anchors.
"""
