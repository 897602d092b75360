"""The CPU finetuning demo: the tiny demo model (configs/tiny.py) finetuned on the built-in
instruction set, a stdlib function's signature and docstring (in MPT-7B-Instruct's template) ->
its body, with the loss on the body alone.

    python train.py --config configs/tiny.py --workdir runs/tiny           # pretrain first
    python train.py --config configs/tiny_sft.py --workdir runs/tiny_sft   # then finetune
    python train.py --config configs/tiny_sft.py:PRETRAINED_WORKDIR --workdir DIR

The instruction set is built from the running interpreter's stdlib on first use (6.5k
documented functions on CPython 3.11) and tokenized with the pretrained run's tokenizer
(train.init_from's, as every finetune's) into examples of at most 128 tokens, the tiny model's
context; longer ones are dropped (about 2.7k of 6.5k fit on CPython 3.11 with the demo's
4096-token BPE), so the model learns whole bodies that end in EOS. Every 20th example is held
out (data.eval_fraction): the held-out loss is the response-token loss on functions the finetune
never saw, logged at step 0 (eval.first: the pretrained model's) and every eval_every steps.
Packing puts whole examples side by side in a row with segment ids
(model.attn_uses_sequence_id, a change the finetune may make to the pretrained config).
"""
from configs import tiny
from configs.base import data_section


def get_config(pretrained: str = "runs/tiny"):
    c = tiny.get_config()
    c.train.init_from = pretrained
    c.model.attn_config.attn_uses_sequence_id = True  # packed examples never see each other
    c.max_steps = 200
    c.log_every = 10
    c.eval_every = 50
    c.checkpoint_every = 100
    # LION, a quarter of the pretraining lr; linear decay to 0 after a short warmup (the
    # schedule shape of llm-foundry's finetuning yamls). Our choice for the demo.
    c.optim.lr = 5.0e-4
    c.optim.schedule = "linear"
    c.optim.warmup_steps = 10
    c.optim.alpha_f = 0.0
    c.eval.first = True  # step 0: the pretrained model's loss on the held-out responses
    # data.tokenizer '': the built-in set is tokenized with train.init_from's tokenizer
    c.data = data_section(
        builtin="python_stdlib_sft", packing=True, eval_fraction=0.05,
        builtin_max_seq_len=c.train.seq_len, builtin_on_too_long="drop")
    return c
