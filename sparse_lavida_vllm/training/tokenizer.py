"""The demo tokenizer: fixed special/image tokens plus a word-level Unigram text model built from the corpus."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

PAD, UNK, EOS, MASK, REG = "[PAD]", "[UNK]", "[EOS]", "[M]", "[reg]"
T2I, EDIT, IMAGE = "<t2i>", "<edit>", "<image>"
NUM_LEVELS = 16
IMAGE_TOKENS = [f"<img_{i}>" for i in range(NUM_LEVELS)]
# Order fixes the ids: PAD=0, UNK=1, EOS=2, [M]=3, [reg]=4, markers 5-7, <img_i> = 8 + i.
SPECIAL_TOKENS = [PAD, UNK, EOS, MASK, REG, T2I, EDIT, IMAGE, *IMAGE_TOKENS]
IMAGE_TOKEN_OFFSET = SPECIAL_TOKENS.index(IMAGE_TOKENS[0])

# User turns, then the assistant header: the arithmetic prompt format "Q: ... A:".
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}Q: {{ message['content'] }}"
    "{% elif message['role'] == 'assistant' %} A: {{ message['content'] }}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %} A:{% endif %}"
)


WORD_SCORE, CHAR_SCORE = -1.0, -10.0  # Viterbi prefers one whole-word piece over spelling it out


def pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    # Metaspace marks word starts with U+2581 like sentencepiece; single digits keep arithmetic learnable.
    return pre_tokenizers.Sequence([
        pre_tokenizers.Metaspace(),
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.Punctuation(),
    ])


def number_normalizer() -> normalizers.Normalizer:
    """Writes a lone digit as two ('4+85' -> '04+85'): every operand digit then sits at a fixed place, so the
    model adds by position instead of first working out how long each number is."""
    return normalizers.Sequence([normalizers.Replace(Regex(f"(?<![0-9]){d}(?![0-9])"), f"0{d}") for d in range(10)])


def train_tokenizer(corpus: list[str]) -> Tokenizer:
    """A Unigram (sentencepiece-style) model whose pieces are every corpus word plus single characters.

    Built, not trained: the `tokenizers` Unigram trainer is not deterministic and split caption words into
    letters ('seven' -> 's e ve n'); one piece per word gives short prompts whose digit word is one token.
    """
    pre = pre_tokenizer()
    words: set[str] = set()
    chars: set[str] = set()
    for line in corpus:
        for piece, _ in pre.pre_tokenize_str(line):
            chars.update(piece)
            if len(piece) > 1 and not any(ch.isdigit() for ch in piece):
                words.add(piece)
    pieces = [(t, 0.0) for t in SPECIAL_TOKENS]
    pieces += [(c, CHAR_SCORE) for c in sorted(chars)] + [(w, WORD_SCORE) for w in sorted(words)]
    tok = Tokenizer(models.Unigram(pieces, unk_id=SPECIAL_TOKENS.index(UNK), byte_fallback=False))
    tok.normalizer = number_normalizer()
    tok.pre_tokenizer = pre
    tok.decoder = decoders.Metaspace()
    tok.add_special_tokens(SPECIAL_TOKENS)
    for i, name in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(name) != i:
            raise RuntimeError(f"special token {name} got id {tok.token_to_id(name)}, expected {i}")
    return tok


def save_hf_tokenizer(tok: Tokenizer, folder: str | Path) -> None:
    """tokenizer.json + tokenizer_config.json that transformers.AutoTokenizer loads offline."""
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, unk_token=UNK, eos_token=EOS, mask_token=MASK,
        additional_special_tokens=[REG, T2I, EDIT, IMAGE, *IMAGE_TOKENS])
    hf.chat_template = CHAT_TEMPLATE
    hf.save_pretrained(str(folder))


def load_tokenizer(folder: str | Path) -> Tokenizer:
    path = Path(folder) / "tokenizer.json"
    if not path.exists():
        raise FileNotFoundError(f"no tokenizer.json in {folder}")
    return Tokenizer.from_file(str(path))
