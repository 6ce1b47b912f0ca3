"""Data: sources -> tokenizer -> offline prepare (route + pack per leaf cluster) -> grain loader.

Public entry points (import them from their modules; this package imports nothing eagerly so
`read_documents` stays cheap for the clustering job):
- `sources.read_documents(DataConfig) -> Iterator[document.Document]`, `sources.SourceStats`;
- `encyclopedia.generate_corpus(num_entities, seed) -> Corpus` (documents, probes, entities);
- `tokenizer.load_tokenizer(prepared_dir) -> Tokenizer`;
- `prepare.prepare(...)`, `prepare.ensure_prepared(TrainConfig, out_dir, tree_dir) -> str`
  (its steps: `routing`, `tokenize_pool`, `packing`), writing the format of `prepared`;
- `batch`: the keys of a training batch, shared by the loader, the loop and inference;
- `loader.Loader(prepared_dir, global_batch_size, seq_len, seed, ...)`: `batch(step)`, `iterate()`.
"""
