"""The character-level tokenizer of the built-in models.

Every character is one token, so every digit of a number is its own token and arithmetic can be scored
digit by digit. One vocabulary serves all built-in models (addition, the mixed addition/letters model, the
4×4 multiplication models), so their token ids agree. It is saved in ordinary Hugging Face format
(`tokenizer.json` + `tokenizer_config.json`): `AutoTokenizer.from_pretrained(folder)` loads it without
arithinterp.
"""

from __future__ import annotations

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
# "|" is the null operator of the counterfactual prompts; "$" and "#" delimit chains of thought.
CHARS = list("0123456789+-*/=<>|$#:, ") + list("abcdefghijklmnopqrstuvwxyz")
VOCAB = [PAD, BOS, EOS] + CHARS


def build_char_tokenizer() -> PreTrainedTokenizerFast:
    """A fast tokenizer mapping each character of `CHARS` to one id (special tokens first)."""
    core = Tokenizer(models.WordLevel({t: i for i, t in enumerate(VOCAB)}, unk_token=PAD))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=PAD)


def is_char_tokenizer(tokenizer: PreTrainedTokenizerBase) -> bool:
    """True for the built-in models' tokenizer (one token per character, `<bos>` special token)."""
    vocab = tokenizer.get_vocab()
    return BOS in vocab and all(c in vocab for c in "0123456789+=") and len(vocab) < 256
