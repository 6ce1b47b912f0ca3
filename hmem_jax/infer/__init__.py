"""Inference: route a text, fetch its memory, decode or score (docs/method.md).

Modules (import from them; nothing is imported eagerly):
- `run.load_run(workdir) -> LoadedRun`: config, anchor, bank (device or streamed), tokenizer, tree;
- `retrieval`: `route` (with blocked subtrees), `BlockSource` (`DeviceBlocks`, `StreamedBlocks`),
  `build_memory(plan, blocks, block_ids, mode)` for modes 'none' / 'generic' / 'fetched';
- `decode.Decoder`: batched KV-cache generation (greedy, temperature, top-k, top-p);
- `engine.Engine`: the above together (`generate`, `memory_for`, `block_ids`);
- `scoring`, `perplexity`, `tasks`, `rag`, `probe`, `plots`: the evaluation harness.
"""
