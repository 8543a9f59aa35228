"""A real byte-level BPE ``tokenizer.json`` for the tiny checkpoints, trained deterministically on built-in text.

The vocabulary has exactly the model's ``vocab_size`` entries, with the special tokens at the ids config.json
names: DeepSeek-V3 keeps bos/eos at 0/1, Kimi-K2 at the end of the vocabulary.
"""
from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from mla_runner.models.config import ModelArgs
from mla_runner.models.errors import UserError

SPECIAL_TOKENS = {
    "deepseek_v3": ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"),
    "kimi_k2": ("[BOS]", "[EOS]"),
}

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}User: {{ message['content'] }}\n\n"
    "{% elif message['role'] == 'assistant' %}Assistant: {{ message['content'] }}{{ eos_token }}"
    "{% else %}{{ message['content'] }}\n\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
)

CORPUS = """\
The quick brown fox jumps over the lazy dog while the farmer watches from the old wooden gate.
A small model can still tell a story, one token after another, if its weights are not all the same.
Once upon a time there was a little town by the river, where the baker rose before the sun every day.
She carried bread to the market, and the children followed the smell of it through the narrow streets.
In the evening the lamps were lit, the boats came home, and the fishermen sang about the wind and the sea.
What is the capital of France? The capital of France is Paris, a city on the river Seine.
How many days are there in a week? There are seven days in a week, and twelve months in a year.
Please write a short poem about the moon. The moon is round and bright tonight, it lights the road for me.
Memory is the limit of a long context: every token keeps a small vector in the cache of every layer.
The engine schedules requests in batches, writes their positions and pages, and runs one decode step.
Experts are chosen by a router, and each token visits only a few of them, which keeps the cost low.
Attention looks back over all the tokens that came before, and weights them by how well they match.
Numbers like 1, 2, 3, 10, 42, 100 and 2024 appear in text, as do dates, prices and phone numbers.
The weather today is sunny with a light breeze from the west, and tomorrow it may rain in the afternoon.
He opened the door, looked at the empty room, and wondered where everyone had gone so early.
Good morning! How are you? I am fine, thank you, and I hope that you are having a wonderful day.
Water boils at one hundred degrees and freezes at zero, at least at the level of the sea.
The library was quiet; only the pages turned, and somewhere a clock counted the seconds of the afternoon.
Learning a language takes time: new words, new sounds, and many small mistakes along the way.
They planted trees along the road, and after ten years the road was green and full of birds.
"""


def train_tokenizer(args: ModelArgs) -> Tokenizer:
    """Byte-level BPE with exactly ``args.vocab_size`` tokens and bos/eos at ``args``' ids."""
    bos, eos = SPECIAL_TOKENS[args.model_type]
    vocab = args.vocab_size
    at_start = (args.bos_token_id, args.eos_token_id) == (0, 1)
    if not at_start and (args.bos_token_id, args.eos_token_id) != (vocab - 2, vocab - 1):
        raise UserError("tiny tokenizers put bos/eos at ids 0/1 or at the last two ids of the vocabulary")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab if at_start else vocab - 2,
        special_tokens=[bos, eos] if at_start else [],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS.splitlines(), trainer)
    if not at_start:
        tok.add_special_tokens([bos, eos])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
    )
    layout = (tok.get_vocab_size(), tok.token_to_id(bos), tok.token_to_id(eos))
    if layout != (vocab, args.bos_token_id, args.eos_token_id):  # the corpus is too small for this vocab
        raise UserError(f"tiny tokenizer came out as (size, bos, eos) = {layout}, config.json wants "
                        f"{(vocab, args.bos_token_id, args.eos_token_id)}")
    return tok


def write_tokenizer(args: ModelArgs, out_dir: Path) -> None:
    """tokenizer.json plus a tokenizer_config.json that AutoTokenizer understands (bos/eos, chat template)."""
    train_tokenizer(args).save(str(out_dir / "tokenizer.json"))
    bos, eos = SPECIAL_TOKENS[args.model_type]
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": eos,
        "pad_token": eos,
        "model_max_length": args.max_position_embeddings,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
