"""MPT-7B-Chat-style finetune: multi-turn conversations in ChatML, the loss on every assistant
turn.

    python -m mpt_jax.data.prepare --format chat --template chatml --target_responses all \
        --input conversations.jsonl --output /data/ft/chat --tokenizer MPT7B_DIR \
        --max_seq_len 2048
    python train.py --config configs/mpt7b_chat.py:MPT7B_DIR --workdir runs/mpt7b_chat

Rows are {"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}, rendered
`<|im_start|>{role}\\n{content}<|im_end|>\\n` per message as MPT-7B-Chat (its tokenizer carries
`<|im_start|>` / `<|im_end|>`: use the GPT-NeoX-20B tokenizer.json with those two tokens, as
MPT-7B-Chat's has them). With --target_responses all every assistant turn is learned (and
`<|im_end|>`, the turn's end, with it); the conversation's last response ends in EOS.

MosaicML published no training yaml for MPT-7B-Chat (its card lists the data: ShareGPT-Vicuna,
HC3, Alpaca, HH-RLHF, Evol-Instruct). The numbers here are the Dolly SFT recipe's
(configs/mpt7b_instruct.py: decoupled AdamW lr 5e-6, betas (0.9, 0.999), linear decay after 50
warmup steps, clipping 1.0, global batch 48, bf16, full remat), except: packing on (with
attn_uses_sequence_id, as llm-foundry's yamls pair them), since conversations vary widely in
length; and the duration, which depends on the data: set max_steps for about 2 epochs
(--config.max_steps=N) as the Dolly recipe runs.
"""
import ml_collections

from configs import mpt7b_instruct
from configs.base import data_section


def get_config(init_from: str = "", data_root: str = "/data/ft"):
    c = mpt7b_instruct.get_config(init_from, data_root)
    c.model.attn_config.attn_uses_sequence_id = True
    c.max_steps = 2000  # our placeholder duration: set for ~2 epochs of your data
    c.eval_every = 500
    c.checkpoint_every = 500
    c.data = data_section(
        sources={"chat": ml_collections.ConfigDict(dict(path=f"{data_root}/chat", weight=1.0))},
        packing=True, eval_fraction=0.02, num_workers=8)
    return c
