"""Tokenizers: one small interface over sentencepiece and Hugging Face `tokenizers`.

The tokenizer is part of the prepared data: its file is stored inside the
prepared directory and its SHA-256 is in the manifest, so token ids in the
shards can never be read with a different vocabulary by accident.

Special ids are explicit on every tokenizer:
- `eot_id` ends every document in a packed sequence (docs/method.md "EOT separators");
- `bos_id` is available to prompts; packing does not insert it;
- `pad_id` fills the unused tail of a sequence. Padding is always marked by
  segment id 0, so nothing depends on the pad id's value (it is 0 for the
  tokenizers trained here, but a loaded HF tokenizer may use another id; when
  it has no pad token, `pad_id` falls back to `eot_id`).

Trained sentencepiece models are BPE with byte fallback (any string encodes,
no unknown tokens), digits split one per token (numbers such as atomic numbers
are read and generated digit by digit), and no text normalisation (decode
gives back the text exactly).
"""

from __future__ import annotations

import abc
import hashlib
import io
import json
import os
from collections.abc import Iterable, Sequence

from hmem_jax.errors import TokenizerError

SENTENCEPIECE_FILE = "tokenizer.model"
HF_FILE = "tokenizer.json"
_SENTENCEPIECE_MAX_LINE_BYTES = 4192
_HF_EOT_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "<|eot_id|>")
_HF_BOS_CANDIDATES = ("<s>", "<bos>", "<|begin_of_text|>", "<|startoftext|>")
_HF_PAD_CANDIDATES = ("<pad>", "<|padding|>", "[PAD]", "<|pad|>")


class Tokenizer(abc.ABC):
    """Text <-> token ids. Subclasses wrap one library; `data` is the file's bytes."""

    kind: str
    file_name: str

    def __init__(self, data: bytes) -> None:
        self.data = data

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int: ...

    @property
    @abc.abstractmethod
    def eot_id(self) -> int: ...

    @property
    @abc.abstractmethod
    def bos_id(self) -> int: ...

    @property
    @abc.abstractmethod
    def pad_id(self) -> int: ...

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]: ...

    @abc.abstractmethod
    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...

    @abc.abstractmethod
    def decode(self, ids: Sequence[int]) -> str: ...

    @abc.abstractmethod
    def piece(self, token_id: int) -> str:
        """The vocabulary entry of one id (how exports name the special tokens)."""

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    def describe(self) -> dict[str, object]:
        """What the manifest records about this tokenizer (and checks on reload)."""
        return {
            "kind": self.kind,
            "file": self.file_name,
            "sha256": self.sha256,
            "vocab_size": self.vocab_size,
            "eot_id": self.eot_id,
            "bos_id": self.bos_id,
            "pad_id": self.pad_id,
        }

    def save(self, directory: str) -> str:
        path = os.path.join(directory, self.file_name)
        with open(path, "wb") as handle:
            handle.write(self.data)
        return path

    def __getstate__(self) -> dict[str, object]:  # worker processes rebuild from the bytes
        return {"data": self.data}

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__init__(state["data"])  # type: ignore[misc]


class SentencePieceTokenizer(Tokenizer):
    kind = "sentencepiece"
    file_name = SENTENCEPIECE_FILE

    def __init__(self, data: bytes) -> None:
        import sentencepiece

        super().__init__(data)
        self._processor = sentencepiece.SentencePieceProcessor()
        try:
            self._processor.LoadFromSerializedProto(data)
        except RuntimeError as err:
            raise TokenizerError(
                f"Not a sentencepiece model ({str(err).strip()[:120]}); give a .model file "
                "written by sentencepiece, or DataConfig.tokenizer = 'hf' for a tokenizer.json."
            ) from err
        if self._processor.eos_id() < 0:
            raise TokenizerError(
                "This sentencepiece model has no end-of-sequence piece, which "
                "packing needs as EOT; train one with eos_id >= 0."
            )

    @property
    def vocab_size(self) -> int:
        return self._processor.GetPieceSize()

    @property
    def eot_id(self) -> int:
        return self._processor.eos_id()

    @property
    def bos_id(self) -> int:
        bos = self._processor.bos_id()
        return bos if bos >= 0 else self.eot_id

    @property
    def pad_id(self) -> int:
        pad = self._processor.pad_id()
        return pad if pad >= 0 else self.eot_id

    def encode(self, text: str) -> list[int]:
        return self._processor.EncodeAsIds(text)

    def piece(self, token_id: int) -> str:
        return self._processor.IdToPiece(int(token_id))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._processor.Encode(list(texts), out_type=int)

    def decode(self, ids: Sequence[int]) -> str:
        return self._processor.DecodeIds([int(i) for i in ids])


class HuggingFaceTokenizer(Tokenizer):
    kind = "hf"
    file_name = HF_FILE

    def __init__(self, data: bytes) -> None:
        try:
            import tokenizers
        except ImportError as error:
            raise TokenizerError(
                "DataConfig.tokenizer = 'hf' needs the `tokenizers` package; "
                "install it with `pip install 'hmem_jax[hf]'`."
            ) from error
        super().__init__(data)
        try:
            self._tokenizer = tokenizers.Tokenizer.from_str(data.decode("utf-8"))
        except Exception as err:  # tokenizers raises a bare Exception; bytes may not be UTF-8
            raise TokenizerError(
                f"Not a Hugging Face tokenizer.json ({str(err).strip()[:120]}); give the "
                "tokenizer.json of a tokenizers model, or DataConfig.tokenizer = 'sentencepiece' "
                "for a .model file."
            ) from err
        eot = self._first_present(_HF_EOT_CANDIDATES)
        if eot is None:
            raise TokenizerError(
                f"The tokenizer.json has none of the end-of-text tokens "
                f"{_HF_EOT_CANDIDATES}; packing needs one as EOT. Add one as a "
                "special token."
            )
        self._eot = eot
        bos = self._first_present(_HF_BOS_CANDIDATES)
        pad = self._first_present(_HF_PAD_CANDIDATES)
        self._bos = eot if bos is None else bos
        self._pad = eot if pad is None else pad

    def _first_present(self, candidates: Iterable[str]) -> int | None:
        for token in candidates:
            token_id = self._tokenizer.token_to_id(token)
            if token_id is not None:
                return token_id
        return None

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def eot_id(self) -> int:
        return self._eot

    @property
    def bos_id(self) -> int:
        return self._bos

    @property
    def pad_id(self) -> int:
        return self._pad

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [
            encoding.ids
            for encoding in self._tokenizer.encode_batch(list(texts), add_special_tokens=False)
        ]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)

    def piece(self, token_id: int) -> str:
        piece = self._tokenizer.id_to_token(int(token_id))
        if piece is None:
            raise TokenizerError(f"Token id {token_id} is not in the tokenizer's vocabulary.")
        return piece


_CLASSES: dict[str, type[Tokenizer]] = {
    "sentencepiece": SentencePieceTokenizer,
    "hf": HuggingFaceTokenizer,
}


def tokenizer_from_bytes(kind: str, data: bytes) -> Tokenizer:
    if kind not in _CLASSES:
        raise TokenizerError(
            f"Unknown tokenizer kind {kind!r}; expected one of {sorted(_CLASSES)}."
        )
    return _CLASSES[kind](data)


def _training_lines(texts: Iterable[str]) -> Iterable[str]:
    """Non-empty lines short enough for sentencepiece's trainer (it skips longer ones)."""
    for text in texts:
        for line in text.split("\n"):
            line = line.strip()
            while len(line.encode("utf-8")) > _SENTENCEPIECE_MAX_LINE_BYTES:
                cut = line.rfind(" ", 0, _SENTENCEPIECE_MAX_LINE_BYTES // 4)
                cut = _SENTENCEPIECE_MAX_LINE_BYTES // 4 if cut <= 0 else cut
                yield line[:cut]
                line = line[cut:].strip()
            if line:
                yield line


def train_sentencepiece(texts: Iterable[str], vocab_size: int) -> SentencePieceTokenizer:
    """A BPE sentencepiece model trained in memory on `texts` (ids: pad 0, unk 1, bos 2, eot 3).

    The vocabulary limit is soft: a corpus too small for `vocab_size` gets a
    smaller vocabulary instead of an error (the caller sees `vocab_size`).
    """
    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.Train(
        sentence_iterator=iter(_training_lines(texts)),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        character_coverage=0.9995,
        pad_id=0,
        unk_id=1,
        bos_id=2,
        eos_id=3,
        eos_piece="<|endoftext|>",
        num_threads=2,
        minloglevel=2,
    )
    return SentencePieceTokenizer(model.getvalue())


def train_hf_bpe(texts: Iterable[str], vocab_size: int) -> HuggingFaceTokenizer:
    """A byte-level BPE (GPT-2 style) trained with `tokenizers` (ids: pad 0, eot 1, bos 2)."""
    try:
        import tokenizers
    except ImportError as error:
        raise TokenizerError(
            "DataConfig.tokenizer = 'hf' needs the `tokenizers` package; "
            "install it with `pip install 'hmem_jax[hf]'`."
        ) from error
    tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE())
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<|endoftext|>", "<s>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return HuggingFaceTokenizer(tokenizer.to_str().encode("utf-8"))


_FILE_OF_KIND = {"hf": HF_FILE, "sentencepiece": "tokenizer.model"}


def tokenizer_file(kind: str, tokenizer_path: str) -> str:
    """The tokenizer file `DataConfig.tokenizer_path` names: the file itself, or in a folder
    (a Hugging Face model's) its `tokenizer.json` ('hf') or `tokenizer.model`
    ('sentencepiece'). A file of the other kind is refused with the setting that fits it."""
    other = "sentencepiece" if kind == "hf" else "hf"
    if os.path.isdir(tokenizer_path):
        found = os.path.join(tokenizer_path, _FILE_OF_KIND[kind])
        if os.path.isfile(found):
            return found
        if os.path.isfile(os.path.join(tokenizer_path, _FILE_OF_KIND[other])):
            raise TokenizerError(
                f"DataConfig.tokenizer_path = {tokenizer_path!r} holds a "
                f"{_FILE_OF_KIND[other]}, not a {_FILE_OF_KIND[kind]}: set "
                f"DataConfig.tokenizer = '{other}'."
            )
        raise TokenizerError(
            f"DataConfig.tokenizer_path = {tokenizer_path!r} is a folder without "
            f"{_FILE_OF_KIND[kind]}; name the tokenizer file, or a model folder holding one."
        )
    if not os.path.isfile(tokenizer_path):
        raise TokenizerError(
            f"DataConfig.tokenizer_path = {tokenizer_path!r} does not exist; "
            "give an existing sentencepiece .model or tokenizer.json (or a model folder "
            "holding one), or leave it empty to train one on the corpus."
        )
    if kind == "sentencepiece" and tokenizer_path.endswith(".json"):
        raise TokenizerError(
            f"DataConfig.tokenizer_path = {tokenizer_path!r} is a JSON file, a Hugging Face "
            "tokenizer: set DataConfig.tokenizer = 'hf'."
        )
    return tokenizer_path


def build_tokenizer(
    kind: str, tokenizer_path: str, training_texts: Iterable[str], vocab_size: int
) -> Tokenizer:
    """Loads `tokenizer_path` when given, else trains a tokenizer of `kind` on the texts."""
    if tokenizer_path:
        with open(tokenizer_file(kind, tokenizer_path), "rb") as handle:
            data = handle.read()
        try:
            return tokenizer_from_bytes(kind, data)
        except TokenizerError as err:
            raise TokenizerError(f"DataConfig.tokenizer_path = {tokenizer_path!r}: {err}") from err
    if kind == "sentencepiece":
        return train_sentencepiece(training_texts, vocab_size)
    return train_hf_bpe(training_texts, vocab_size)


def load_tokenizer(prepared_dir: str) -> Tokenizer:
    """The tokenizer stored in a prepared directory, checked against its manifest.

    Raises `TokenizerError` when the file is missing or differs from the one
    the shards were tokenized with (hash or vocabulary size).
    """
    from hmem_jax import paths

    manifest_path = paths.join(prepared_dir, "manifest.json")
    if not paths.isfile(manifest_path):
        raise TokenizerError(
            f"{prepared_dir!r} has no manifest.json; it is not a prepared "
            "dataset. Run `python -m hmem_jax.main.prepare --out=DIR`."
        )
    expected = json.loads(paths.read_text(manifest_path))["tokenizer"]
    path = paths.join(prepared_dir, expected["file"])
    if not paths.isfile(path):
        raise TokenizerError(
            f"The prepared data in {prepared_dir!r} lists tokenizer file "
            f"{expected['file']!r}, which is missing. Prepare the data again."
        )
    data = paths.read_bytes(path)
    # Hash first: a damaged file must be reported as a mismatch, not as a parser crash.
    found: dict[str, object] = {"sha256": hashlib.sha256(data).hexdigest()}
    if found["sha256"] == expected["sha256"]:
        found = tokenizer_from_bytes(expected["kind"], data).describe()
    for key in ("sha256", "vocab_size", "eot_id", "pad_id"):
        if found.get(key) != expected[key]:
            raise TokenizerError(
                f"The tokenizer in {prepared_dir!r} does not match the one its shards were "
                f"tokenized with: manifest {key} = {expected[key]!r}, file gives "
                f"{found.get(key)!r}. Restore the original tokenizer file or prepare the data "
                "again."
            )
    return tokenizer_from_bytes(expected["kind"], data)
