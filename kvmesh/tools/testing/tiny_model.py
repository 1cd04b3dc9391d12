"""Writes a tiny random Llama model and an offline word-level tokenizer to a folder.

Run with the vLLM virtualenv's Python (it has torch, transformers and tokenizers); imports nothing
from kvmesh, so that Python needs no kvmesh on its path:
    python tiny_model.py DEST
Words `w0 w1 ... w999` map to token ids 0..999, so tests can write prompts whose ids they know.
The special tokens sit above them (ids 1000..1003) under names no word contains: special
tokens match anywhere in a text, so a special token named `w1` would split `w100` apart.
Weights come from a fixed seed: every process that loads the folder runs the same model.
"""

from __future__ import annotations

import sys
from pathlib import Path

VOCAB = 1000  # words w0..w999
SPECIAL = {"<pad>": VOCAB, "<s>": VOCAB + 1, "</s>": VOCAB + 2, "<unk>": VOCAB + 3}


def main(dest: Path) -> None:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB + len(SPECIAL), hidden_size=128, intermediate_size=256, num_attention_heads=2,
        num_key_value_heads=2, num_hidden_layers=2, max_position_embeddings=512,
        pad_token_id=SPECIAL["<pad>"], bos_token_id=SPECIAL["<s>"], eos_token_id=SPECIAL["</s>"],
        tie_word_embeddings=False, torch_dtype="bfloat16",
    )
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    tmp = dest.with_name(dest.name + ".tmp")
    model.save_pretrained(tmp)
    vocab = {f"w{i}": i for i in range(VOCAB)} | SPECIAL
    word_level = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    word_level.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=word_level, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>",
    )
    tokenizer.save_pretrained(tmp)
    tmp.rename(dest)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
