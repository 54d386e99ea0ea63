"""Small real tokenizers for the tiny pipelines of :mod:`sf_models.tiny`, built offline.

Each tokenizer is learned from :data:`CORPUS` (a few lines of English image and video
prompts) and wrapped in the transformers class the stock pipeline expects, so the pipeline
tokenizes a prompt exactly as it would with the real tokenizer files, only with a vocabulary
of a few hundred entries:

- :func:`clip_tokenizer`: byte-level BPE with CLIP's normalizer, pre-tokenizer and ``</w>``
  word ends (``CLIPTokenizer``); bos ``<|startoftext|>``, eos = pad = unk ``<|endoftext|>``,
  the last two ids, as in CLIP's own vocabulary.
- :func:`t5_tokenizer`: a Unigram model over sentencepiece-style ``▁`` pieces
  (``T5Tokenizer``, also the UMT5 tokenizer); pad 0, eos 1, unk 2, as in T5's vocabulary.
- :func:`llama_tokenizer`: sentencepiece-style BPE with byte fallback (``LlamaTokenizer``);
  unk 0, bos 1, eos 2, pad 3, then the 256 byte tokens, plus the chat-header special tokens
  of a prompt template (Note [Template crop]).

Note [Deterministic training]
    ``tokenizers``' trainers are not deterministic: the BPE trainer orders merges of equal
    count by hash-map iteration, and the Unigram trainer's EM sums run in a varying order,
    so two runs on the same corpus give different ids or scores. The merges are therefore
    learned by :func:`_learn_bpe` (most frequent pair first, ties to the smaller pair, until
    every corpus word is one token: a few hundred merges over a few hundred words, so
    milliseconds), and the T5 Unigram scores are the log of each piece's smoothed count in
    the corpus's BPE segmentation (the corpus words; every other piece gets the floor, so an
    unseen word splits into the fewest pieces). ``tokenizers`` supplies the normalizers,
    pre-tokenizers and tokenizer models, through the transformers classes.

Note [Template crop]
    HunyuanVideo wraps the prompt in a chat template and drops a fixed number of leading
    tokens (``prompt_template["crop_start"]``, 95: the system prompt's length under the real
    Llama-3 tokenizer) from the text encoder's output, keeping the user's prompt. A tokenizer
    that made the system part shorter would crop the prompt itself (the text path would go
    dead); longer would leave template tokens in. :func:`llama_tokenizer` therefore keeps
    the shortest prefix of its BPE merges for which the template part before ``{}``
    tokenizes to exactly ``crop_start`` tokens (the count falls by one or two per merge near
    the end and never rises: a later merge only joins tokens the earlier ones made), and
    raises if no prefix fits.
"""

from __future__ import annotations

import itertools
import math
import string
from collections import Counter
from collections.abc import Iterable

from tokenizers import NormalizedString, Regex, normalizers, pre_tokenizers
from transformers import CLIPTokenizer, LlamaTokenizer, T5Tokenizer

__all__ = ["CORPUS", "clip_tokenizer", "llama_tokenizer", "t5_tokenizer"]

CORPUS = """\
A photo of a cat sitting on a red sofa in a sunny living room.
A dog runs across a green field under a blue sky with white clouds.
A painting of a squirrel eating a burger, oil on canvas.
An astronaut riding a horse on the moon, high detail, digital art.
A cinematic shot of waves crashing on rocks at sunset, golden light, slow motion.
A close-up portrait of an old man with a grey beard, soft light, sharp focus.
A small boat sails on a calm lake surrounded by tall mountains and pine trees.
A city street at night with neon signs, rain on the road and people walking.
A bowl of fresh fruit on a wooden table: apples, oranges, grapes and a banana.
Dance monkey. A panda plays a guitar in a bamboo forest, the camera slowly zooms in.
A bird flies over a snowy village; smoke rises from the chimneys of the houses.
A young woman reads a book by the window while the morning light fills the room.
Two children build a sandcastle on the beach, a beautiful landscape, wide angle.
"""

_CLIP_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
_CLIP_BOS, _CLIP_EOS = "<|startoftext|>", "<|endoftext|>"
_LLAMA_SPECIALS = ("<unk>", "<s>", "</s>", "<pad>")  # ids 0..3
_T5_SPECIALS = ("<pad>", "</s>", "<unk>")  # ids 0..2
_METASPACE = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)

Pair = tuple[str, str]


def _words(
    lines: Iterable[str],
    pre_tokenizer: pre_tokenizers.PreTokenizer,
    normalizer: normalizers.Normalizer | None = None,
) -> Counter[str]:
    """How often each pre-tokenized word occurs in ``lines``."""
    words: Counter[str] = Counter()
    for line in lines:
        if normalizer is not None:
            normalized = NormalizedString(line)
            normalizer.normalize(normalized)
            line = normalized.normalized
        words.update(word for word, _ in pre_tokenizer.pre_tokenize_str(line))
    return words


def _learn_bpe(words: Counter[str], *, end_of_word: str = "") -> list[Pair]:
    """BPE merges for ``words``, in rank order (Note [Deterministic training]).

    Each word starts as its characters, the last one carrying ``end_of_word``; merging stops
    when every word is a single symbol.
    """
    spelled: dict[tuple[str, ...], int] = Counter()
    for word, count in words.items():
        spelled[(*word[:-1], word[-1] + end_of_word)] += count
    merges: list[Pair] = []
    while True:
        pairs: Counter[Pair] = Counter()
        for symbols, count in spelled.items():
            for pair in itertools.pairwise(symbols):
                pairs[pair] += count
        if not pairs:
            return merges
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        merged: dict[tuple[str, ...], int] = Counter()
        for symbols, count in spelled.items():
            merged[_apply(symbols, best)] += count
        spelled = merged


def _apply(symbols: tuple[str, ...], pair: Pair) -> tuple[str, ...]:
    out: list[str] = []
    i = 0
    while i < len(symbols):
        if symbols[i : i + 2] == pair:
            out.append(pair[0] + pair[1])
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return tuple(out)


def _with_merges(vocab: dict[str, int], merges: Iterable[Pair]) -> dict[str, int]:
    """``vocab`` extended, in merge order, by every merge's product not already in it."""
    vocab = dict(vocab)
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    return vocab


def _lines(*texts: str) -> list[str]:
    return [line for text in texts for line in text.splitlines() if line.strip()]


def clip_tokenizer() -> CLIPTokenizer:
    """A CLIP tokenizer (77 tokens, bos/eos/pad set) over :data:`CORPUS`'s byte-level BPE.

    Returns:
        The tokenizer; every byte is in its vocabulary (with and without ``</w>``), so no
        text maps to the unknown token.
    """
    normalizer = normalizers.Sequence(  # CLIPTokenizer's own
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    pre_tokenizer = pre_tokenizers.Sequence(  # CLIPTokenizer's own, without its specials
        [
            pre_tokenizers.Split(Regex(_CLIP_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    merges = _learn_bpe(_words(_lines(CORPUS), pre_tokenizer, normalizer), end_of_word="</w>")
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet + [c + "</w>" for c in alphabet])}
    vocab = _with_merges(vocab, merges)
    vocab[_CLIP_BOS] = len(vocab)
    vocab[_CLIP_EOS] = len(vocab)
    # The backend takes (a, b) pairs, whatever the hint says.
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)  # type: ignore[arg-type]


def t5_tokenizer() -> T5Tokenizer:
    """A T5 (and UMT5) tokenizer: Unigram over :data:`CORPUS` (Note [Deterministic training]).

    Returns:
        The tokenizer, with pad/eos/unk at ids 0/1/2 and no sentinel (``<extra_id_*>``)
        tokens; printable ASCII is in the vocabulary, other characters outside the corpus
        map to ``<unk>``, as with T5's own vocabulary.
    """
    pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), _METASPACE])
    words = _words(_lines(CORPUS), pre_tokenizer)
    visible = set(string.printable) - set(string.whitespace)  # whitespace becomes "▁"
    pieces = dict.fromkeys(sorted({c for word in words for c in word} | visible))
    for a, b in _learn_bpe(words):
        pieces[a + b] = None
    total = sum(words.values()) + len(pieces)  # add-one smoothing
    vocab = [(token, 0.0) for token in _T5_SPECIALS]
    vocab += [(piece, math.log((words[piece] + 1) / total)) for piece in pieces]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=512)


def llama_tokenizer(template: str, crop_start: int) -> LlamaTokenizer:
    """A Llama tokenizer whose ``template`` prefix is ``crop_start`` tokens long.

    Args:
        template: a chat prompt template with one ``{}`` for the prompt; its ``<|...|>``
            markers become special tokens, and its text joins :data:`CORPUS` for training.
        crop_start: how many leading tokens the pipeline drops (Note [Template crop]).

    Returns:
        The tokenizer: bos added, right padding (the pipeline crops from the left).

    Raises:
        RuntimeError: no prefix of the merges makes the template prefix ``crop_start`` tokens.
    """
    specials = _chat_markers(template)
    plain = template.replace("{}", " ")
    for marker in specials:
        plain = plain.replace(marker, "\n")
    words = _words(_lines(CORPUS, plain), _METASPACE)
    merges = _learn_bpe(words)
    base = {token: i for i, token in enumerate(_LLAMA_SPECIALS)}
    base.update({f"<0x{b:02X}>": len(_LLAMA_SPECIALS) + b for b in range(256)})
    for symbol in sorted({c for word in words for c in word}):
        base.setdefault(symbol, len(base))

    def build(n_merges: int) -> LlamaTokenizer:
        vocab = _with_merges(base, merges[:n_merges])
        vocab.update({marker: len(vocab) + i for i, marker in enumerate(specials)})
        return LlamaTokenizer(
            vocab=vocab,
            merges=merges[:n_merges],
            pad_token="<pad>",
            additional_special_tokens=specials,
            add_bos_token=True,
            add_eos_token=False,
            padding_side="right",
            model_max_length=1024,
        )

    prefix = template.split("{}")[0]
    lo, hi = 0, len(merges)  # binary search: the fewest merges giving <= crop_start tokens
    while lo < hi:
        mid = (lo + hi) // 2
        if len(build(mid)(prefix).input_ids) <= crop_start:
            hi = mid
        else:
            lo = mid + 1
    tokenizer = build(lo)
    got = len(tokenizer(prefix).input_ids)
    if got != crop_start:
        raise RuntimeError(
            f"llama_tokenizer: no merge count makes the template prefix {crop_start} tokens "
            f"long (closest: {got} with {lo} merges); change CORPUS"
        )
    return tokenizer


def _chat_markers(template: str) -> list[str]:
    """The ``<|name|>`` markers of a chat template, in order of first appearance."""
    markers: list[str] = []
    rest = template
    while (start := rest.find("<|")) >= 0 and (end := rest.find("|>", start)) >= 0:
        marker = rest[start : end + 2]
        if marker not in markers:
            markers.append(marker)
        rest = rest[end + 2 :]
    return markers
