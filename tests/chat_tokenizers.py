"""Chat tokenizers for tests, built here and saved as local tokenizer files (no downloads).

    tok = llama3_tokenizer(tmp_path)       # byte-level BPE, Llama 3's special tokens and template
    tok = mistral_tokenizer(tmp_path)      # SentencePiece-style (Metaspace) BPE, [INST] template

Each is trained on a few sentences with `tokenizers`, saved with save_pretrained and loaded back
with AutoTokenizer, so the tests read tokenizer files as a user's model directory holds them.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

CORPUS = [
    "Hello there, how are you today?",
    "I am fine, thank you. The answer is 42.",
    "Sort these words: apple, pear, plum.",
    "What is the capital of France? Paris is the capital of France.",
    "You are a careful assistant. Add 2 and 3. The sum is 5.",
] * 20

# Meta-Llama-3-8B-Instruct's template
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim "
    "+ '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
# Mistral-7B-Instruct's: no system role, alternating turns, no generation prompt
MISTRAL = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != "
    "(loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate "
    "user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ message['content'] + eos_token + ' ' }}{% else %}{{ raise_exception('Only user and "
    "assistant roles are supported!') }}{% endif %}{% endfor %}"
)


def _save(tokenizer: Tokenizer, path: Path, template: str, **special) -> PreTrainedTokenizerFast:
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, **special)
    fast.chat_template = template
    fast.save_pretrained(path)
    return AutoTokenizer.from_pretrained(path)


def llama3_tokenizer(path: Path):
    special = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
               "<|end_header_id|>", "<|eot_id|>"]  # fmt: skip
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer)
    return _save(tok, path, LLAMA3, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")


def mistral_tokenizer(path: Path):
    special = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=special))
    return _save(tok, path, MISTRAL, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
