"""The demo tokenizer: fixed special/image tokens plus a Unigram text model trained on the synthetic corpus."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

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


def train_tokenizer(corpus: list[str], vocab_size: int = 160) -> Tokenizer:
    """A Unigram (sentencepiece-style) model over the corpus; digits are always single tokens."""
    tok = Tokenizer(models.Unigram())
    # Metaspace marks word starts with U+2581 like sentencepiece; single digits keep arithmetic learnable.
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Metaspace(),
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.Punctuation(),
    ])
    tok.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, unk_token=UNK,
                                      show_progress=False)
    tok.train_from_iterator(corpus, trainer=trainer)
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
