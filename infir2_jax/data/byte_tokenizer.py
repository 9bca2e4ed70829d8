"""A Hugging Face tokenizer with one token per byte and Qwen2.5's chat tokens: 259 ids, so a
tiny model's embedding and lm_head are 320 rows instead of the Qwen vocabulary's 151,936 (which
cost a tiny model most of its step time on a CPU). Byte b is id b; then `<|endoftext|>`,
`<|im_start|>`, `<|im_end|>`. Any text encodes (no unknown token); the chat template is the
built-in qwen2.5 one. The package ships the files (`data.tokenizer: bytes`, assets/);
`write_byte_tokenizer` makes them, and a test checks the shipped files against it."""

from __future__ import annotations

from pathlib import Path

BYTE_TOKENIZER = "bytes"
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)


def _byte_symbols() -> list[str]:
    """The printable stand-in of each byte, in byte order: the byte-level BPE alphabet (GPT-2's,
    Qwen's) that the ByteLevel pre-tokenizer and decoder map bytes to and from."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    shifted = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(shifted)) for b in range(256)]


def write_byte_tokenizer(out_dir: Path) -> None:
    """Write tokenizer.json and tokenizer_config.json (with the qwen2.5 chat template) to
    `out_dir`."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from infir2_jax.data.tokenizer import chat_template_path

    vocab = {symbol: b for b, symbol in enumerate(_byte_symbols())}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    # Bytes only: no regex split is needed when nothing merges.
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        clean_up_tokenization_spaces=False,
        model_max_length=32768,
    )
    tokenizer.chat_template = chat_template_path("qwen2.5").read_text()
    tokenizer.save_pretrained(str(out_dir))
